"""Reference attention over a cache: dense, causal among the new tokens, GQA-aware.

Every store that keeps full-precision tensors attends through `attend`; quantized or
sparse stores bring their own kernels and test against this function.

Layer rules. What a model's attention does beyond softmax(q·kᵀ·scale) — a sliding window
(Mistral, Phi-3, Gemma's local layers), logit soft-capping (Gemma 2) — is set for the
duration of one layer's cache call by `rules(...)` (the adapter does it per layer, from the
layer's own attention arguments), and `attend`, `attend_with_mass` and `attend_window`
apply it. NOTE: a window counts stored positions: key j of L is visible to new token i of T
when (L - T + i) - j < window, i.e. by distance in the cache's frame (compacted positions
after an eviction), which without eviction is the model's own distance. Paths that attend
elsewhere (quantized or sparse kernels) cannot apply them: the adapter refuses those
policies on such models.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

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


_RULES: ContextVar[tuple[int, float]] = ContextVar("vramchat_attention_rules", default=(0, 0.0))


@contextmanager
def rules(window: int | None = 0, softcap: float | None = 0.0):
    """Within: attention keeps keys within `window` tokens of each query (0: all) and caps
    logits at `softcap` (0: none)."""
    token = _RULES.set((int(window or 0), float(softcap or 0.0)))
    try:
        yield
    finally:
        _RULES.reset(token)


def band_mask(n_new: int, n_keys: int, window: int, device) -> torch.Tensor:
    """Bool mask [n_new, n_keys]: causal (bottom-right aligned), and within `window` (0: all)."""
    q = torch.arange(n_new, device=device)[:, None] + (n_keys - n_new)
    k = torch.arange(n_keys, device=device)[None, :]
    keep = k <= q
    return keep & (q - k < window) if window else keep


def _logits(q, k, scale: float, softcap: float) -> torch.Tensor:
    """q [Hq, Tq, D], k [Hkv, L, D] -> float32 logits [Hkv, G*Tq, L] (query heads of a KV
    group stacked), soft-capped."""
    hkv, d = k.shape[0], q.shape[2]
    s = torch.matmul(q.reshape(hkv, -1, d).float(), k.float().transpose(1, 2)) * scale
    return softcap * torch.tanh(s / softcap) if softcap else s


def _attend_ruled(q, k, v, scale: float, window: int, softcap: float, mass: bool = False):
    """`attend` under layer rules, in explicit logits (SDPA caps nothing): -> out [Hq, Tq, D]
    (and with mass=True the [Hkv, L] probability mass, as `attend_with_mass`)."""
    hq, tq, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    s = _logits(q, k, scale, softcap)  # [Hkv, g*Tq, L]
    keep = band_mask(tq, n, window, q.device)
    s = s.masked_fill(~keep.repeat(g, 1)[None], float("-inf"))
    p = s.softmax(-1)
    out = torch.matmul(p.to(v.dtype), v).reshape(hq, tq, d).to(q.dtype)
    return (out, p.sum(1)) if mass else out


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
    window, softcap = _RULES.get()
    if softcap or (window and k.shape[1] > window):
        return _attend_ruled(q, k, v, scale, window, softcap)
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
    window, softcap = _RULES.get()
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if window:  # the query is the last valid key; a count, not an index: no host sync
        at = valid.sum() - 1
        valid = valid & (at - torch.arange(n, device=valid.device) < window)
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
    window, softcap = _RULES.get()
    if softcap or window:
        return _attend_ruled(q, k, v, scale, window, softcap, mass=True)
    g = hq // hkv
    qg = q.reshape(hkv, g * tq, d)
    logits = torch.matmul(qg.float(), k.float().transpose(1, 2)) * scale  # [Hkv, g*Tq, L]
    mask = causal_mask(tq, n, q.device)
    if mask is not None:
        logits = logits.masked_fill(~mask.repeat(g, 1)[None], float("-inf"))
    probs = logits.softmax(-1)
    out = torch.matmul(probs.to(v.dtype), v).reshape(hq, tq, d)
    return out, probs.sum(1)
