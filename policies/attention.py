"""Reference attention over a cache: dense, causal among the new tokens, GQA-aware.

Every store that keeps full-precision tensors attends through `attend`; quantized or
sparse stores bring their own kernels and test against this function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # NOTE: torch >= 2.5; without it CUDA falls back to the mask path below
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    # NOTE: cuDNN attention (torch's first choice on Hopper) builds a new execution graph
    # for every new key length (measured on an H100: ~34 ms of CPU per call, so ~1 s per
    # decoded token on a 32-layer model); chunked prefill and decode change the length at
    # every call. Flash attention takes any length at no set-up cost and does GQA.
    _CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # pragma: no cover
    sdpa_kernel = None


def causal_mask(n_new: int, n_keys: int, device) -> torch.Tensor | None:
    """Bool mask [n_new, n_keys]: query i sees every cached key and new keys 0..i.

    NOTE: the new tokens are the *last* n_new keys (bottom-right aligned causal mask).
    """
    if n_new == 1:
        return None
    past = n_keys - n_new
    q = torch.arange(n_new, device=device)[:, None]
    k = torch.arange(n_keys, device=device)[None, :]
    return k <= q + past


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hq, Tq, D] attends k/v [Hkv, L, D] whose last Tq rows are its own tokens.

    Returns [Hq, Tq, D] in q's dtype.
    """
    if q.shape[1] == 1 and q.device.type == "cpu":
        # Decode on CPU: two batched GEMVs over each KV group are ~3x faster than SDPA's
        # enable_gqa path (measured: 1.1 vs 3.4 ms at 4K keys, 9/3 heads, 1 thread).
        hkv, d = k.shape[0], q.shape[2]
        s = torch.matmul(q.reshape(hkv, -1, d), k.transpose(1, 2)).float() * scale  # [Hkv, G, L]
        return torch.matmul(s.softmax(-1).to(v.dtype), v).reshape(q.shape)
    gqa = q.shape[0] != k.shape[0]
    if q.device.type == "cuda" and sdpa_kernel is not None:
        # bottom-right causal as a bias object, so flash attention (no dense mask) runs it
        mask = causal_lower_right(q.shape[1], k.shape[1]) if q.shape[1] > 1 else None
        with sdpa_kernel(_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale,
                                                  enable_gqa=gqa)[0]
    mask = causal_mask(q.shape[1], k.shape[1], q.device)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale,
                                          enable_gqa=gqa)[0]


def attend_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  valid: torch.Tensor) -> torch.Tensor:
    """One decode token q [Hq, 1, D] over a fixed span k/v [Hkv, n, D] of which only the
    keys where valid [n] (bool) is set count (the rest must hold finite values: they get
    weight 0). Fixed shapes: what a captured CUDA graph replays while the span fills up.
    Returns [Hq, 1, D] in q's dtype.

    The query heads of a KV group attend as that head's G queries (no K/V expansion), and
    P @ V is split along the keys into `_splits(n)` batched products summed afterwards:
    with one query token a fused attention kernel gets one thread block per KV head (8 on
    an 8B model: measured ~20 tok/s at 32K on an H100), the split gives hundreds.
    """
    hq, _, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    s = torch.matmul(q.reshape(hkv, g, d), k.transpose(1, 2)).float() * scale  # [Hkv, G, n]
    p = s.masked_fill(~valid, float("-inf")).softmax(-1).to(v.dtype)
    m = _splits(n)
    out = torch.matmul(p.view(hkv, g, m, n // m).transpose(1, 2), v.view(hkv, m, n // m, d))  # [Hkv, m, G, D]
    return out.sum(1, dtype=torch.float32).to(q.dtype).reshape(hq, 1, d)


def _splits(n: int) -> int:
    """Pieces of at least 256 keys, a power of two (at most 64) that divides n."""
    m = 1
    while m < 64 and n % (2 * m) == 0 and n // (2 * m) >= 256:
        m *= 2
    return m


def attend_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Like `attend`, also returning the attention mass each key received.

    mass [Hkv, L] float32: softmax probabilities summed over the queries and over the
    query heads of each KV group (H2O's accumulated-attention statistic).
    """
    hq, tq, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    qg = q.reshape(hkv, g * tq, d)
    logits = torch.matmul(qg.float(), k.float().transpose(1, 2)) * scale  # [Hkv, g*Tq, L]
    mask = causal_mask(tq, n, q.device)
    if mask is not None:
        logits = logits.masked_fill(~mask.repeat(g, 1)[None], float("-inf"))
    probs = logits.softmax(-1)
    out = torch.matmul(probs.to(v.dtype), v).reshape(hq, tq, d)
    return out, probs.sum(1)
