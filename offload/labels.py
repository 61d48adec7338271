"""The label cache: keys restricted to calibrated outlier channels, and the scorer over it.

A label is a post-RoPE key's r outlier channels ([Hkv, N, r], the cache dtype). A query
scores N tokens with q[channels]·labelᵀ; for GQA each KV head's score is the sum over its
query heads (linear, so the group's queries are summed first: one [r] vector per head).
"""
from __future__ import annotations

import torch


def take(k: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """k [Hkv, T, D], ch [Hkv, r] -> labels [Hkv, T, r]."""
    return k.gather(2, ch[:, None, :].expand(-1, k.shape[1], -1))


def group_queries(q: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """q [Hq, Tq, D] -> [Hkv, Tq, r] float32: each group's queries summed on its channels."""
    hkv, r = ch.shape
    hq, tq, d = q.shape
    qg = q.reshape(hkv, hq // hkv, tq, d).float().sum(1)  # [Hkv, Tq, D]
    return qg.gather(2, ch[:, None, :].expand(-1, tq, -1))


def scores(q: torch.Tensor, labels: torch.Tensor, ch: torch.Tensor, block: int = 64) -> torch.Tensor:
    """q [Hq, Tq, D] against labels [Hkv, N, r] -> [Hkv, N] float32.

    Several queries (a question's prefill) score a token by their maximum: a token matters
    if any of them would read it. Queries go in blocks so memory stays [Hkv, block, N].
    """
    return grouped_scores(group_queries(q, ch), labels, block)


def grouped_scores(qs: torch.Tensor, labels: torch.Tensor, block: int = 64) -> torch.Tensor:
    """`scores` from group queries qs [Hkv, Tq, r] (`group_queries`) -> [Hkv, N] float32."""
    lab = labels.float().transpose(1, 2)  # [Hkv, r, N]
    out = None
    for s in range(0, qs.shape[1], block):
        part = torch.matmul(qs[:, s:s + block], lab).amax(1)  # [Hkv, N]
        out = part if out is None else torch.maximum(out, part)
    return out


def top(scores_: torch.Tensor, k: int) -> torch.Tensor:
    """scores [Hkv, N] -> indices [Hkv, min(k, N)] of the best, sorted ascending."""
    k = min(k, scores_.shape[1])
    return scores_.topk(k, dim=1).indices.sort(dim=1).values
