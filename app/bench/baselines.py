"""`bench quality` measurements: every KV policy at matched KV bytes on the default model (CPU).

Rows from `run(...)`:
- kind "passkey": a pass key hidden in prose at depth 0.1..0.9 of an n-token chat prompt
  (inside the 8K window and beyond it), greedy answer contains the key?
- kind "kl": prefill `kl_tokens` of real prose, then teacher-force the next `kl_next`
  tokens one by one; mean next-token KL(full || policy) in nats, peak KV bytes, prefill and
  decode tok/s (the `full` row of the same run is the reference).
- kind "ffnskip": short factual questions the model answers correctly under `full`; answers
  under `ffnskip` still correct?, skip ratio, decode tok/s of both.
- kind "lazy": lighttransfer's lazy layers and per-layer bytes vs `full` at `kl_tokens`.

Prose: `data/train/python_topics.txt` (PSF-licensed CPython docs) for KL; the pass-key
haystack is `app.bench.locret`'s (data/haystack/licenses.txt). Matched bytes: every
evicting policy keeps `budget` tokens per KV head (lighttransfer cannot be matched: its
non-lazy layers keep everything; its row says what it holds).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from app.runtime.decode import Decoder

from .common import hf_attention
from .locret import trial

PROSE = Path(__file__).resolve().parents[2] / "data" / "train" / "python_topics.txt"
QUESTIONS = [  # (question, substring a correct answer contains)
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What is the chemical symbol for gold?", "Au"), ("How many days are in a week?", "seven"),
    ("What color is the sky on a clear day?", "blue"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What is the capital of Spain?", "Madrid"), ("What planet is known as the Red Planet?", "Mars"),
]


def policies_at(budget: int, chunk: int) -> dict[str, str]:
    """name -> spec, every evicting one holding `budget` tokens per KV head."""
    return {
        "full": "full",
        "streaming": f"streaming:sinks=4,window={budget - 4},chunk={chunk}",
        "h2o": f"h2o:budget={budget},recent={budget // 4},chunk={chunk}",
        "snapkv": f"snapkv:budget={budget},chunk={chunk}",
        "anchor": f"anchor:budget={budget},chunk={chunk}",
        "locret": f"locret:budget={budget},chunk={chunk}",
        "lighttransfer": f"lighttransfer:window={budget - 4},chunk={chunk}",
    }


def passkey(rt, spec: str, n: int, depth: float, seed: int, max_new: int = 12) -> bool:
    return trial(rt, spec, n, depth, seed, max_new=max_new)["correct"]


def teacher_forced(rt, spec: str, ids: list[int], n_prefill: int, n_next: int):
    """-> (log-probs [n_next, V] of tokens n_prefill.., prefill s, decode s, peak bytes)."""
    rt.reset_cache(spec)
    t0 = time.perf_counter()
    logits = rt.prefill(ids[:n_prefill])
    t1 = time.perf_counter()
    rows = [logits.log_softmax(-1)]
    with Decoder(rt.adapter, rt.cache) as dec:
        for tok in ids[n_prefill:n_prefill + n_next - 1]:
            rows.append(dec.step(tok).log_softmax(-1))
    t2 = time.perf_counter()
    return torch.stack(rows), t1 - t0, t2 - t1, rt.cache.peak_bytes


def hf_quantized(rt, ids: list[int], n_prefill: int, n_next: int, bits: int, axis: int, group: int = 32,
                 residual: int = 128):
    """The peer of `kivi`: transformers' own `QuantizedCache` (quanto backend), same group
    and residual, axis 0 (transformers' default) or -1 for keys and values; one-pass
    prefill, then teacher-forced. -> (log-probs [n_next, V], prefill s, decode s)."""
    from transformers.cache_utils import QuantizedCache
    with hf_attention(rt.adapter.model) as model:
        cache = QuantizedCache("quanto", model.config, nbits=bits, axis_key=axis, axis_value=axis,
                               q_group_size=group, residual_length=residual)
        x = torch.tensor(ids[:n_prefill + n_next], device=rt.device)[None]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(x[:, :n_prefill], past_key_values=cache, use_cache=True)
            rows = [out.logits[0, -1].float().log_softmax(-1)]
            t1 = time.perf_counter()
            for i in range(n_prefill, n_prefill + n_next - 1):
                out = model(x[:, i:i + 1], past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1].float().log_softmax(-1))
        return torch.stack(rows), t1 - t0, time.perf_counter() - t1


def _kl_row(policy, ref, lp, target, n, tp, td, threads, **extra) -> dict:
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
    return {"kind": "kl", "policy": policy, "tokens": n, "next": lp.shape[0], "kl_nats": round(kl, 5),
            "ppl_full": round(_ppl(ref, target), 3), "ppl_spec": round(_ppl(lp, target), 3), **extra,
            "prefill_tok_s": round(n / tp, 1), "decode_tok_s": round((lp.shape[0] - 1) / td, 2), "threads": threads}


def _ppl(lp: torch.Tensor, target: torch.Tensor) -> float:
    """Perplexity of target [n, 1] under log-probs lp [n, V]."""
    return float(torch.exp(-lp.float().gather(1, target).mean()))


def answer(rt, spec: str, q: str, max_new: int):
    rt.reset_cache(spec)
    rt.conv.messages.clear()
    return rt.ask(q, max_new_tokens=max_new)


def _usable(rt, spec: str, rows: list, progress) -> bool:
    """False (and a row saying why) for a policy this model cannot run, e.g. no locret heads."""
    from policies import SpecError
    try:
        rt.adapter.new_cache(spec)
        return True
    except SpecError as e:
        rows.append({"kind": "skipped", "policy": spec, "why": str(e)})
        if progress:
            progress(rows[-1])
        return False


def run(rt=None, names=None, budget: int = 1024, chunk: int = 512, lengths=(4096, 12288), trials: int = 2,
        kl_tokens: int = 2048, kl_next: int = 32, questions: int = 10, ffn_spec: str = "ffnskip",
        threads: int = 2, parts=("kl", "lazy", "passkey", "ffnskip"), kl_extra=(), peer_bits=(),
        peer_group: int = 32, skip_missed: bool = False, progress=print) -> list[dict]:
    """Rows of measurements (see the module docstring); `progress(row)` as each one lands.
    `kl_extra`: more specs (e.g. stores, readers) measured in the KL part only; `peer_bits`:
    `kivi` at these bits against transformers' `QuantizedCache` in the KL part; `skip_missed`:
    a policy (other than the reference `full`) that misses a pass key at one length is not
    run at the longer ones, and a row says so: with the same budget a longer document only
    evicts more (a quick tour; name the policies to run every cell)."""
    torch.set_num_threads(threads)
    if rt is None:
        from app.runtime.engine import Runtime
        rt = Runtime.load(None, device="cpu")
    specs = policies_at(budget, chunk)
    rows: list[dict] = []
    names = [n for n in (names or list(specs)) if _usable(rt, specs[n], rows, progress)]

    def emit(row):
        rows.append(row)
        if progress:
            progress(row)

    prose = rt.tokens(PROSE.read_text()[:40 * kl_tokens])
    if "kl" in parts:
        ref = None
        target = torch.tensor(prose[kl_tokens:kl_tokens + kl_next])[:, None]
        extra = [s for s in kl_extra if _usable(rt, s, rows, progress)]
        for spec in ["full"] + [specs[n] for n in names if n != "full"] + extra:
            lp, tp, td, peak = teacher_forced(rt, spec, prose, kl_tokens, kl_next)
            ref = lp if ref is None else ref
            emit(_kl_row(spec, ref, lp, target, kl_tokens, tp, td, threads, kv_peak_bytes=peak))
        for bits in peer_bits:  # kivi vs transformers' QuantizedCache, both with a one-pass prefill
            chunk0, rt.chunk_size = rt.chunk_size, kl_tokens
            try:
                lp, tp, td, peak = teacher_forced(rt, f"kivi:bits={bits},group={peer_group}", prose, kl_tokens,
                                                  kl_next)
            finally:
                rt.chunk_size = chunk0
            emit(_kl_row(f"kivi:bits={bits},group={peer_group} (one-pass prefill)", ref, lp, target, kl_tokens, tp, td, threads,
                         kv_peak_bytes=peak))
            for axis in (0, -1):
                name = f"hf QuantizedCache quanto {bits}-bit G={peer_group} R=128 axis={axis}"
                try:
                    lp, tp, td = hf_quantized(rt, prose, kl_tokens, kl_next, bits, axis, group=peer_group)
                except ImportError as e:
                    emit({"kind": "skipped", "policy": name, "why": f"{e} (pip install -e .[bench])"})
                    break
                emit(_kl_row(name, ref, lp, target, kl_tokens, tp, td, threads))
    if "lazy" in parts and "lighttransfer" in names:
        for spec in (specs["lighttransfer"], specs["lighttransfer"] + "+kivi"):  # kivi: non-lazy layers only
            rt.reset_cache(spec)
            rt.prefill(prose[:kl_tokens])
            plan = rt.cache.layers[0].selector.shared
            per = [sum(l.nbytes().values()) for l in rt.cache.layers]
            full_per = kl_tokens * rt.adapter.info.kv_bytes_per_token()
            emit({"kind": "lazy", "policy": spec, "tokens": kl_tokens,
                  "lazy_layers": sorted(plan.lazy), "ratios": {i: round(r, 3) for i, r in sorted(plan.ratios.items())},
                  "layer_stores": [type(l.store).__name__ for l in rt.cache.layers],
                  "layer_bytes": per, "kv_bytes": sum(per), "full_kv_bytes_used": full_per * len(per),
                  "saved": round(1 - sum(per) / (full_per * len(per)), 3)})
    if "passkey" in parts:
        for name in names:
            missed = None  # (tokens, correct) where this policy missed a pass key
            for n in sorted(lengths):
                if skip_missed and missed is not None and name != "full":
                    emit({"kind": "passkey", "policy": specs[name], "tokens": n, "trials": trials,
                          "skipped": f"not run: {missed[1]}/{trials} at {missed[0]:,} tokens"})
                    continue
                depths = [0.1 + 0.8 * i / max(1, trials - 1) for i in range(trials)] if trials > 1 else [0.5]
                ok = [passkey(rt, specs[name], n, d, seed=100 * i + n) for i, d in enumerate(depths)]
                emit({"kind": "passkey", "policy": specs[name], "tokens": n, "trials": trials,
                      "correct": sum(ok), "accuracy": sum(ok) / trials})
                if not all(ok) and missed is None:
                    missed = (n, sum(ok))
    if "ffnskip" in parts:
        base = [(q, a, answer(rt, "full", q, 24)) for q, a in QUESTIONS]
        good = [(q, a, r) for q, a, r in base if a.lower() in r.answer.lower()][:questions]
        kept, ratios, dense_s, skip_s = 0, [], [], []
        for q, a, r in good:
            s = answer(rt, ffn_spec, q, 24)
            kept += a.lower() in s.answer.lower()
            ratios.append(s.ffn_skip_ratio or 0.0)
            dense_s.append(r.decode_tok_s)
            skip_s.append(s.decode_tok_s)
        n = max(1, len(good))
        emit({"kind": "ffnskip", "policy": ffn_spec, "questions": len(good), "correct_full": len(good),
              "correct_ffnskip": kept, "skip_ratio": round(sum(ratios) / n, 3),
              "decode_tok_s_full": round(sum(dense_s) / n, 2), "decode_tok_s_ffnskip": round(sum(skip_s) / n, 2),
              "speedup": round(sum(skip_s) / max(sum(dense_s), 1e-9), 3)})
    return rows
