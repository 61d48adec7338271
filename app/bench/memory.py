"""`bench memory`: KV bytes and peak memory per policy against context length, measured,
next to the analytic expectation from the policy's own definition."""
from __future__ import annotations

import gc

import psutil
import torch

from app.runtime.prefill import prefill
from policies import KVCache, Policy, parse_spec
from policies.kivi import bits_of

from .common import Bar, decode_steps, plot, random_ids, sync, table, write_json

DEFAULT_POLICIES = ("full", "kivi", "kivi:bits=4", "locret:budget=1024", "locret:budget=1024+kivi",
                    "streaming:window=1020")


def retained(slots: dict, n: int, chunk: int) -> tuple[int, int]:
    """(tokens per KV head held after reading n tokens, peak while reading) by the policy's
    definition, not by asking the code."""
    sel = slots.get("selector") or Policy("full", "selector", {})
    o = sel.opts
    if sel.name == "locret":
        local = min(o["local"], n)
        body = n - local
        c = o.get("chunk") or chunk
        if body <= o["budget"]:
            return n, n
        return o["budget"] + local, max(o["budget"] + min(c, body), o["budget"] + local)
    if sel.name == "streaming":
        # the final chunk of a prefill is never evicted (policies/evict.py), as in locret
        cap, c = o["sinks"] + o["window"], o.get("chunk") or chunk
        last = n - (-(-n // c) - 1) * c
        return (n, n) if n <= cap else (min(n, cap + last), min(n, cap + c))
    if sel.name == "full":
        return n, n
    return None, None


def token_bytes(slots: dict, info, n_held: int) -> float | None:
    """Bytes all layers hold for n_held tokens per KV head, by the papers' formulas."""
    elt = torch.empty(0, dtype=info.dtype).element_size()
    per = info.n_layers * info.n_kv_heads * info.head_dim  # elements per token, K or V
    meta = 0
    sel = slots["selector"].name if "selector" in slots else "full"
    if sel == "locret":
        meta = info.n_layers * info.n_kv_heads * (8 + 4)  # conversation index int64 + score fp32
    elif sel != "full":
        meta = info.n_layers * info.n_kv_heads * 8
    store = slots.get("store")
    if store is None:
        return n_held * (2 * per * elt + meta)
    if store.name == "kivi":
        o = store.opts
        kbits, vbits = bits_of(o)
        r = min(n_held, o["residual"])
        q_bytes = per * ((kbits + vbits) / 8 + 4 * elt / o["group"])
        return (n_held - r) * q_bytes + r * 2 * per * elt + n_held * meta
    return None


def run(rt_or_adapter, policies=DEFAULT_POLICIES, lengths=(1024, 2048, 4096, 8192), chunk: int = 512,
        decode: int = 16, out_dir=None):
    ad = getattr(rt_or_adapter, "adapter", rt_or_adapter)
    info = ad.info
    vocab = ad.model.config.vocab_size
    rows = []
    bar = Bar(len(policies) * len(lengths), "bench memory")
    proc = psutil.Process()
    for spec in policies:
        slots = parse_spec(spec)
        for n in lengths:
            gc.collect()
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            rss0 = proc.memory_info().rss
            row = {"policy": spec, "context": n}
            try:
                cache = KVCache(spec, info)
                logits = prefill(ad, cache, random_ids(n, vocab, n, info.device), chunk)
                after_prefill = cache.track_peak()
                held_now = cache.length
                decode_steps(ad, cache, logits, decode)
                sync(info.device)
                held, peak_held = retained(slots, n, chunk)
                by_tier = cache.bytes_by_tier()
                kv = by_tier["gpu"] + by_tier["host"]
                # steady state: after `decode` tokens (a store may keep the last prefill chunk
                # at full precision until the next step, so right after prefill is not it)
                expect = token_bytes(slots, info, held + decode) if held is not None else None
                row.update(
                    retained=held_now, expected_retained=held, kv_after_prefill=after_prefill,
                    kv=kv, expected_kv=expect, kv_peak=cache.peak_bytes, kv_host=by_tier["host"],
                    rss_delta=proc.memory_info().rss - rss0,
                    gpu_peak=torch.cuda.max_memory_allocated() if info.device.type == "cuda" else None)
                if expect:
                    row["measured/expected"] = round(kv / expect, 3)
            except Exception as e:  # one row's failure (e.g. out of memory) is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            finally:
                cache = None
            rows.append(row)
            bar.step(f"{spec} @ {n}")
    cols = ["policy", "context", "retained", "expected_retained", "kv_after_prefill", "kv", "expected_kv",
            "measured/expected", "kv_peak", "kv_host", "rss_delta", "gpu_peak", "error"]
    print(table(rows, [c for c in cols if any(c in r for r in rows)]))
    if out_dir is not None:
        write_json(out_dir, "memory", rows, {"chunk": chunk, "decode": decode, "model": ad.model_id})
        plot(out_dir / "memory.png", [r for r in rows if "kv_peak" in r], "context", "kv_peak", "policy",
             f"KV cache peak bytes vs context ({ad.model_id})", logy=True)
    return rows
