"""`bench probe-decode`: where one decode step's time goes (BENCHMARKS.md, GPU section).

For an 8B Llama-3.1-shaped model (random bf16 weights, card capped at `--cap-gib`) and each
policy given: prefill `--context` tokens, then
1. the CUDA-graph decode step's time (mean of 64 replays) against the bandwidth floor;
2. a torch profile of 3 fixed-shape steps run without the graph: GPU kernels per step,
   their summed time, and the top kernels by time (the graph removes the launch cost,
   not the kernels, so their sum is what a replay cannot beat);
3. `--variants`: the same decode with the step's kernels as they were (torch attention
   over the window, transformers' norms and RoPE: `torch`), with the Triton window
   kernel (`window`), and with the fused norm and RoPE kernels too (`fused`): A/B in one run.

On a CPU it runs the tiny shape, to check the code runs. Prints; writes no JSON.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from app.runtime.adapter import Adapter
from app.runtime.decode import Decoder
from app.runtime.prefill import prefill
from policies import KVCache, static
from policies.kernels.switch import Kernels

from .bandwidth import bandwidth
from .common import random_ids, sync
from .random_model import build_model, random_heads_dir, with_files

VARIANTS = ("torch", "window", "fused")


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemv", "gemm", "cutlass", "sm90_xmma", "ampere", "nvjet", "cublas")):
        return "matmul"
    if any(s in n for s in ("flash", "fmha", "attention", "softmax")):
        return "attention/softmax"
    if "reduce" in n:
        return "reduce"
    if "triton" in n:
        return "triton"
    return "elementwise/copy/other"


def profile_steps(dec: Decoder, token, n=3):
    dec.step(token)  # opens the window
    sync(token.device)
    act = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[act]) as prof:
        for _ in range(n):
            dec.step(token)
        sync(token.device)
    by = defaultdict(lambda: [0, 0.0])
    cats = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") or act == ProfilerActivity.CPU:
            us = e.device_time if act == ProfilerActivity.CUDA else e.cpu_time
            by[e.name][0] += 1
            by[e.name][1] += us
            c = cats[kind(e.name)]
            c[0] += 1
            c[1] += us
    count = sum(v[0] for v in by.values()) / n
    total = sum(v[1] for v in by.values()) / n / 1e3
    print(f"  eager fixed-shape step: {count:.0f} kernels, {total:.2f} ms of kernel time per step")
    for c, (k, us) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        print(f"    {c:24s} {k / n:6.0f} kernels {us / n / 1e3:7.3f} ms")
    for name, (k, us) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"    {us / n:9.1f} us {k / n:5.0f}x  {name[:110]}")
    return count, total


def graph_step_ms(dec: Decoder, token, n=64):
    dec.step(token)
    sync(token.device)
    t0 = time.perf_counter()
    for _ in range(n):
        dec.step(token)
    sync(token.device)
    return (time.perf_counter() - t0) / n * 1e3


def run(context=32768, policies=("full",), variants=VARIANTS, profiled=VARIANTS, cap_gib=24.0, shape=None):
    """Print, per policy, the decode step per variant against the floor, and the kernel
    profile of the variants in `profiled`."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda:0" if cuda else "cpu")
    shape = shape or ("llama3-8b" if cuda else "tiny")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), 0)
    model = build_model(shape, dev, "bf16")
    ad = Adapter(model, None, f"random {shape} (bf16)")
    heads = random_heads_dir(ad.info)
    bw = bandwidth(dev)
    wbytes = ad.weights_bytes()
    print(f"weights {wbytes / 2**30:.2f} GiB, bandwidth {bw / 1e9:.0f} GB/s")
    ids = random_ids(context, model.config.vocab_size, 0, dev)
    token = torch.tensor([7], device=dev)
    settings = {"torch": Kernels(window="off", fused="off"), "window": Kernels(fused="off"), "fused": Kernels()}
    for spec in policies:
        cache = KVCache(with_files(spec, heads, None), ad.info)
        ad.info.kernels = Kernels()
        sync(dev)
        t0 = time.perf_counter()
        prefill(ad, cache, ids, 2048)
        sync(dev)
        print(f"== {spec} at {context}: prefill {context / (time.perf_counter() - t0):,.0f} tok/s (fused)")
        floor_ms = (wbytes + cache.bytes_by_tier()["gpu"]) / bw * 1e3
        print(f"   floor {floor_ms:.2f} ms/token")
        for name in variants:
            ad.info.kernels = settings[name]
            with Decoder(ad, cache) as dec:
                ms = graph_step_ms(dec, token)
                print(f"  [{name}] {dec.mode}: {ms:.2f} ms/token = {1e3 / ms:.1f} tok/s, "
                      f"{floor_ms / ms:.2f} of floor")
            if name in profiled:
                ad.info.kernels = settings[name].with_(graphs=False)
                with Decoder(ad, cache, fixed=None if static.reason(cache) else True) as dec:
                    profile_steps(dec, token)
        del cache
        if cuda:
            torch.cuda.empty_cache()
