"""`bench kernels`: one decode step's attention over a long cache, per store, against
`full` in the same run: Llama-3-8B's head layout (32 query / 8 KV heads, head_dim 128),
one layer, random K/V filled by chunked prefill through the policy's own layer cache.

Rows: `full` (bf16 SDPA), `kivi` 2/4-bit through the fused Triton kernel and through
the reference (dequantize, then SDPA), `doublesparse` keep=1/16 (label scores, top-k
gather, exact attention). Reported: microseconds per step (median of CUDA-event timings)
and the speed-up over `full`. On a CPU it runs the same code (interpreted Triton is far
too slow to time: the kernel rows are left out unless TRITON_INTERPRET=1).
"""
from __future__ import annotations

import statistics
from dataclasses import replace
import time

import torch

from policies import Chunk, KVCache, ModelInfo

from .common import Bar, sync, table, write_json
from .random_model import random_channels_file

LAYOUT = dict(n_q_heads=32, n_kv_heads=8, head_dim=128)
ROWS = ("full", "kivi:bits=2", "kivi:bits=2 (reference)", "kivi:bits=4", "kivi:bits=4 (reference)",
        "doublesparse:keep=0.0625")


def layout_info(device, dtype, layers: int) -> ModelInfo:
    d = LAYOUT["head_dim"]
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return ModelInfo(n_layers=layers, dtype=dtype, device=device, inv_freq=inv, window=131072,
                     model_id="kernels-bench", hidden_size=4096, **LAYOUT)


def filled_layer(name: str, info, length: int, chunk: int):
    """(layer cache of the last layer, filled with `length` random tokens)."""
    spec = name.split(" ")[0]
    if spec.startswith("doublesparse"):
        spec += f",channels_file={random_channels_file(info)}"
    kivi = "off" if name.endswith("(reference)") else "on"
    cache = KVCache(spec, replace(info, kernels=info.kernels.with_(kivi=kivi)))
    layer = cache.layers[-1]
    g = torch.Generator(device=info.device).manual_seed(0)
    h, hq, d = info.n_kv_heads, info.n_q_heads, info.head_dim
    for s in range(0, length, chunk):
        t = min(chunk, length - s)
        k, v, q = (torch.randn(n, t, d, generator=g, device=info.device, dtype=info.dtype) for n in (h, h, hq))
        layer.forward(q, k, v, d ** -0.5, Chunk(torch.zeros(t, dtype=torch.long), s))
    return layer


def _time(fn, device, iters: int) -> float:
    """Median seconds of fn() over iters runs (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run(lengths=(8192, 32768, 131072), rows=ROWS, iters: int = 50, chunk: int = 4096, device=None,
        out_dir=None):
    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from policies.kernels import kivi_attn
    if not kivi_attn.triton_ok(device):
        rows = tuple(r for r in rows if not (r.startswith("kivi") and "(reference)" not in r))
    info = layout_info(device, dtype, layers=3)  # doublesparse keeps its first 2 layers dense
    d = info.head_dim
    out, base = [], {}
    bar = Bar(len(lengths) * len(rows), "bench kernels")
    for n in lengths:
        for name in rows:
            row = {"store": name, "context": n}
            try:
                layer = filled_layer(name, info, n, chunk)
                g = torch.Generator(device=device).manual_seed(1)
                q = torch.randn(info.n_q_heads, 1, d, generator=g, device=device, dtype=dtype)
                kv = torch.randn(info.n_kv_heads, 1, d, generator=g, device=device, dtype=dtype)
                step = [n]

                def fn():
                    layer.forward(q, kv, kv, d ** -0.5, Chunk(torch.zeros(1, dtype=torch.long), step[0], "decode"))
                    step[0] += 1
                sync(device)
                row["us"] = _time(fn, device, iters) * 1e6
                if name == "full":
                    base[n] = row["us"]
                if n in base:
                    row["speedup_vs_full"] = base[n] / row["us"]
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0][:80]}"
            layer = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            out.append(row)
            bar.step(f"{name} @ {n}")
    print(table(out, [c for c in ("store", "context", "us", "speedup_vs_full", "error") if any(c in r for r in out)]))
    if out_dir is not None:
        write_json(out_dir, "kernels", out, {"layout": LAYOUT, "dtype": str(dtype), "iters": iters})
    return out
