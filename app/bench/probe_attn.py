"""`bench probe-attn`: where one decode step's attention time goes (CUDA; BENCHMARKS.md,
GPU section).

1. one decode step per store through our layer cache (`full`, `kivi:bits=2`,
   `doublesparse`), with a torch profile of each at 8K (CPU and CUDA time per op);
2. SDPA backends for decode (q of 1 token over L keys, GQA 32/8) and for a chunked
   prefill step (2,048 new tokens over 32K keys, bottom-right causal), at a fixed shape;
3. a launch-parameter sweep of the KIVI Triton kernel (token block, splits, warps).

Prints; writes no JSON.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.profiler import ProfilerActivity, profile

from policies import Chunk
from policies.kernels import kivi_attn

from .kernels import filled_layer, layout_info

BF = torch.bfloat16


def timed(fn, n=20):
    """Mean wall µs of fn() after 3 warm-ups (synchronised)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def stepper(layer, length, dev):
    q = torch.randn(32, 1, 128, device=dev, dtype=BF)
    kv = torch.randn(8, 1, 128, device=dev, dtype=BF)
    pos = [length]

    def fn():
        layer.forward(q, kv, kv, 128 ** -0.5, Chunk(torch.zeros(1, dtype=torch.long), pos[0], "decode"))
        pos[0] += 1
    return fn


def decode_per_store(info, dev):
    for L in (8192, 131072):
        for name in ("full", "kivi:bits=2", "doublesparse:keep=0.0625"):
            fn = stepper(filled_layer(name, info, L, 4096), L, dev)
            print(f"--- {name} @ {L}: {timed(fn):.0f} us/step")
            if L == 8192:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
                print(p.key_averages().table(sort_by="cpu_time_total", row_limit=8, max_name_column_width=60))


def sdpa_backends(dev):
    for L in (8192, 131072):
        k = torch.randn(1, 8, L, 128, device=dev, dtype=BF)
        v = torch.randn_like(k)
        q = torch.randn(1, 32, 1, 128, device=dev, dtype=BF)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        cands = {"default": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            def forced(b=b):
                with sdpa_kernel(getattr(SDPBackend, b)):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            cands[b] = forced
        for n, f in cands.items():
            try:
                err = (f().float() - ref).abs().max().item()
                print(f"decode L={L} {n}: {timed(f):.0f} us, max err {err:.4f}")
            except RuntimeError as e:
                print(f"decode L={L} {n}: FAILED {str(e)[:120]}")
    L, T = 32768, 2048
    q = torch.randn(1, 32, T, 128, device=dev, dtype=BF)
    k = torch.randn(1, 8, L, 128, device=dev, dtype=BF)
    v = torch.randn_like(k)
    mask = torch.arange(L, device=dev)[None] <= torch.arange(T, device=dev)[:, None] + (L - T)
    cands = {"bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
             "causal_lower_right": lambda: F.scaled_dot_product_attention(
                 q, k, v, attn_mask=causal_lower_right(T, L), enable_gqa=True)}
    ref = cands["bool mask"]().float()
    for n, f in cands.items():
        print(f"prefill {T}x{L} {n}: {timed(f, 10):.0f} us, max diff {(f().float() - ref).abs().max().item():.4f}")


def kivi_sweep(info, dev):
    """Blocks of 64+ tokens exceed shared memory with fp32 dots: those rows say FAILED."""
    orig = kivi_attn.decode
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        for L in (8192, 131072):
            fn = stepper(filled_layer("kivi:bits=2", info, L, 4096), L, dev)
            for block in (32, 64):
                for mult in (2, 8, 32):
                    for warps in (4, 8):
                        splits = max(1, min(-(-L // block), -(-mult * sms // 8)))
                        kivi_attn.decode = (lambda q_, v_, sc, splits=None, b=block, s=splits, w=warps:
                                            orig(q_, v_, sc, splits=s, block=b, warps=w))
                        try:
                            print(f"kivi2 L={L} block={block} splits={splits} warps={warps}: {timed(fn, 10):.0f} us")
                        except Exception as e:  # noqa: BLE001 -- out of shared memory: say so, go on
                            print(f"kivi2 L={L} block={block} warps={warps}: FAILED {str(e)[:100]}")
    finally:
        kivi_attn.decode = orig


def run():
    if not torch.cuda.is_available():
        raise SystemExit("bench probe-attn needs a CUDA GPU (none is visible); nothing was measured")
    dev = torch.device("cuda")
    info = layout_info(dev, BF, 3)
    decode_per_store(info, dev)
    sdpa_backends(dev)
    kivi_sweep(info, dev)
