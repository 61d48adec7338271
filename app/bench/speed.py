"""`bench speed`: prefill and decode tok/s per policy against context length, with
transformers' own `generate` (default cache, and its QuantizedCache) in the same run,
reported as ratios to our `full` at the same length.

With `rounds` > 1 every row's cache is prefilled once and kept, then decode is timed in
that many rounds, the rows in turn within a round: on a shared machine whose load drifts
a row and `full` are timed minutes apart otherwise. Decode tok/s is then the median over
rounds, and `decode_vs_full` the median of the per-round ratios; transformers' caches are
stepped through the model's forward (a one-pass prefill, as `generate` does)."""
from __future__ import annotations

import statistics
import time

import torch

from app.runtime.decode import Decoder
from app.runtime.prefill import prefill
from policies import KVCache

from .common import (Bar, decode_steps, hf_attention, plot, random_ids, sync, table, timed_prefill_decode, warm_up,
                     write_json)
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


def _ours_live(ad, spec, ids, chunk):
    """Prefill a kept cache -> (prefill s, step(n) -> seconds for n greedy decode steps)."""
    warm_up(ad, chunk)
    cache = KVCache(spec, ad.info)
    sync(ad.info.device)
    t0 = time.perf_counter()
    logits = [prefill(ad, cache, ids, chunk)]
    sync(ad.info.device)
    pre = time.perf_counter() - t0
    logits[0] = decode_steps(ad, cache, logits[0], 1)  # untimed: kernels compile, graphs capture

    def step(n):
        with Decoder(ad, cache) as dec:
            sync(ad.info.device)
            t = time.perf_counter()
            logits[0] = decode_steps(ad, cache, logits[0], n, dec)
            sync(ad.info.device)
            return time.perf_counter() - t
    return pre, step


def _hf_live(ad, ids, quantized: int | None):
    """transformers' model forward with its own cache (DynamicCache, or QuantizedCache over
    quanto), one-pass prefill -> (prefill s, step(n) -> seconds)."""
    model, kw = ad.model, {}
    if quantized:
        from transformers.cache_utils import QuantizedCache
        kw["cache"] = QuantizedCache("quanto", model.config, nbits=quantized, residual_length=128)
    state = {}

    def forward(x, **extra):
        with hf_attention(model), torch.inference_mode():
            out = model(x[None], use_cache=True, logits_to_keep=1, **extra)
        state["cache"], state["logits"] = out.cache, out.logits[0, -1]

    sync(ad.info.device)
    t0 = time.perf_counter()
    forward(ids, **kw)
    sync(ad.info.device)
    pre = time.perf_counter() - t0
    forward(state["logits"].argmax().view(1), cache=state["cache"])  # untimed

    def step(n):
        sync(ad.info.device)
        t = time.perf_counter()
        for _ in range(n):
            forward(state["logits"].argmax().view(1), cache=state["cache"])
        sync(ad.info.device)
        return time.perf_counter() - t
    return pre, step


def _rounds(ad, names, ids, chunk, decode, rounds, files, bar) -> list[dict]:
    """Rows for one length: every cache prefilled and kept, decode timed in interleaved rounds."""
    rows, live = {}, {}
    for name in names:
        row = rows[name] = {"policy": name, "context": len(ids)}
        try:
            if name.startswith("hf "):
                pre, live[name] = _hf_live(ad, ids, 4 if "Quantized" in name else None)
            else:
                pre, live[name] = _ours_live(ad, with_files(name, *files) if files else name, ids, chunk)
            row["prefill_tok_s"] = len(ids) / pre
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        bar.step(f"{name} @ {len(ids)} prefill")
    for _ in range(rounds):
        for name, step in live.items():
            rows[name].setdefault("decode_rounds", []).append(round(decode / step(decode), 3))
    ref = rows.get("full", {})
    for row in rows.values():
        if "decode_rounds" not in row:
            continue
        row["decode_tok_s"] = statistics.median(row["decode_rounds"])
        if "decode_rounds" in ref:
            row["prefill_vs_full"] = round(row["prefill_tok_s"] / ref["prefill_tok_s"], 2)
            row["decode_vs_full"] = round(statistics.median(
                a / b for a, b in zip(row["decode_rounds"], ref["decode_rounds"])), 2)
    return list(rows.values())


def run(rt_or_adapter, policies=DEFAULT_POLICIES, lengths=(1024, 4096), chunk: int = 512, decode: int = 16,
        baselines=BASELINES, out_dir=None, files=None, rounds: int = 1):
    """files: (heads dir, channels file) that each spec gets (random_model.with_files) while its
    row keeps the spec as given: a random-weight model's random heads and channels.
    rounds > 1: decode timed in interleaved rounds over kept caches (see the module doc)."""
    ad = getattr(rt_or_adapter, "adapter", rt_or_adapter)
    vocab = ad.model.config.vocab_size
    names = list(policies) + list(baselines or ())
    rows = []
    bar = Bar(len(names) * len(lengths), "bench speed")
    for n in lengths:
        ids = random_ids(n, vocab, n, ad.info.device)
        if rounds > 1:
            rows += _rounds(ad, names, ids, chunk, decode, rounds, files, bar)
            continue
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
        write_json(out_dir, "speed", rows, {"chunk": chunk, "decode": decode, "rounds": rounds, "model": ad.model_id})
        plot(out_dir / "speed_decode.png", rows, "context", "decode_tok_s", "policy",
             f"decode tok/s vs context ({ad.model_id})")
        plot(out_dir / "speed_prefill.png", rows, "context", "prefill_tok_s", "policy",
             f"prefill tok/s vs context ({ad.model_id})")
    return rows
