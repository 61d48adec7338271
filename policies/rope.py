"""RoPE re-rotation for compacted positions.

Keys are cached after RoPE at the position they were computed with. Moving a kept key
from position p to slot s multiplies it by the rotation R(s - p): R(a)R(b) = R(a+b) for
the unscaled rotation, so an `attention_scaling` factor the model folded into cos/sin
at p is preserved.
"""
from __future__ import annotations

import torch


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [H, T, D] by `delta` positions ([H, T] or [T]); returns a new tensor.

    Only the first 2*len(inv_freq) channels rotate (partial rotary, e.g. Phi-4-mini).
    HF's rotate_half convention: channel i pairs with channel i + rot/2.
    """
    rot = 2 * inv_freq.numel()
    # [H, T, rot/2], or [T, rot/2] broadcast over heads for a shared delta (cos/sin once)
    ang = delta.to(torch.float32)[..., None] * inv_freq.to(x.device, torch.float32)
    cos, sin = ang.cos(), ang.sin()
    xr = x[..., :rot].float()
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)
