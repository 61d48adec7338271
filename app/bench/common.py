"""Shared pieces of the benchmark suites: models, timing, progress, output files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from app.runtime.adapter import ATTN_NAME, Adapter
from app.runtime.decode import Decoder, generate
from app.runtime.prefill import prefill
from app.runtime.types import Sampling
from policies import KVCache


def machine() -> dict:
    """What ran the benchmark, for the JSON and BENCHMARKS.md."""
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
           "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, cwd=Path(__file__).parents[2], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["commit"] = "?"
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Bar:
    """A one-line progress bar on stderr (the table goes to stdout)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.t0 = total, label, 0, time.perf_counter()

    def step(self, what: str = "") -> None:
        self.done += 1
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        print(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
              f"{el:,.0f}s ETA {eta:,.0f}s {what[:40]:<40}", end="\n" if self.done >= self.total else "",
              file=sys.stderr, flush=True)


def decode_steps(ad: Adapter, cache: KVCache, logits: torch.Tensor, n: int, dec: Decoder | None = None):
    """n greedy decode steps (the content does not matter for speed or memory), through
    `dec` or a Decoder of its own (closed here). -> the last logits."""
    own = dec is None
    dec = dec or Decoder(ad, cache)
    try:
        for _ in range(n):
            logits = dec.step(logits.argmax().view(1))
    finally:
        if own:
            dec.close()
    cache.track_peak()  # decode only appends: the end is the peak
    return logits


def warm_up(ad: Adapter, chunk: int) -> None:
    """Once per model: an untimed two-chunk prefill and two decode steps through `full`, so
    the first timed row does not pay for compiling the fused Triton kernels (measured on an
    H100: `full` at 4K prefilled at 3.6K tok/s as the first row, 27K at 16K as the next)."""
    if getattr(ad, "bench_warm", False):
        return
    ad.bench_warm = True
    cache = KVCache("full", ad.info)
    ids = random_ids(2 * chunk, ad.model.config.vocab_size, 1, ad.info.device)
    decode_steps(ad, cache, prefill(ad, cache, ids, chunk), 2)
    sync(ad.info.device)


def greedy(rt, logits: torch.Tensor, max_new: int) -> str:
    """The greedy answer (at most max_new tokens, to a stop token) after a read whose last
    logits [V] are `logits`, decoded by the runtime's own `generate`; stripped."""
    return generate(rt.adapter, rt.cache, logits, rt.tok, stop_ids=rt.stop_ids, max_new_tokens=max_new,
                    sampling=Sampling(), gen=torch.Generator()).text.strip()


def timed_prefill_decode(ad: Adapter, cache: KVCache, ids: torch.Tensor, chunk: int, n: int):
    """Prefill ids, one untimed decode step (it compiles Triton kernels, ~1 s, or captures
    the CUDA graph), then n timed steps. -> (prefill seconds, decode seconds, decode mode).
    The model is warmed up first (`warm_up`, once)."""
    dev = ad.info.device
    warm_up(ad, chunk)
    sync(dev)
    t0 = time.perf_counter()
    logits = prefill(ad, cache, ids, chunk)
    sync(dev)
    prefill_s = time.perf_counter() - t0
    with Decoder(ad, cache) as dec:
        logits = decode_steps(ad, cache, logits, 1, dec)
        sync(dev)
        t1 = time.perf_counter()
        decode_steps(ad, cache, logits, n, dec)
        sync(dev)
        return prefill_s, time.perf_counter() - t1, dec.mode


@contextmanager
def hf_attention(model):
    """transformers' own SDPA attention, norms and RoPE for a baseline run (our fused
    kernels run only inside our own forward), ours again afterwards."""
    model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(ATTN_NAME)


def random_ids(n: int, vocab: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab - 100), (n,), generator=g).to(device)


def write_json(out_dir: Path, suite: str, rows: list[dict], extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    path.write_text(json.dumps({"suite": suite, "machine": machine(), **(extra or {}), "rows": rows}, indent=1))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    """A plain Markdown table (paste-able into BENCHMARKS.md)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], x: str, y: str, series: str, title: str, logy: bool = False,
         zero: bool = False) -> Path | None:
    """A PNG line plot of y against x, one line per value of `series` (zero: the y axis from 0,
    so a few percent look like a few percent)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == name and r.get(y) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    elif zero:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
