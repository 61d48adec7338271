"""Shared pieces of the evicting selectors (`streaming`, `h2o`, `snapkv`, `anchor`,
`lighttransfer`), so each policy file holds only what is new about it.

Budget semantics, the same as `locret` (so comparisons are fair): `plan` holds the last
`local` tokens of a prefill back as its final chunk; after a non-final chunk a layer keeps
`budget` tokens per KV head; after the final chunk it keeps `budget` plus that chunk's
tokens, which are never evicted (the question, when the prompt ends with one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attend, causal_mask


def plan(n: int, size: int, local: int) -> list[int]:
    """Chunk lengths for n new tokens: chunks of `size`, the last `local` held back."""
    body = n - local
    if body <= 0:
        return [n]
    return [min(size, body - s) for s in range(0, body, size)] + ([local] if local else [])


def cap_and_fixed(budget: int, chunk) -> tuple[int, int]:
    """-> (tokens to keep, newest tokens that must stay) after `chunk`."""
    fixed = chunk.n if chunk.final else 0
    return budget + fixed, fixed


def top(scores: torch.Tensor, cap: int, protect: int) -> torch.Tensor:
    """scores [Hkv, n] -> sorted indices [Hkv, cap] of the best, the newest `protect` always in."""
    s = scores.clone()
    n = s.shape[1]
    if protect:
        s[:, n - min(n, protect):] = float("inf")  # NOTE: protect <= cap, so best() takes them all
    return best(s, cap)


def best(s: torch.Tensor, cap: int) -> torch.Tensor:
    """scores [H, n] -> indices [H, cap] of the cap highest, sorted ascending.

    NOTE: ties go to the earlier token, on every device: pooled scores tie by design (a
    window shares its peak), and `topk` breaks ties differently on CPU and CUDA, which
    made the same document keep different tokens on the two.
    """
    return s.sort(dim=1, descending=True, stable=True).indices[:, :cap].sort(dim=1).values


def sinks_recent(n: int, sinks: int, cap: int, heads: int, device) -> torch.Tensor:
    """Indices [heads, cap] of the first `sinks` and the newest `cap - sinks` of n tokens."""
    idx = torch.cat((torch.arange(sinks, device=device), torch.arange(n - (cap - sinks), n, device=device)))
    return idx.expand(heads, -1)


def dense_keys(cache, k, v, extra):
    """Every key/value attention reads, new tokens last: (keys, values) [Hkv, L, D], and the
    number of recalled `extra` tokens in front (their scores are not ours to keep)."""
    ks, vs = cache.store.dense()
    parts_k, parts_v, n_extra = [ks, k], [vs, v], 0
    if extra is not None:
        parts_k.insert(0, extra[0])
        parts_v.insert(0, extra[1])
        n_extra = extra[0].shape[1]
    return torch.cat(parts_k, 1), torch.cat(parts_v, 1), n_extra


def window_probs(q, keys, scale: float, w: int) -> torch.Tensor:
    """Softmax of the last w queries of q [Hq, T, D] over keys [Hkv, L, D] (the last T of
    which are q's own tokens, causal) -> [Hkv, group * w, L] float32."""
    hq, t, d = q.shape
    hkv, n = keys.shape[0], keys.shape[1]
    w = min(w, t)
    g = hq // hkv
    qw = q[:, t - w:].reshape(hkv, g * w, d)
    logits = torch.matmul(qw.float(), keys.float().transpose(1, 2)) * scale  # [Hkv, g*w, L]
    mask = causal_mask(t, n, q.device)
    if mask is not None:
        logits = logits.masked_fill(~mask[t - w:].repeat(g, 1)[None], float("-inf"))
    return logits.softmax(-1)


def attend_plain(q, keys, vals, scale):
    """Attention of q [Hq, T, D] over keys/vals [Hkv, L, D] -> [Hq, T, D]."""
    return attend(q, keys, vals, scale)


def max_pool(s: torch.Tensor, k: int, back: int | None = None) -> torch.Tensor:
    """Max over a window of k neighbours ([H, T] -> [H, T]): a token scores as well as
    the best in its window, so a kept fact keeps the words around it (SnapKV pools its
    scores for the same reason). The window reaches min(back, k//2) tokens back and the rest
    of it ahead (back None: k//2 each way); a token then inherits the score of a peak up to
    k-1-back tokens after it, so the words that lead to a value (its name) stay with it.
    Kept at the chunk's edges by padding."""
    if k <= 1 or s.shape[-1] < 2:
        return s
    b = k // 2 if back is None else min(back, k // 2)
    return F.max_pool1d(F.pad(s[None], (b, k - 1 - b), value=float("-inf")), k, 1)[0]
