"""`bench speed`: prefill and decode tok/s per policy against context length, with
transformers' own `generate` (default cache, and its QuantizedCache) in the same run,
reported as ratios to our `full` at the same length."""
from __future__ import annotations

import time

import torch

from policies import KVCache

from .common import Bar, hf_attention, plot, random_ids, sync, table, timed_prefill_decode, write_json
from .random_model import with_files

DEFAULT_POLICIES = ("full", "kivi", "locret:budget=1024", "locret:budget=1024+kivi")


def _ours(ad, spec, ids, chunk, decode):
    pre, dec, mode = timed_prefill_decode(ad, KVCache(spec, ad.info), ids, chunk, decode)
    return len(ids) / pre, decode / dec, mode


def _hf(ad, ids, decode, quantized: int | None):
    """transformers generate; prefill = time of a 1-token generate, decode from the rest."""
    with hf_attention(ad.model) as model:
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        if quantized:
            kw.update(cache_implementation="quantized",
                      cache_config={"backend": "quanto", "nbits": quantized, "residual_length": 128})
        x = ids[None]
        with torch.inference_mode():
            sync(ad.info.device)
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            sync(ad.info.device)
            t1 = time.perf_counter()
            model.generate(x, max_new_tokens=decode + 1, min_new_tokens=decode + 1, **kw)
            sync(ad.info.device)
            t2 = time.perf_counter()
        pre = t1 - t0
        return len(ids) / pre, decode / max((t2 - t1) - pre, 1e-9)


BASELINES = ("hf generate", "hf QuantizedCache 4-bit")


def run(rt_or_adapter, policies=DEFAULT_POLICIES, lengths=(1024, 4096), chunk: int = 512, decode: int = 16,
        baselines=BASELINES, out_dir=None, files=None):
    """files: (heads dir, channels file) that each spec gets (random_model.with_files) while its
    row keeps the spec as given: a random-weight model's random heads and channels."""
    ad = getattr(rt_or_adapter, "adapter", rt_or_adapter)
    vocab = ad.model.config.vocab_size
    names = list(policies) + list(baselines or ())
    rows = []
    bar = Bar(len(names) * len(lengths), "bench speed")
    for n in lengths:
        ids = random_ids(n, vocab, n, ad.info.device)
        ref = None
        for name in names:
            row = {"policy": name, "context": n}
            try:
                if name == "hf generate":
                    pre, dec = _hf(ad, ids, decode, None)
                elif name.startswith("hf QuantizedCache"):
                    pre, dec = _hf(ad, ids, decode, 4)
                else:
                    spec = with_files(name, *files) if files else name
                    pre, dec, row["decode_mode"] = _ours(ad, spec, ids, chunk, decode)
                row.update(prefill_tok_s=pre, decode_tok_s=dec)
                if name == "full":
                    ref = row
                if ref is not None:
                    row["prefill_vs_full"] = round(pre / ref["prefill_tok_s"], 2)
                    row["decode_vs_full"] = round(dec / ref["decode_tok_s"], 2)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            bar.step(f"{name} @ {n}")
    cols = ["policy", "context", "prefill_tok_s", "decode_tok_s", "prefill_vs_full", "decode_vs_full",
            "decode_mode", "error"]
    print(table(rows, [c for c in cols if any(c in r for r in rows)]))
    if out_dir is not None:
        write_json(out_dir, "speed", rows, {"chunk": chunk, "decode": decode, "model": ad.model_id})
        plot(out_dir / "speed_decode.png", rows, "context", "decode_tok_s", "policy",
             f"decode tok/s vs context ({ad.model_id})")
        plot(out_dir / "speed_prefill.png", rows, "context", "prefill_tok_s", "policy",
             f"prefill tok/s vs context ({ad.model_id})")
    return rows
