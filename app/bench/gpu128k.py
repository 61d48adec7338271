"""`bench gpu128k`: an 8B Llama-3.1-shaped model with random weights, the card capped to
24 GiB (or 12), a 131,072-token prompt then 128 decoded tokens, per policy: peak VRAM,
prefill tok/s, decode tok/s, and decode against the bandwidth floor.

Random weights are fine for memory and speed (neither depends on the values); the
retaining heads are random too, and the output says so. `--shape tiny` runs the same
code on a small model (that is how CI exercises it on a CPU).
"""
from __future__ import annotations

import gc
import traceback

import torch

from policies import KVCache

from .bandwidth import bandwidth, h2d_bandwidth
from .common import Bar, random_ids, table, timed_prefill_decode, warm_up, write_json
from .random_model import build_model, random_channels_file, random_heads_dir, with_files

POLICIES = ("full", "locret:budget=16384,chunk=2048", "locret:budget=16384,chunk=2048+kivi",
            "locret:budget=16384,chunk=2048+kivi+offload", "offload")


def streamed_bytes(cache) -> int:
    """K/V bytes a decode step streams host -> device: every token of host stores."""
    return sum(l.length * cache.info.kv_bytes_per_token() for l in cache.layers
               if l.store.tier == "host")


def run(shape="llama3-8b", context=131072, decode=128, cap_gib=24.0, weights="bf16", policies=POLICIES,
        allow_cpu=False, out_dir=None, offload_decode=16):
    """`offload` alone streams the whole cache over PCIe every decode step (seconds per
    token at 128K): it decodes `offload_decode` tokens, the others `decode`."""
    from app.runtime.adapter import Adapter
    if not torch.cuda.is_available() and not allow_cpu:
        raise SystemExit("bench gpu128k needs a CUDA GPU (none is visible); nothing was measured")
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), 0)
    model = build_model(shape, device, weights)
    ad = Adapter(model, None, f"random {shape} ({weights})")
    heads = random_heads_dir(ad.info) if any("locret" in p for p in policies) else None
    channels = (random_channels_file(ad.info)
                if any(n in p for p in policies for n in ("offload", "doublesparse")) else None)
    bw = bandwidth(device)
    h2d = h2d_bandwidth(device) if device.type == "cuda" and any(p == "offload" for p in policies) else None
    wbytes = ad.weights_bytes()
    print(f"model: {ad.model_id}, weights {wbytes / 2**30:.2f} GiB, cap {cap_gib} GiB, "
          f"bandwidth {bw / 1e9:.0f} GB/s{f', host->device {h2d / 1e9:.1f} GB/s' if h2d else ''}; retaining heads and offload channels are RANDOM (memory and speed only)")
    warm_up(ad, 2048)  # before any peak is measured
    rows = []
    bar = Bar(len(policies), "bench gpu128k")
    ids = random_ids(context, ad.model.config.vocab_size, 0, device)
    for spec in policies:
        real = with_files(spec, heads, channels)
        n_dec = min(decode, offload_decode) if spec == "offload" else decode
        row = {"policy": spec, "context": context, "weights": weights, "cap_gib": cap_gib, "decoded": n_dec}
        cache = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            cache = KVCache(real, ad.info)
            prefill_s, decode_s, row["decode_mode"] = timed_prefill_decode(ad, cache, ids, 2048, n_dec)
            tiers = cache.bytes_by_tier()
            floor = (wbytes + tiers["gpu"]) / bw
            row.update(prefill_tok_s=context / prefill_s, decode_tok_s=n_dec / decode_s,
                       kv_gpu_gib=tiers["gpu"] / 2**30, kv_host_gib=tiers["host"] / 2**30,
                       floor_tok_s=1 / floor, of_floor=(n_dec / decode_s) * floor)
            streamed = streamed_bytes(cache)
            if streamed and h2d:  # copy-bound: against the PCIe floor (copy/compute overlap)
                row.update(pcie_floor_tok_s=h2d / streamed, of_pcie_floor=(n_dec / decode_s) * streamed / h2d)
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory (clean): {str(e).splitlines()[0][:100]}"
        except Exception as e:  # one policy's failure must not lose the others' rows
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            cache = None
            gc.collect()
        if device.type == "cuda":
            row["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        bar.step(spec)
    cols = ["policy", "weights", "cap_gib", "peak_vram_gib", "kv_gpu_gib", "kv_host_gib", "prefill_tok_s",
            "decode_tok_s", "floor_tok_s", "of_floor", "pcie_floor_tok_s", "of_pcie_floor", "decode_mode", "error"]
    print(table(rows, [c for c in cols if any(c in r for r in rows)]))
    if out_dir is not None:
        write_json(out_dir, f"gpu128k-{weights}-{int(cap_gib)}g", rows,
                   {"shape": shape, "bandwidth_Bps": bw, "h2d_Bps": h2d, "weights_bytes": wbytes,
                    "random_heads": True})
    return rows
