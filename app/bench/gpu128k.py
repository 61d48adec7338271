"""`bench gpu128k`: an 8B Llama-3.1-shaped model with random weights, the card capped to
24 GiB (or 12), a 131,072-token prompt then 128 decoded tokens, per policy: peak VRAM,
prefill tok/s, decode tok/s, and decode against the bandwidth floor.

Random weights are fine for memory and speed (neither depends on the values); the
retaining heads are random too, and the output says so. `--shape tiny` runs the same
code on a small model (that is how CI exercises it on a CPU).
"""
from __future__ import annotations

import gc
import tempfile
import time
import traceback

import torch

from policies import KVCache

from .common import Bar, random_ids, sync, table, timed_prefill_decode, warm_up, write_json

POLICIES = ("full", "locret:budget=16384,chunk=2048", "locret:budget=16384,chunk=2048+kivi",
            "locret:budget=16384,chunk=2048+kivi+offload", "offload")
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096),
}


def build_model(shape: str, device: torch.device, weights: str):
    """Random-weight LlamaForCausalLM of the given shape, built in place on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, rms_norm_eps=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if weights == "4bit" else device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if weights == "4bit":
        model = _to_4bit(model, device, dtype)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    return model.eval()


def _to_4bit(model, device, dtype):
    """Materialize a meta-device model on `device`, one decoder layer at a time, with every
    decoder Linear replaced by a bitsandbytes NF4 Linear of random weights (the bf16 model
    never exists whole). NOTE: written for CUDA; not yet run on a GPU (see BENCHMARKS.md)."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        layer.to_empty(device=device)
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    w = torch.randn(mod.out_features, mod.in_features, dtype=dtype, device=device) * 0.02
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=dtype,
                                          quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to(device)
                    setattr(parent, name, q)
        with torch.no_grad():
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        mod.to_empty(device=device)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
        model.model.norm.weight.fill_(1.0)
    with torch.device(device):  # built on meta above: its inv_freq buffer must be recomputed
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model


def _copies_per_s(src: torch.Tensor, dst: torch.Tensor, reps: int) -> float:
    """Copies of src into dst per second (one untimed first)."""
    dst.copy_(src, non_blocking=True)
    sync(dst.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    sync(dst.device)
    return reps / (time.perf_counter() - t0)


def bandwidth(device: torch.device) -> float:
    """Measured device memory bandwidth, bytes/s (a large copy: read + write)."""
    n = 256 * 2**20 if device.type == "cuda" else 64 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    return 2 * n * _copies_per_s(a, torch.empty_like(a), 10)


def h2d_bandwidth(device: torch.device) -> float:
    """Measured pinned host -> device copy bandwidth, bytes/s (PCIe: what `offload` alone
    streams every layer's K/V over, every token)."""
    n = 1 << 30
    bw = n * _copies_per_s(torch.empty(n, dtype=torch.uint8, pin_memory=True),
                           torch.empty(n, dtype=torch.uint8, device=device), 4)
    getattr(torch._C, "_host_emptyCache", lambda: None)()  # the pinned GiB back to the system
    return bw


def streamed_bytes(cache) -> int:
    """K/V bytes a decode step streams host -> device: every token of host stores."""
    return sum(l.length * cache.info.kv_bytes_per_token() for l in cache.layers
               if getattr(l.store, "tier", "") == "host")


def random_heads_dir(info) -> str:
    """Random retaining heads in the heads file format (for memory/speed only)."""
    from policies.locret import RetainingHeads, model_key, save_heads
    d = tempfile.mkdtemp(prefix="vramchat-random-heads-")
    heads = RetainingHeads(info.n_layers, info.hidden_size, 256 if info.hidden_size < 1024 else 1024,
                           info.n_kv_heads)
    save_heads(heads, f"{d}/heads.safetensors", model_key(info), [info.model_id], {"random": True})
    return d


def random_channels_file(info) -> str:
    """A calibration file of random outlier channels (offload's label cache; memory and
    speed only: which channels are chosen changes what is recalled, not what it costs)."""
    from offload.calibrate import save
    from policies.files import model_key
    d = tempfile.mkdtemp(prefix="vramchat-random-channels-")
    g = torch.Generator().manual_seed(0)
    stat = torch.rand(info.n_layers, info.n_kv_heads, info.head_dim, generator=g)
    return str(save(f"{d}/channels.safetensors", stat, 16, model_key(info), [info.model_id], 0, "random (bench)"))


def random_adapter(shape: str, device: str = "auto"):
    """-> (Adapter over a random-weight model of `shape`, (random heads dir, random channels
    file)): what `bench speed --shape` measures where no real model can be loaded."""
    from app.runtime.adapter import Adapter
    dev = torch.device(("cuda:0" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    ad = Adapter(build_model(shape, dev, "bf16"), None, f"random {shape} ({'bf16' if dev.type == 'cuda' else 'fp32'})")
    print(f"model: {ad.model_id}; retaining heads and offload channels are RANDOM (speed only)")
    return ad, (random_heads_dir(ad.info), random_channels_file(ad.info))


def with_files(spec: str, heads: str | None, channels: str | None) -> str:
    """`spec` with heads= on locret and channels_file= on doublesparse and on offload
    behind a selector (`offload` alone keeps every token and needs no channels)."""
    parts = []
    alone = "+" not in spec
    for part in spec.split("+"):
        name, _, opts = part.partition(":")
        extra = {"locret": heads and f"heads={heads}", "offload": channels and not alone and f"channels_file={channels}",
                 "doublesparse": channels and f"channels_file={channels}"}.get(name)
        if extra:
            opts = f"{extra},{opts}" if opts else extra
        parts.append(f"{name}:{opts}" if opts else name)
    return "+".join(parts)


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
