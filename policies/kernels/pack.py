"""KIVI quantizers: asymmetric codes on a per-group grid, bit-packed along channels, in torch.

Keys are quantized per channel (a group is G consecutive *tokens* of one channel), values
per token (a group is G consecutive *channels* of one token). Both pack their codes along
the channel axis, 32/bits codes per int32 (channel c sits in word c // PK at bit
(c % PK) * bits), so a flush or an eviction only ever appends or rewrites whole rows.

Scales and zeros are stored in the cache dtype (fp16/bf16/fp32). Codes are computed
against the *stored* (rounded) scale and zero, so dequantization reproduces exactly the
grid the codes were chosen on, and re-quantizing a dequantized group gives it back.
"""
from __future__ import annotations

import torch


def per_word(bits: int) -> int:
    """Codes per int32 word (16 at 2 bits, 8 at 4 bits, 4 at 8 bits)."""
    return 32 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] ints in [0, 2^bits) -> int32 words [..., D / (32/bits)]."""
    pk = per_word(bits)
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], codes.shape[-1] // pk, pk)
    shifts = torch.arange(pk, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # < 2^32, exact in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., W] -> codes [..., W * 32/bits] (int32)."""
    pk = per_word(bits)
    shifts = torch.arange(pk, device=words.device, dtype=torch.int32) * bits
    # NOTE: >> on int32 is arithmetic (a negative word fills with ones); the mask keeps the code
    c = (words[..., None] >> shifts) & (2**bits - 1)
    return c.reshape(*words.shape[:-1], words.shape[-1] * pk)


def _grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype):
    """Stored (scale, zero) in `dtype` for groups with min lo and max hi."""
    # NOTE: the epsilon keeps constant groups finite (KIVI's own code divides by zero).
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(torch.finfo(dtype).tiny).to(dtype)
    return scale, lo.to(dtype)


SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # range factors `fit="mse"` tries (1 first)


_SHRINK_ON: dict = {}


def _shrink(device) -> torch.Tensor:
    """SHRINK as a float32 tensor on `device`, made once (no host copy per decode step)."""
    key = str(device)
    if key not in _SHRINK_ON:
        _SHRINK_ON[key] = torch.tensor(SHRINK, dtype=torch.float32, device=device)
    return _SHRINK_ON[key]


def _fit(xg: torch.Tensor, dim: int, bits: int, dtype: torch.dtype, fit: str):
    """Stored (scale, zero) per group along `dim` of xg. fit="minmax": the group's range
    (KIVI as published). fit="mse": of the ranges [mid - a(mid - min), mid + a(max - mid)],
    a in SHRINK, the one with the least squared error after rounding (values past the
    range clamp to the end codes). At 2 bits four levels spread over an outlier's range
    leave most of the group on one or two codes; a narrower range costs the outlier a little
    and the rest a lot less. NOTE: the extremes always clamp onto the end codes, so a
    dequantized group's range is its grid, a = 1 reproduces it with no error, and
    re-quantizing a dequantized group is exact under either fit."""
    lo, hi = xg.amin(dim), xg.amax(dim)
    if fit == "minmax":
        return _grid(lo, hi, bits, dtype)
    if fit != "mse":
        raise ValueError(f"fit must be 'mse' or 'minmax', not {fit!r}")
    # every candidate range at once (a trailing axis of len(SHRINK)): a fixed number of
    # tensor ops whatever the candidates, which matters on CUDA where values are quantized
    # one token per decode step
    a = _shrink(xg.device)
    mid = ((lo + hi) / 2).unsqueeze(-1)
    lo_a, hi_a = mid - a * (mid - lo.unsqueeze(-1)), mid + a * (hi.unsqueeze(-1) - mid)
    lo_a[..., 0], hi_a[..., 0] = lo, hi  # SHRINK[0] == 1: the min/max grid, bit for bit
    sc, zr = _grid(lo_a, hi_a, bits, dtype)  # [..., A]
    s, z = sc.float().unsqueeze(dim), zr.float().unsqueeze(dim)
    xa = xg.unsqueeze(-1)
    err = ((_codes(xa, s, z, bits) * s + z - xa) ** 2).sum(dim)  # [..., A]
    pick = err.argmin(-1, keepdim=True)  # the first of equal errors: ties keep the wider range
    return sc.gather(-1, pick).squeeze(-1), zr.gather(-1, pick).squeeze(-1)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.floor((x - zero.float()) / scale.float() + 0.5)
    return q.clamp_(0, 2**bits - 1)


def quantize_keys(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype, fit: str = "mse"):
    """Per-channel keys x [H, N, D] (N a multiple of group) -> (codes [H, N, D/PK] int32,
    scale [H, N/G, D], zero [H, N/G, D]) with scale/zero in `dtype`; `fit` see `_fit`."""
    h, n, d = x.shape
    xg = x.float().reshape(h, n // group, group, d)
    scale, zero = _fit(xg, 2, bits, dtype, fit)  # [H, N/G, D]
    codes = _codes(xg, scale[:, :, None], zero[:, :, None], bits).reshape(h, n, d)
    return pack(codes, bits), scale, zero


def dequantize_keys(codes, scale, zero, bits: int, group: int) -> torch.Tensor:
    """(codes [H, N, D/PK], scale/zero [H, N/G, D]) -> float32 [H, N, D]."""
    c = unpack(codes, bits).float()
    h, n, d = c.shape
    c = c.view(h, n // group, group, d)  # scale/zero broadcast over each group's tokens
    return (c * scale.float()[:, :, None] + zero.float()[:, :, None]).view(h, n, d)


def quantize_values(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype, fit: str = "mse"):
    """Per-token values x [H, N, D] -> (codes [H, N, D/PK] int32, scale/zero [H, N, D/G])."""
    h, n, d = x.shape
    xg = x.float().reshape(h, n, d // group, group)
    scale, zero = _fit(xg, 3, bits, dtype, fit)  # [H, N, D/G]
    codes = _codes(xg, scale[..., None], zero[..., None], bits).reshape(h, n, d)
    return pack(codes, bits), scale, zero


def dequantize_values(codes, scale, zero, bits: int, group: int) -> torch.Tensor:
    """(codes [H, N, D/PK], scale/zero [H, N, D/G]) -> float32 [H, N, D]."""
    c = unpack(codes, bits).float()
    h, n, d = c.shape
    c = c.view(h, n, d // group, group)  # scale/zero broadcast over each group's channels
    return (c * scale.float()[..., None] + zero.float()[..., None]).view(h, n, d)
