"""`main.py plan`: will a model, a context length and a policy fit? From the model's
metadata alone (config.json, a GGUF header, a hub-cache entry): no weights are read. The
estimate itself is app/estimate.py; this is the command, and the line the app shows
before /load reads a document."""
from __future__ import annotations

from pathlib import Path

import torch

from app.runtime.describe import CHOICES, describe, model_of, weights_bytes
from app.runtime.estimate import MAX_SEARCH, estimate, fits, largest
from app.runtime.auto import AUTO
from app.runtime.types import VramchatError, fmt_bytes


def capacity(gpu_gib: float | None) -> tuple[str, int, int | None, str]:
    """-> (device kind, bytes the peak must fit, host bytes for host-tier KV, label)."""
    import psutil
    host = psutil.virtual_memory().available
    if gpu_gib is not None:
        return "cuda", int(gpu_gib * 2**30), host, f"a {gpu_gib:g} GiB card"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return "cuda", total, host, f"cuda:0 ({torch.cuda.get_device_name(0)}, {fmt_bytes(total)}; {fmt_bytes(free)} free now)"
    return "cpu", host, None, f"this CPU machine ({fmt_bytes(host)} of RAM available)"


def plan(model: str | None, context: int, specs: list[str], gpu_gib: float | None = None, weights: str = "auto",
         chunk: int | None = None, answer: int = 1024, trust_remote_code: bool = False) -> dict:
    """Everything `main.py plan` prints, as JSON-able data."""
    from policies import SpecError
    if context < 1:
        raise VramchatError(f"--context {context}: must be at least 1 token")
    if gpu_gib is not None and gpu_gib <= 0:
        raise VramchatError(f"--gpu-gib {gpu_gib:g}: must be above 0")
    m = describe(model, trust_remote_code)
    device, fit, host, where = capacity(gpu_gib)
    if weights == "auto":
        weights = "bf16" if device == "cuda" else "fp32"
    if weights not in CHOICES:
        raise VramchatError(f"--weights {weights!r}: choose one of auto, {', '.join(CHOICES)}")
    if weights in ("8bit", "4bit") and device != "cuda":
        raise VramchatError(f"--weights {weights} needs a CUDA GPU; plan for a card with --gpu-gib G")
    chunk = chunk or (2048 if device == "cuda" else 512)
    rows = []
    for spec in specs:
        row = {"policy": spec}
        try:
            auto = None
            if spec.strip() == AUTO:  # the stack auto chooses here; at other lengths, others
                auto = _auto(m, answer, fit, host, weights, device, chunk)
                c = auto(context)
                row["auto"], spec = {"spec": c.spec, "reason": c.reason}, c.spec
            row.update(estimate(m, spec, context, chunk, answer, weights, device))
            row["fits"] = fits(row, fit, host)
            row["largest_context"] = largest(m, spec if auto is None else (lambda n: auto(n).spec), chunk, answer,
                                             weights, device, fit, host)
        except SpecError as e:
            row["error"] = str(e)
        rows.append(row)
    return {"model": m.model_id, "arch": m.arch, "params": m.linear + m.other, "window": m.window,
            "context": context, "answer": answer, "chunk": chunk, "weights": weights, "device": where,
            "capacity_bytes": fit, "host_available_bytes": host,
            "weights_bytes": {c: weights_bytes(m, c) for c in CHOICES}, "policies": rows}


def _auto(m, answer: int, fit: int, host: int | None, weights: str, device: str, chunk: int):
    """-> choose(n) -> the `auto.Choice` the runtime would make on this model for a
    conversation of n tokens, with this memory (app/runtime/auto.py's own rule)."""
    from app.runtime.auto import choose_for, has_heads
    heads = has_heads(m.info)
    return lambda n: choose_for(m, n, answer, heads=heads, memory=(fit, host), weights=weights, device=device,
                                chunk=chunk)


def _tokens(n: int) -> str:
    return f"≥ {n:,}" if n >= MAX_SEARCH else f"{n:,}"


def render(p: dict) -> str:
    lines = [f"{p['model']} ({p['arch']}, {p['params'] / 1e9:.2f}B parameters, native window {p['window']:,}) "
             f"on {p['device']}",
             "weights: " + ", ".join(f"{c} {fmt_bytes(b)}" for c, b in p["weights_bytes"].items()),
             f"{p['context']:,} tokens read, then an answer of {p['answer']:,}; prefill chunk {p['chunk']:,}; "
             f"weights {p['weights']} ({fmt_bytes(p['weights_bytes'][p['weights']])})", ""]
    cols = ["policy", "KV on device", "KV on host", "peak", "fits", "largest context"]
    rows = []
    for r in p["policies"]:
        if "error" in r:
            continue
        label = f"auto: {r['auto']['spec']}" if "auto" in r else r["policy"]
        rows.append([label, fmt_bytes(r["kv_gpu"]), fmt_bytes(r["kv_host"]) if r["kv_host"] else "-",
                     fmt_bytes(r["peak"]), "yes" if r["fits"] else "NO", _tokens(r["largest_context"])])
    widths = [max([len(c)] + [len(x[i]) for x in rows]) for i, c in enumerate(cols)]
    if rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        lines += ["  ".join(v.ljust(w) for v, w in zip(x, widths)).rstrip() for x in rows]
    lines += [f"{r['policy']}: {r['error']}" for r in p["policies"] if "error" in r]
    lines += [f"auto would choose `{r['auto']['spec']}` for {p['context']:,} tokens: {r['auto']['reason']} (its "
              "largest context: the longest at which the stack auto chooses for it fits)"
              for r in p["policies"] if "auto" in r]
    over = [r["policy"] for r in p["policies"] if r.get("largest_context", MAX_SEARCH) < MAX_SEARCH
            and r.get("largest_context", 0) > p["window"]]
    lines.append(f"\npeak = weights + KV at its peak + one chunk's activations; largest context: the longest "
                 f"document that still fits (past the native window {p['window']:,}, `full` degrades; "
                 "evicting policies read on with compacted positions)")
    if p["host_available_bytes"] is None:
        lines.append("on a CPU the device is the host: `fits` and the largest context count KV on host with the peak")
    del over
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="will a model, a context and a policy fit? (metadata only, no weights read)")
    p.add_argument("--model", default=None, help="as for chat: folder, .gguf, cached HF id or a `models` name")
    p.add_argument("--context", type=int, required=True, help="tokens to read (documents + conversation)")
    p.add_argument("--policy", action="append", default=[], help="a policy spec, or `auto` (the stack auto "
                   "would choose for this context; repeatable; default: full, kivi, locret, locret+kivi, streaming)")
    p.add_argument("--gpu-gib", type=float, default=None, help="plan for a card of this size (default: this "
                   "machine's GPU, or its RAM where there is none)")
    p.add_argument("--weights", default="auto", choices=("auto", *CHOICES))
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (default 2048 on a GPU, 512 on CPU)")
    p.add_argument("--answer", type=int, default=1024, help="tokens of answer to leave room for")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# with auto's host tier past the window, at the cache's precision and quantized (offload/rows.py)
DEFAULT_SPECS = ("full", "kivi", "locret", "locret+kivi", "streaming", "locret+offload:terms=on,rank=off",
                 "locret+offload:terms=on,rank=off,kbits=8,vbits=4")


def run(args) -> int:
    import json
    p = plan(args.model, args.context, args.policy or list(DEFAULT_SPECS), args.gpu_gib, args.weights,
             args.chunk_size, args.answer, args.trust_remote_code)
    print(json.dumps(p, indent=1) if args.json else render(p))
    return 0


def before_load(rt, path: str, answer: int = 1024) -> str:
    """The line the app shows before /load reads a document: its tokens, and what the
    policy will hold for the conversation with it, by the same estimate as `plan` (per-token
    rates for a replayed store: this runs before every document)."""
    from app.runtime import documents
    n = len(rt.tokens(documents.read_document(path)))
    m = model_of(rt)
    choice = rt.weights if rt.weights in CHOICES else "fp32"
    device, fit, host, where = capacity(None)
    e = estimate(m, rt.policy, rt.cache.seen + n, rt.chunk_size, answer, choice, device, exact=False)
    peak = e["peak"] - weights_bytes(m, choice) + rt.memory().weights_bytes
    verdict = "fits" if fits(dict(e, peak=peak), fit, host) else "does NOT fit"
    host_kv = f" + {fmt_bytes(e['kv_host'])} on the host" if e["kv_host"] else ""
    return (f"{Path(path).name}: {n:,} tokens; `{rt.policy}` will hold {fmt_bytes(e['kv_gpu'])} of KV{host_kv} "
            f"(peak {fmt_bytes(peak)} of {fmt_bytes(fit)}: {verdict}; `main.py plan` compares policies)")
