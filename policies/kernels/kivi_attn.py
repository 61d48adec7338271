"""Decode attention over a KIVI cache: a plain-torch reference and a fused Triton kernel.

A KIVI cache (batch 1) is a `QuantView`:

- keys 0..nq-1 quantized per channel in the *store frame*: stored key i is
  R(-(i + shift)) applied to its post-RoPE key, so attention rotates it by R(i + shift)
  at read time (pre-RoPE up to one fixed rotation; see policies/kivi.py for why);
- keys nq..L-1 in full precision, post-RoPE (`kr`);
- values 0..nv-1 quantized per token; values nv..L-1 in full precision (`vr`);
- keys and values each in 2, 4 or 8 bits (`kbits`, `vbits`).

The kernel runs one program per (KV head, token split): it unpacks and dequantizes
2/4/8-bit codes in registers, rotates quantized keys (RoPE tables, partial rotary too),
takes logits for all query heads of the GQA group against quantized + residual keys,
keeps an online softmax, and sums quantized + residual values. A small torch step merges
the splits (flash-decoding). Triton is optional: `triton_ok()` says whether it can run.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import rope
from ..attention import attend
from .pack import dequantize_keys, dequantize_values

from . import tl, triton, triton_ok  # noqa: F401 (triton_ok: part of this module's interface)


class QuantView(NamedTuple):
    kc: torch.Tensor  # [H, nq, D/PK] int32 key codes (store frame)
    ks: torch.Tensor  # [H, nq/G, D] key scales
    kz: torch.Tensor  # [H, nq/G, D] key zeros
    kr: torch.Tensor  # [H, L-nq, D] post-RoPE full-precision keys
    vc: torch.Tensor  # [H, nv, D/PK] int32 value codes
    vs: torch.Tensor  # [H, nv, D/G] value scales
    vz: torch.Tensor  # [H, nv, D/G] value zeros
    vr: torch.Tensor  # [H, L-nv, D] full-precision values
    shift: int  # quantized key i is rotated by i + shift positions at read time
    kbits: int  # bits per key code
    vbits: int  # bits per value code
    group: int
    inv_freq: torch.Tensor  # [rot/2] float32


def quant_keys(view: QuantView) -> torch.Tensor:
    """Dequantized post-RoPE keys of the quantized region, float32 [H, nq, D]."""
    k = dequantize_keys(view.kc, view.ks, view.kz, view.kbits, view.group)
    pos = torch.arange(view.shift, view.shift + k.shape[1], device=k.device)
    return rope.rotate(k, pos, view.inv_freq)


def dense(view: QuantView, dtype: torch.dtype):
    """All keys and values in full precision, (k, v) [H, L, D] in `dtype`."""
    k = torch.cat((quant_keys(view).to(dtype), view.kr.to(dtype)), 1)
    vq = dequantize_values(view.vc, view.vs, view.vz, view.vbits, view.group)
    v = torch.cat((vq.to(dtype), view.vr.to(dtype)), 1)
    return k, v


def reference(q, view: QuantView, scale: float, k=None, v=None, extra=None) -> torch.Tensor:
    """Dequantize, then `attend`: q [Hq, Tq, D] over extra + cache + new k/v [H, Tq, D]."""
    keys, vals = dense(view, q.dtype)
    if k is not None:
        keys, vals = torch.cat((keys, k.to(q.dtype)), 1), torch.cat((vals, v.to(q.dtype)), 1)
    if extra is not None:
        keys = torch.cat((extra[0].to(q.dtype), keys), 1)
        vals = torch.cat((extra[1].to(q.dtype), vals), 1)
    return attend(q, keys, vals, scale)


def decode_torch(q: torch.Tensor, view: QuantView, scale: float) -> torch.Tensor:
    """`decode` in plain torch (the CPU path): q [Hq, 1, D] over the whole view -> [Hq, 1, D].
    The new token must already sit in the residual. Unlike `reference` it never
    concatenates the dequantized cache with the residual: logits of the two key parts are
    joined (small), and the probabilities are split at nv for the two value parts."""
    hq, _, d = q.shape
    h = view.kr.shape[0]
    nv = view.vc.shape[1]
    qg = q.reshape(h, hq // h, d).float()  # query head j reads KV head j // group
    logits = torch.cat((qg @ quant_keys(view).transpose(1, 2), qg @ view.kr.float().transpose(1, 2)), -1)
    p = (logits * scale).softmax(-1)  # [H, g, L]
    vq = dequantize_values(view.vc, view.vs, view.vz, view.vbits, view.group)
    out = p[..., :nv] @ vq + p[..., nv:] @ view.vr.float()
    return out.reshape(hq, 1, d).to(q.dtype)


_TABLES: dict = {}


def rope_tables(inv_freq: torch.Tensor, d: int, device):
    """Cached `_rope_tables` (built on the host: rebuilding them per decode step cost three
    host-device synchronisations per layer on CUDA)."""
    # NOTE: keyed by the tensor's address; the entry holds the tensor, so the address
    # cannot be reused by another while cached (inv_freq is never written in place)
    key = (inv_freq.data_ptr(), str(inv_freq.device), d, str(torch.device(device)))
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = (inv_freq, _rope_tables(inv_freq, d, device))
    return _TABLES[key][1]


def _rope_tables(inv_freq: torch.Tensor, d: int, device):
    """Per-channel (freq [D] f32, partner [D] int32, sign [D] f32) so that the rotated
    channel c is x[c] cos(p f[c]) + sign[c] x[partner[c]] sin(p f[c]) (HF rotate_half)."""
    half = inv_freq.numel()
    c = torch.arange(d)
    freq = torch.zeros(d)
    freq[: 2 * half] = inv_freq.float().cpu().repeat(2)
    partner = torch.where(c < half, c + half, torch.where(c < 2 * half, c - half, c))
    sign = torch.where(c < half, -1.0, torch.where(c < 2 * half, 1.0, 0.0))
    return freq.to(device), partner.to(device, torch.int32), sign.to(device)


if triton is not None:

    # NOTE: integer arguments are specialized on divisibility by 16 by default, and these
    # change every decode step: each new combination compiled the kernel again (~1 s each;
    # measured on an H100: 128 steps at 128K decoded at 5.7 tok/s, 32 steps at 14.6)
    @triton.jit(do_not_specialize=["nq", "nv", "L", "shift", "per_split"])
    def _kivi_decode(q_ptr, kc_ptr, ks_ptr, kz_ptr, kr_ptr, vc_ptr, vs_ptr, vz_ptr, vr_ptr,
                     freq_ptr, partner_ptr, sign_ptr, m_ptr, l_ptr, acc_ptr,
                     nq, nv, L, shift, per_split, scale,
                     s_kc0, s_kc1, s_ks0, s_ks1, s_kr0, s_kr1,
                     s_vc0, s_vc1, s_vs0, s_vs1, s_vr0, s_vr1,
                     GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     KBITS: tl.constexpr, VBITS: tl.constexpr, G: tl.constexpr, BT: tl.constexpr):
        h = tl.program_id(0)
        sp = tl.program_id(1)
        n_split = tl.num_programs(1)
        PK: tl.constexpr = 32 // KBITS  # key codes per int32 word
        QMAX: tl.constexpr = (1 << KBITS) - 1
        PV: tl.constexpr = 32 // VBITS
        VMAX: tl.constexpr = (1 << VBITS) - 1
        cc = tl.arange(0, DP)  # [DP] channel
        cok = cc < D
        gi = tl.arange(0, GP)  # [GP] query head within the GQA group
        q = tl.load(q_ptr + (h * GQ + gi)[:, None] * D + cc[None, :],
                    mask=(gi[:, None] < GQ) & cok[None, :], other=0.0).to(tl.float32)  # [GP, DP]
        freq = tl.load(freq_ptr + cc, mask=cok, other=0.0)
        pc = tl.load(partner_ptr + cc, mask=cok, other=0)
        sgn = tl.load(sign_ptr + cc, mask=cok, other=0.0)
        m_i = tl.full([GP], -1e30, tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        start = sp * per_split
        stop = tl.minimum(start + per_split, L)
        for t0 in range(start, stop, BT):
            t = t0 + tl.arange(0, BT)  # [BT] token
            live = t < stop
            # keys: quantized (store frame, rotated here) or full-precision residual
            kq = live & (t < nq)
            m2 = kq[:, None] & cok[None, :]
            kbase = kc_ptr + h * s_kc0 + t[:, None] * s_kc1
            sbase = h * s_ks0 + (t // G)[:, None] * s_ks1
            w = tl.load(kbase + (cc // PK)[None, :], mask=m2, other=0)
            code = ((w >> ((cc % PK) * KBITS)[None, :]) & QMAX).to(tl.float32)
            kd = code * tl.load(ks_ptr + sbase + cc[None, :], mask=m2, other=0.0).to(tl.float32) \
                + tl.load(kz_ptr + sbase + cc[None, :], mask=m2, other=0.0).to(tl.float32)
            w2 = tl.load(kbase + (pc // PK)[None, :], mask=m2, other=0)
            code2 = ((w2 >> ((pc % PK) * KBITS)[None, :]) & QMAX).to(tl.float32)
            kp = code2 * tl.load(ks_ptr + sbase + pc[None, :], mask=m2, other=0.0).to(tl.float32) \
                + tl.load(kz_ptr + sbase + pc[None, :], mask=m2, other=0.0).to(tl.float32)
            ang = (t + shift).to(tl.float32)[:, None] * freq[None, :]  # [BT, DP]
            kd = kd * tl.cos(ang) + sgn[None, :] * kp * tl.sin(ang)
            kf = tl.load(kr_ptr + h * s_kr0 + (t - nq)[:, None] * s_kr1 + cc[None, :],
                         mask=(live & (t >= nq))[:, None] & cok[None, :], other=0.0).to(tl.float32)
            k = tl.where(kq[:, None], kd, kf)  # [BT, DP]
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GP, BT]
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            # values: quantized per token (groups of G channels) or full-precision residual
            vq = live & (t < nv)
            m3 = vq[:, None] & cok[None, :]
            wv = tl.load(vc_ptr + h * s_vc0 + t[:, None] * s_vc1 + (cc // PV)[None, :], mask=m3, other=0)
            cv = ((wv >> ((cc % PV) * VBITS)[None, :]) & VMAX).to(tl.float32)
            vsb = h * s_vs0 + t[:, None] * s_vs1 + (cc // G)[None, :]
            vd = cv * tl.load(vs_ptr + vsb, mask=m3, other=0.0).to(tl.float32) \
                + tl.load(vz_ptr + vsb, mask=m3, other=0.0).to(tl.float32)
            vf = tl.load(vr_ptr + h * s_vr0 + (t - nv)[:, None] * s_vr1 + cc[None, :],
                         mask=(live & (t >= nv))[:, None] & cok[None, :], other=0.0).to(tl.float32)
            v = tl.where(vq[:, None], vd, vf)  # [BT, DP]
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
        out = (h * n_split + sp) * GP + gi
        tl.store(m_ptr + out, m_i)
        tl.store(l_ptr + out, l_i)
        tl.store(acc_ptr + out[:, None] * DP + cc[None, :], acc)


def _splits(length: int, heads: int, device, block: int) -> int:
    blocks = -(-length // block)
    if torch.device(device).type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(blocks, -(-2 * sms // heads)))
    return max(1, min(blocks, 4))


def decode(q: torch.Tensor, view: QuantView, scale: float, splits: int | None = None,
           block: int = 32, warps: int = 4) -> torch.Tensor:
    """Fused decode attention: q [Hq, 1, D] over the whole view -> [Hq, 1, D] in q's dtype.

    The new token must already sit in the residual (`kr`/`vr` last rows)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use kivi_attn.reference")
    hq, _, d = q.shape
    h = view.kr.shape[0]
    nq, nv = view.kc.shape[1], view.vc.shape[1]
    length = nq + view.kr.shape[1]
    if nv + view.vr.shape[1] != length:
        raise ValueError(f"keys hold {length} tokens but values {nv + view.vr.shape[1]}")
    gq = hq // h
    gp = max(16, triton.next_power_of_2(gq))
    dp = max(16, triton.next_power_of_2(d))
    n_split = splits or _splits(length, h, q.device, block)
    per = -(-(-(-length // n_split)) // block) * block
    n_split = -(-length // per)
    freq, partner, sign = rope_tables(view.inv_freq, d, q.device)
    m = torch.empty(h, n_split, gp, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(h, n_split, gp, dp, device=q.device, dtype=torch.float32)
    kr, vr = view.kr, view.vr
    qc = q.reshape(hq, d).contiguous()
    _kivi_decode[(h, n_split)](
        qc, view.kc, view.ks, view.kz, kr, view.vc, view.vs, view.vz, vr,
        freq, partner, sign, m, l, acc, nq, nv, length, view.shift, per, float(scale),
        view.kc.stride(0), view.kc.stride(1), view.ks.stride(0), view.ks.stride(1),
        kr.stride(0), kr.stride(1), view.vc.stride(0), view.vc.stride(1),
        view.vs.stride(0), view.vs.stride(1), vr.stride(0), vr.stride(1),
        GQ=gq, GP=gp, D=d, DP=dp, KBITS=view.kbits, VBITS=view.vbits, G=view.group, BT=block, num_warps=warps)
    w = torch.exp(m - m.amax(1, keepdim=True))  # [H, S, GP]
    out = (acc * w[..., None]).sum(1) / (l * w).sum(1)[..., None]  # [H, GP, DP]
    return out[:, :gq, :d].reshape(hq, 1, d).to(q.dtype)
