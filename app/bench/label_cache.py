"""Part `labels` of `bench quality`: what storing offload's label cache compactly costs in recall.

A pass-key prompt (the passkey part's depths and seeds) at the longest of --lengths is read
by `locret+offload`. With labels in the cache dtype, the question's ranking of the host
tokens (its group queries against every label: what `recall` keeps) is taken again with the
same labels stored as fp16 and as int8; per kind: the overlap of its top `recall` with the
cache dtype's, the share of the needle's evicted tokens it ranks in, and the label bytes.
Then the shipped kind (int8) reads the same prompt end to end: the overlap of what it
recalled with the cache dtype's run, and both answers.
"""
from __future__ import annotations

import torch

from offload import labels

from .common import greedy
from .kvbits import depths
from .locret import NEEDLE, passkey_prompt
from .precision import pooled, span_shares

KINDS = ("model", "fp16", "int8")


def _read(rt, spec: str, ids: list[int], kind: str, max_new: int = 12):
    """Prefill ids under `spec` with labels stored as `kind` -> (answer, spills)."""
    was, labels.KIND = labels.KIND, kind
    try:
        rt.reset_cache(spec)
    finally:
        labels.KIND = was
    logits = rt.prefill(ids)
    spills = [layer.spill for layer in rt.cache.layers]
    recalled = [sp.recalled.clone() for sp in spills]  # [Hkv, m] conversation indices, before decoding
    return greedy(rt, logits, max_new), spills, recalled


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over heads of |a ∩ b| / |b| for index sets a, b [H, k]."""
    return sum(len(set(x.tolist()) & set(y.tolist())) / max(1, len(y)) for x, y in zip(a, b)) / len(b)


def run(rt, n: int, trials: int, spec: str = "locret+offload", progress=None) -> list[dict]:
    rows = []
    for i, d in enumerate(depths(trials)):
        ids, key = passkey_prompt(rt, n, d, seed=100 * i + n)
        needle = rt.tok(" " + NEEDLE.format(key=key) + " ", add_special_tokens=False)["input_ids"]
        at = next(j for j in range(len(ids) - len(needle) + 1) if ids[j:j + len(needle)] == needle)
        span = set(range(at, at + len(needle)))
        answer, spills, recalled = _read(rt, spec, ids, "model")
        stats = {k: {"overlap": [], "needle": [], "bytes": 0} for k in KINDS}
        for sp in spills:
            n_host, k = sp.n, sp.n_recall
            exact = sp.labels[:, :n_host]  # float32 [Hkv, n, r]
            conv = sp.hpos[:, :n_host]
            ref = pooled(sp.labels.scores(sp._qs, n_host), conv, sp.pool).topk(min(k, n_host), 1).indices.cpu()
            for kind in KINDS:
                lc = labels.LabelCache(exact.shape[0], exact.shape[2], sp.info.dtype, exact.device, kind)
                lc.grow(sp.labels.capacity, 0)
                lc.write(0, exact)
                top = pooled(lc.scores(sp._qs, n_host), conv, sp.pool).topk(min(k, n_host), 1).indices.cpu()
                stats[kind]["overlap"].append(_overlap(top, ref))
                stats[kind]["bytes"] += lc.nbytes()
                stats[kind]["needle"] += [x for x in span_shares(conv, conv.gather(1, top), span) if x is not None]
        short, _, short_recalled = _read(rt, spec, ids, labels.KIND)
        for kind in KINDS:
            s = stats[kind]
            row = {"kind": "labels", "policy": spec, "tokens": len(ids), "depth": round(d, 2), "labels": kind,
                   "label_bytes": s["bytes"], "topk_overlap": round(sum(s["overlap"]) / len(s["overlap"]), 4),
                   "needle_ranked": round(sum(s["needle"]) / max(1, len(s["needle"])), 4)}
            if kind == "model":
                row.update(answer=answer, correct=key in answer)
            if kind == labels.KIND:  # the shipped kind, end to end
                row.update(recalled_overlap=round(sum(_overlap(a, b) for a, b in zip(short_recalled, recalled))
                                                  / len(recalled), 4), answer=short, correct=key in short)
            rows.append(row)
            if progress:
                progress(row)
    return rows


COLUMNS = ["depth", "labels", "label_bytes", "topk_overlap", "needle_ranked", "recalled_overlap", "correct",
           "answer"]
