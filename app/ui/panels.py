"""Side panel: VRAM gauge, host RAM gauge, context meter, policy panel; and the status line.

The split of memory into segments is a pure function of a `MemoryReport` (`vram_segments`,
`host_segments`) so it is tested without a screen; the widgets only draw it. The gauges'
timelines and the Context panel's cache map come from the runtime's published `CacheState`
(`snapshot()`, which never blocks); they are drawn by `timeline.py` and `cache_map.py`.
"""
from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from app.runtime.metrics import RemoteMemory
from app.runtime.types import CacheState, MemoryReport
from app.ui.timeline import sparkline
from policies.registry import REGISTRY, SpecError, fmt_value, parse_policy

# (label, colour) per segment, in bar order.
KV_FULL, KV_QUANT, KV_META = "KV fp", "KV quant", "KV labels"
STYLES = {
    "weights": "#5f87d7", KV_FULL: "#d75f5f", KV_QUANT: "#d7875f", KV_META: "#d7af5f",
    "torch other": "#af87d7", "other": "#808080", "free": "#3a3a3a",
    "process": "#af87d7", "offloaded KV": "#d7875f", "available": "#3a3a3a",
}
_QUANT_KINDS = {"codes", "scales", "zeros", "mins"}
_META_KINDS = {"labels", "scores", "index"}


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def kv_by_group(kv_tier: dict) -> dict[str, int]:
    """KV bytes of one tier grouped as the gauge shows them: fp keys/values, quantized, labels."""
    out = {KV_FULL: 0, KV_QUANT: 0, KV_META: 0}
    for kind, nbytes in kv_tier.items():
        group = KV_QUANT if kind in _QUANT_KINDS else KV_META if kind in _META_KINDS else KV_FULL
        out[group] += int(nbytes)
    return out


def vram_segments(r: MemoryReport) -> tuple[list[tuple[str, int]], int]:
    """(segments, total) for the main gauge: the GPU when there is one, else host memory."""
    if not r.has_gpu:
        kv = kv_by_group({})
        for tier in r.kv.values():
            for group, n in kv_by_group(tier).items():
                kv[group] += n
        mine = r.weights_bytes + sum(kv.values())
        segs = [("weights", r.weights_bytes), *kv.items(),
                ("process", max(0, r.rss - mine)),
                ("other", max(0, r.host_total - r.host_available - max(r.rss, mine))),
                ("free", r.host_available)]
        return segs, max(r.host_total, sum(n for _, n in segs))
    kv = kv_by_group(r.kv.get("gpu", {}))
    mine = r.weights_bytes + sum(kv.values())
    torch_total = r.torch_reserved if r.torch_reserved is not None else (r.torch_allocated or mine)
    torch_other = max(0, torch_total - mine)
    segs = [("weights", r.weights_bytes), *kv.items(), ("torch other", torch_other)]
    if r.gpu_total is not None and r.gpu_used is not None:
        segs.append(("other", max(0, r.gpu_used - mine - torch_other)))
        segs.append(("free", max(0, r.gpu_total - r.gpu_used)))
        total = r.gpu_total
    else:
        total = sum(n for _, n in segs)
    return segs, max(total, sum(n for _, n in segs), 1)


def host_segments(r: MemoryReport) -> tuple[list[tuple[str, int]], int]:
    offloaded = sum(r.kv.get("host", {}).values())
    segs = [("process", max(0, r.rss - offloaded)), ("offloaded KV", offloaded),
            ("other", max(0, r.host_total - r.host_available - max(r.rss, offloaded))),
            ("available", r.host_available)]
    return segs, max(r.host_total, sum(n for _, n in segs), 1)


def bar(segs: list[tuple[str, int]], total: int, width: int) -> Text:
    """A stacked bar; cells go to segments by largest remainder so the widths sum to `width`."""
    width = max(width, 1)
    exact = [n * width / total for _, n in segs]
    cells = [int(x) for x in exact]
    order = sorted(range(len(segs)), key=lambda i: exact[i] - cells[i], reverse=True)
    for i in order[: max(0, width - sum(cells))]:
        cells[i] += 1
    text = Text()
    for (label, _), n in zip(segs, cells):
        char = "░" if label in ("free", "available") else "█"
        text.append(char * n, style=STYLES.get(label, "white"))
    return text


def legend(segs: list[tuple[str, int]], total: int) -> Text:
    text = Text()
    for label, n in segs:
        if n == 0 and label.startswith("KV"):
            continue
        text.append("■ ", style=STYLES.get(label, "white"))
        text.append(f"{label:<12}{fmt_bytes(n):>10}  {n / total:>4.0%}\n")
    return text


class Gauge(Static):
    """A stacked memory bar with numbers beside it; `report` is set ~2x/s by the app."""

    report: reactive[MemoryReport | None] = reactive(None, layout=True)

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kind = kind  # "vram" or "host"

    def render(self) -> Text:
        r = self.report
        if r is None:
            return Text("waiting for the model…", style="dim")
        remote = r.remote if isinstance(r, RemoteMemory) else None
        if remote is not None and not r.host_total:  # a server that reports no byte counts
            return Text(remote if self.kind == "vram" else "remote: host memory not reported", style="bold")
        width = max(self.content_size.width, 10)
        text = Text()
        if remote is not None:
            text.append(remote + "\n", style="bold cyan")
        if self.kind == "host":
            segs, total = host_segments(r)
            text.append(f"{fmt_bytes(r.host_total - r.host_available)} used of {fmt_bytes(r.host_total)}\n")
        else:
            segs, total = vram_segments(r)
            if r.has_gpu:
                text.append(f"{r.device}\n", style="bold")
                used = r.gpu_used if r.gpu_used is not None else sum(n for k, n in segs if k != "free")
                text.append(f"{fmt_bytes(used)} used of {fmt_bytes(total)}\n")
            else:
                text.append("No GPU: model and cache in host memory\n", style="bold yellow")
                text.append(f"{fmt_bytes(r.host_total - r.host_available)} used of {fmt_bytes(total)}\n")
            text.append(f"KV cache {fmt_bytes(r.kv_total())}  (peak {fmt_bytes(r.kv_peak_bytes)})\n")
        text.append_text(bar(segs, total, width))
        text.append("\n")
        text.append_text(legend(segs, total))
        text = text.rstrip() or text
        self._timeline(text, r, width)
        return text

    def _timeline(self, text: Text, r: MemoryReport, width: int) -> None:
        """KV bytes of this gauge's tier over the conversation, markers where it changed hands."""
        state = published(self)
        samples = state.timeline.samples() if state is not None and state.timeline is not None else []
        if len(samples) < 2:
            return
        tier = "host" if self.kind == "host" else "gpu"
        line, marks, peak = sparkline(samples, tier, width, STYLES[KV_FULL if tier == "gpu" else "offloaded KV"])
        if peak == 0:
            return
        text.append(f"\n{'offloaded KV' if tier == 'host' else 'KV'} over time · peak {fmt_bytes(peak)}\n",
                    style="dim")
        text.append_text(line)
        if marks is not None:
            text.append("\n")
            text.append_text(marks)


def published(widget) -> CacheState | None:
    """The runtime's last published state (never blocks), or None before a model is loaded.
    NOTE: panels live in the VramchatApp, whose `runtime` is the loaded one (or None)."""
    rt = widget.app.runtime
    return rt.snapshot() if rt is not None else None


class PolicyPanel(Static):
    spec: reactive[str] = reactive("", layout=True)
    layers: reactive[list] = reactive(list, layout=True)  # KV bytes per decoder layer

    BARS = " ▁▂▃▄▅▆▇█"

    def render(self) -> Text:
        if not self.spec:
            return Text("no policy yet", style="dim")
        text = Text()
        text.append(self.spec + "\n", style="bold")
        for part in self.spec.split("+"):
            try:
                pol = parse_policy(part)
            except SpecError:
                text.append(f"{part}\n")
                continue
            entry = REGISTRY[pol.name]
            text.append(f"{pol.name}", style="bold cyan")
            text.append(f" ({pol.slot})\n", style="dim")
            for key, value in pol.opts.items():
                default = value == entry.options[key].default
                text.append(f"  {key} = {fmt_value(value)}\n", style="dim" if default else "")
        if self.layers and max(self.layers) > min(self.layers):  # layers differ: show how
            top = max(self.layers)
            text.append("KV per layer ", style="bold")
            text.append("".join(self.BARS[round(b / top * 8)] for b in self.layers) + "\n")
            text.append(f"  {fmt_bytes(min(self.layers))} – {fmt_bytes(top)}\n", style="dim")
        return text.rstrip() or text


class StatusLine(Static):
    """Model, device, weights precision and what the worker is doing."""

    model = reactive("…")
    device = reactive("…")
    weights = reactive("…")
    state = reactive("starting")

    def render(self) -> Text:
        text = Text(" vramchat ", style="bold reverse")
        text.append(f"  {self.model}  ·  {self.device}  ·  {self.weights}  ·  ")
        busy = self.state != "idle"
        text.append(self.state, style="bold yellow" if busy else "bold green")
        return text
