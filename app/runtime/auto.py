"""`auto`: the cheapest policy stack that holds the conversation, chosen again as it grows.

From the device's free memory, the conversation's length (plus room for an answer), the
model's native window and whether retaining heads exist for this model:

| the conversation ...                          | chosen                                   |
|-----------------------------------------------|------------------------------------------|
| fits the window, and its full K/V fits memory | `full`                                   |
| fits the window, full K/V does not            | `kivi` (4.6x smaller), else `offload` (host)|
| passes the window, heads exist                | `locret`, `+offload` that recalls the    |
|                                               | passages the question names (evicted     |
|                                               | tokens in host memory)                   |
| passes the window, no heads                   | `streaming:window=2048` + the same       |
|                                               | `offload`                                |
| ... and the device is short                   | the same with `+kivi`                    |

Where the host's available memory would not hold the evicted tokens at the cache's precision,
the host tier keeps them as KIVI codes (`HOST_BITS`, ~4.3x smaller), before recall is given up.

The recall is `offload:terms=on,rank=off` (`RECALLS`): the spans around what the question
quotes and the rare word pairs it names a fact by, no per-head label picks, so no channels
are needed: on number-dense text the label picks made answers loop, and the spans alone lose
little (BENCHMARKS.md, auto's recall).

A stack that passes the window must compact positions (every evicting selector here
does): a model never sees a RoPE position past what it was trained on. Under an 8K window
the budgets shrink with it (`budgeted`: a quarter kept, an eighth recalled). Memory is the
estimate `main.py plan` makes (app/estimate.py) against what this process could use:
the device's free memory plus what the model and cache hold now.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from policies import SpecError, parse_spec
from policies.registry import canonical_spec, spec_of

from . import estimate
from .describe import CHOICES, model_of

AUTO = "auto"
SUMMARY = "choose for the conversation: full inside the window, else locret or a heads-free budget (+kivi/+offload)"
# the question brings back whole passages around the words that name what it asks; no label
# ranking, so no channels either (BENCHMARKS.md, the heads-free choice: a scored budget alone
# held no needle, label-ranked rows made the model loop; part `dense`: the same behind `locret`)
RECALLS = "offload:terms=on,rank=off"
# heads-free: the start and the newest 2K tokens stay, the rest goes to the host
RECALL = f"streaming:window=2048+{RECALLS}"
# the host tier as KIVI codes (keys 8-bit per channel, values 4-bit per token: 10,800 host
# bytes a token on the default model, 46,800 at full precision; the row map adds 360 to
# both), for a read whose evicted tokens would not fit the host's available memory at the
# cache's precision
HOST_BITS = {"kbits": 8, "vbits": 4}


def budgeted(heads: bool, window: int) -> list[str]:
    """The stacks that compact positions, cheapest first, sized to the native window: what
    they keep, recall and answer stays inside it (a quarter of the window kept, an eighth
    recalled; the defaults from an 8K window up: `locret`, `locret+RECALLS`, `RECALL`)."""
    kept, recall = window // 4, min(512, window // 8)
    spill = RECALLS + ("" if recall == 512 else f",recall={recall},quote={min(128, recall // 2)}")
    if heads:
        loc = "locret" if kept >= 1024 else f"locret:budget={kept},stabilizers={kept // 4},local={kept // 8}"
        return [loc, f"{loc}+{spill}"]
    return [f"streaming:window={min(kept, 2048)}+{spill}"]


@dataclass(frozen=True)
class Choice:
    spec: str
    reason: str


def has_heads(info) -> bool:
    """Retaining heads exist for the model of `info` (a ModelInfo; shipped or trained here)."""
    from policies.locret import find_heads
    try:
        find_heads(info)
        return True
    except SpecError:
        return False


def room(rt) -> tuple[int, int | None]:
    """(bytes the peak may reach on the compute device, host bytes for host-tier K/V)."""
    import psutil
    host = psutil.virtual_memory().available
    held = rt.memory().weights_bytes + sum(rt.cache.nbytes().values())
    if rt.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(rt.device)
        return free + held, host
    return host + held, None


def choose(rt, tokens: int, answer: int = 1024, heads: bool | None = None,
           memory: tuple[int, int | None] | None = None) -> Choice:
    """The stack for rt's conversation of `tokens` tokens (and an answer of `answer`); `heads`:
    whether retaining heads exist (default: looked up); `memory`: (device, host) bytes
    (default: what this process could use now, `room`)."""
    heads = has_heads(rt.adapter.info) if heads is None else heads
    m = model_of(rt)
    weights = rt.weights if rt.weights in CHOICES else "fp32"
    return choose_for(m, tokens, answer, heads=heads, memory=memory if memory is not None else room(rt),
                      weights=weights, device=rt.device.type, chunk=rt.chunk_size)


def choose_for(m, tokens: int, answer: int, *, heads: bool, memory: tuple[int, int | None], weights: str,
               device: str, chunk: int) -> Choice:
    """The stack for a conversation of `tokens` tokens on model `m` (a `describe.Model`:
    a loaded runtime's, or `main.py plan`'s from metadata alone), by the estimate `plan`
    makes: `memory` is (bytes the device's peak may reach, host bytes; None on a CPU, where
    host-tier K/V shares the one memory). The spec is canonical (`canonical_spec`)."""
    fit, host = memory
    need, window = tokens + answer, m.window or 0

    def fits(spec: str) -> bool:
        try:
            e = estimate.estimate(m, spec, max(tokens, 1), chunk, answer, weights, device, exact=False)
        except SpecError:  # not for this model (e.g. a kivi group that does not divide head_dim)
            return False
        if host is None:
            return e["peak"] + e["kv_host"] <= fit
        return e["peak"] <= fit and e["kv_host"] <= host

    def chosen(spec: str, reason: str) -> Choice:
        return Choice(canonical_spec(spec), reason)

    if not window or need <= window:
        where = f"{need:,} tokens with the answer, inside the native window of {window:,}" if window else \
            "the model states no window"
        kivi = "kivi" if m.info.head_dim % 32 == 0 else "kivi:group=16"  # groups divide head_dim
        for spec, why in (("full", "its full K/V fits"), (kivi, "full K/V does not fit; 8-bit keys and 2-bit values do"),
                          ("offload", "the K/V fits only in host memory")):
            if fits(spec):
                return chosen(spec, f"{where}; {why}")
        return chosen("offload", f"{where}; nothing fits the device: the K/V goes to host memory")
    kind = "retaining heads exist for this model" if heads else \
        "no retaining heads for this model (train them: `main.py train-heads`)"
    why = f"{need:,} tokens with the answer pass the native window of {window:,}: a budget that " \
          f"compacts positions; {kind}"
    tried = budgeted(heads, window)
    for spec in with_coded_host(tried):  # with recall first, where it fits
        if fits(spec):
            return chosen(spec, why + _host_reason(spec))
    quantized = [s.replace("+offload", "+kivi+offload") if "+offload" in s else s + "+kivi" for s in tried]
    for spec in with_coded_host(quantized):
        if fits(spec):
            return chosen(spec, why + "; quantized K/V: the device is short" + _host_reason(spec))
    return chosen(quantized[0], why + "; even quantized K/V is tight on this device")


def with_coded_host(stacks: list[str]) -> list[str]:
    """The stacks to try, best first: each with recall, then the same with its host tier as
    KIVI codes (`HOST_BITS` in its spill's options), then those without recall (`stacks`
    cheapest first, as `budgeted`)."""
    out = []
    for spec in reversed(stacks):
        out.append(spec)
        slots = parse_spec(spec)
        if "spill" in slots:
            slots["spill"].opts.update(HOST_BITS)
            out.append(spec_of(slots))
    return out


def _host_reason(spec: str) -> str:
    spill = parse_spec(spec).get("spill")
    if spill is None:
        return ""
    kbits, vbits = spill.opts.get("kbits", 16), spill.opts.get("vbits", 16)
    if kbits < 16 or vbits < 16:
        return (f"; evicted tokens go to host memory for recall as {kbits}-bit keys and {vbits}-bit values "
                "(at full precision they would not fit the host's available memory)")
    return "; evicted tokens go to host memory for recall"


def check_spec(spec: str) -> None:
    """Raise SpecError for a spec that cannot be used; `auto` is always usable."""
    if spec.strip() != AUTO:
        parse_spec(spec)
