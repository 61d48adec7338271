"""One Triton kernel each for the small steps of a decoder layer: RMSNorm and RoPE.

In transformers' Llama-family modules an RMSNorm is 8 kernels (cast, square, mean, add,
rsqrt, multiply, cast, scale) and RoPE on q and k is 10 (two products, a negated half, a
concatenation and a sum for each). In a decode step each is a few microseconds of launch
and tail for a few kilobytes of data: on an H100 an 8B model's step ran ~1,400 such
kernels, ~2.5 of 14.5 ms (`main.py bench probe-decode`). `app/runtime/adapter.py` routes the
model's norms and RoPE here on CUDA (`Adapter.fused` says which).

Each function has a torch reference with the modules' exact arithmetic; the kernels
compute in float32 and round once, so they differ from it by at most one rounding of the
output dtype.
"""
from __future__ import annotations

import torch

from . import tl, triton, triton_ok


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward (also Mistral, Qwen2/3, Phi-3)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_reference(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (full rotary): q [B, H, T, D], cos/sin [B, T, D]."""
    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), -1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


if triton is not None:

    @triton.jit
    def _rmsnorm(x_ptr, w_ptr, o_ptr, n, eps, s_x, s_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        ok = c < n
        x = tl.load(x_ptr + row * s_x + c, mask=ok, other=0.0).to(tl.float32)
        var = tl.sum(x * x, 0) / n
        xn = (x * tl.rsqrt(var + eps)).to(o_ptr.dtype.element_ty)  # the module casts before scaling
        w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * s_o + c, (xn.to(tl.float32) * w).to(o_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, hq,
              sq_h, sq_t, sk_h, sk_t, sqo_h, sqo_t, sko_h, sko_t, sc_t,
              HALF: tl.constexpr, HP: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.arange(0, HP)
        ok = c < HALF
        cos1 = tl.load(cos_ptr + t * sc_t + c, mask=ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + t * sc_t + HALF + c, mask=ok, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + t * sc_t + c, mask=ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + t * sc_t + HALF + c, mask=ok, other=0.0).to(tl.float32)
        if h < hq:
            src = q_ptr + h * sq_h + t * sq_t
            dst = qo_ptr + h * sqo_h + t * sqo_t
        else:
            src = k_ptr + (h - hq) * sk_h + t * sk_t
            dst = ko_ptr + (h - hq) * sko_h + t * sko_t
        x1 = tl.load(src + c, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(dst + c, (x1 * cos1 - x2 * sin1).to(dst.dtype.element_ty), mask=ok)
        tl.store(dst + HALF + c, (x2 * cos2 + x1 * sin2).to(dst.dtype.element_ty), mask=ok)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (weight in x's dtype) as one kernel."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _rmsnorm[(rows.shape[0],)](rows, weight, out, n, float(eps), rows.stride(0), out.stride(0),
                               BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return out.view(x.shape)


def rope(q, k, cos, sin):
    """apply_rotary_pos_emb for batch 1, full rotary, as one kernel for q and k.
    q [1, Hq, T, D], k [1, Hkv, T, D] (any strides, contiguous last dim), cos/sin [1, T, D]."""
    d = q.shape[-1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    cos, sin = cos[0], sin[0]
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    hq, t = q.shape[1], q.shape[2]
    _rope[(t, hq + k.shape[1])](q, k, qo, ko, cos, sin, hq,
                                q.stride(1), q.stride(2), k.stride(1), k.stride(2),
                                qo.stride(1), qo.stride(2), ko.stride(1), ko.stride(2), cos.stride(0),
                                HALF=d // 2, HP=triton.next_power_of_2(d // 2), num_warps=1)
    return qo, ko


def rope_fits(q, k, cos, sin) -> bool:
    """Whether `rope` computes this call (else the caller runs the reference, whose output
    dtype follows type promotion)."""
    return (q.dtype == k.dtype == cos.dtype == sin.dtype and q.shape[0] == 1 and k.shape[0] == 1 and cos.dim() == 3 and cos.shape[0] == 1
            and cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.shape[-1] % 2 == 0
            and q.stride(-1) == 1 and k.stride(-1) == 1 and triton_ok(q.device))
