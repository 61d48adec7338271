"""Part `kvbits` of `bench quality`: what a store's bits cost, spec by spec.

For each spec (default: `kivi` at K2V2, K4V2, K2V4, K4V4, K8V2, K8V4 and `full`): next-token KL
from `full` on real prose (the KL part's protocol: a 2K-token prefix, 32 teacher-forced
tokens), the store's bytes per token over all layers (`Store.token_bytes`: a quantized
token's codes, scales and zeros; `full` keeps K and V in the cache dtype), KV peak bytes,
and the pass key at each length (the passkey part's depths and seeds), answers kept in the
JSON (`--trials 0`: KL and bytes only). Any spec runs (`--policies "locret locret+kivi:kbits=4,vbits=2"`): the stacks'
pass-key rows at 4K and 16K come from the same part.
"""
from __future__ import annotations

import torch

from . import baselines
from .locret import trial

SPLITS = ("kivi:kbits=2,vbits=2", "kivi:kbits=4,vbits=2", "kivi:kbits=2,vbits=4", "kivi:kbits=4,vbits=4",
          "kivi:kbits=8,vbits=2", "kivi:kbits=8,vbits=4")
DEFAULT = ("full",) + SPLITS


def depths(trials: int) -> list[float]:
    """The passkey part's depths (baselines.run): 0.1..0.9, or the middle for one trial."""
    return [0.1 + 0.8 * i / (trials - 1) for i in range(trials)] if trials > 1 else [0.5]


def token_bytes(rt, spec: str) -> float:
    """Bytes per stored token over all layers of a fresh `spec` cache (K + V)."""
    return sum(layer.store.token_bytes() for layer in rt.adapter.new_cache(spec).layers)


def run(rt, specs=DEFAULT, lengths=(4096,), trials: int = 10, kl_tokens: int = 2048, kl_next: int = 32,
        progress=None) -> list[dict]:
    """One row per spec: kl_nats, bytes_per_token, kv_peak_bytes, passkey_<n> ("c/trials")."""
    prose = rt.tokens(baselines.PROSE.read_text()[:40 * kl_tokens])
    target = torch.tensor(prose[kl_tokens:kl_tokens + kl_next])[:, None]
    ref = baselines.teacher_forced(rt, "full", prose, kl_tokens, kl_next)[0]
    rows = []
    for spec in specs:
        lp, _, _, peak = baselines.teacher_forced(rt, spec, prose, kl_tokens, kl_next)
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        row = {"kind": "kvbits", "policy": spec, "kl_nats": round(kl, 5),
               "ppl": round(float(torch.exp(-lp.float().gather(1, target).mean())), 3),
               "bytes_per_token": round(token_bytes(rt, spec)), "kv_peak_bytes": peak, "answers": {}}
        for n in lengths if trials else ():  # trials 0: KL and bytes only
            if rt.window and n > rt.window and not rt.cache.evicts:  # (the cache teacher_forced left)
                row[f"passkey_{n}"] = f"not run: keeps every position past the {rt.window:,}-token window"
                continue
            got = [trial(rt, spec, n, d, seed=100 * i + n, max_new=12) for i, d in enumerate(depths(trials))]
            row[f"passkey_{n}"] = f"{sum(g['correct'] for g in got)}/{trials}"
            row["answers"][n] = [g["answer"] for g in got]
        rows.append(row)
        if progress:
            progress(row)
    return rows


def columns(rows: list[dict]) -> list[str]:
    keys = [k for k in rows[0] if k.startswith("passkey_")] if rows else []
    return ["policy", "kl_nats", "ppl", "bytes_per_token", "kv_peak_bytes"] + keys
