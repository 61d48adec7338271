"""Decode attention over a fixed-shape window (`policies/static.py`) as two Triton kernels.

`policies.attention.attend_window` is the reference: one query token per head over a span
k/v [Hkv, n, D] of which keys 0..at count, `at` a device tensor (so a captured CUDA graph
replays it while the window fills). In torch that is ~10 kernels per layer, and the span,
a slice of a larger buffer, is copied whole to make the batched P @ V contiguous: on an
H100 at 32K keys that copy alone was 2.9 of 14.5 ms per token (`main.py bench probe-decode`).

Here it is flash-decoding: kernel 1 runs one program per (KV head, key split); each reads
its keys once, in blocks, for all G query heads of the group (a tl.dot with G padded to
16), keeps an online softmax, and writes (max, sum, accumulator); keys past `at` are never
read. Kernel 2 merges the splits per query head and writes the output in q's dtype. The
span's strides are passed, so the store's buffer is read in place.
"""
from __future__ import annotations

import torch

from . import tl, triton, triton_ok

BLOCK = 64  # keys per inner step


def splits(n: int, heads: int, device) -> int:
    """Key splits per KV head: enough programs to fill the GPU (4 per SM), each at least
    two blocks of keys."""
    blocks = -(-n // BLOCK)
    dev = torch.device(device)
    progs = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8
    return max(1, min(-(-blocks // 2), -(-progs // heads)))


if triton is not None:

    # NOTE: `start` (the store's length when a window opens) must not be specialized on
    # divisibility by 16, or a window may open with a compile inside its graph capture
    @triton.jit(do_not_specialize=["start"])
    def _window_split(q_ptr, k_ptr, v_ptr, step_ptr, start, m_ptr, l_ptr, acc_ptr, n, per_split, scale,
                      s_k0, s_k1, s_v0, s_v1,
                      GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                      BT: tl.constexpr, PREC: tl.constexpr):
        h = tl.program_id(0).to(tl.int64)  # h * stride can pass 2^31 (32 heads x 1M-token buffers)
        sp = tl.program_id(1)
        n_split = tl.num_programs(1)
        cc = tl.arange(0, DP)
        cok = cc < D
        gi = tl.arange(0, GP)
        q = tl.load(q_ptr + (h * GQ + gi)[:, None] * D + cc[None, :],
                    mask=(gi[:, None] < GQ) & cok[None, :], other=0.0).to(tl.float32)  # [GP, DP]
        last = tl.load(step_ptr) + start  # keys 0..last count
        stop = tl.minimum(tl.minimum(sp * per_split + per_split, n), last + 1)
        m_i = tl.full([GP], -1e30, tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for t0 in range(sp * per_split, stop, BT):
            t = t0 + tl.arange(0, BT)
            live = t < stop
            mk = live[:, None] & cok[None, :]
            k = tl.load(k_ptr + h * s_k0 + t[:, None] * s_k1 + cc[None, :], mask=mk, other=0.0)
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PREC)
            s = tl.where(live[None, :], s * scale, float("-inf"))  # [GP, BT]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + h * s_v0 + t[:, None] * s_v1 + cc[None, :], mask=mk, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PREC)
            m_i = m_new
        out = (h * n_split + sp) * GP + gi
        real = gi < GQ  # the padding rows of the group are never merged
        tl.store(m_ptr + out, m_i, mask=real)
        tl.store(l_ptr + out, l_i, mask=real)
        tl.store(acc_ptr + out[:, None] * DP + cc[None, :], acc, mask=real[:, None])

    @triton.jit(do_not_specialize=["start"])
    def _write_rows(k_ptr, v_ptr, kb_ptr, vb_ptr, step_ptr, start, s_k0, s_v0, s_kb0, s_kb1, s_vb0, s_vb1,
                    D: tl.constexpr, DP: tl.constexpr):
        h = tl.program_id(0).to(tl.int64)
        cc = tl.arange(0, DP)
        ok = cc < D
        at = tl.load(step_ptr) + start
        tl.store(kb_ptr + h * s_kb0 + at * s_kb1 + cc, tl.load(k_ptr + h * s_k0 + cc, mask=ok), mask=ok)
        tl.store(vb_ptr + h * s_vb0 + at * s_vb1 + cc, tl.load(v_ptr + h * s_v0 + cc, mask=ok), mask=ok)

    @triton.jit
    def _window_merge(m_ptr, l_ptr, acc_ptr, o_ptr, n_split,
                      GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                      SP: tl.constexpr):
        # one program per query head, all its splits in one tile (a loop over splits in a
        # few programs ran 43 us per layer on an H100: latency, not bytes)
        r = tl.program_id(0)
        h, g = r // GQ, r % GQ
        sp = tl.arange(0, SP)
        cc = tl.arange(0, DP)
        ok = sp < n_split
        row = (h * n_split + sp) * GP + g
        m = tl.load(m_ptr + row, mask=ok, other=-1e30)
        w = tl.where(ok, tl.exp(m - tl.max(m, 0)), 0.0)  # a split that read no key has l = 0
        l = tl.sum(tl.load(l_ptr + row, mask=ok, other=0.0) * w, 0)
        acc = tl.load(acc_ptr + row[:, None] * DP + cc[None, :], mask=ok[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / l
        tl.store(o_ptr + r * D + cc, o.to(o_ptr.dtype.element_ty), mask=cc < D)


def attend_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  step: torch.Tensor, start: int = 0, n_split: int | None = None) -> torch.Tensor:
    """q [Hq, 1, D] over k/v [Hkv, n, D] (any strides with a contiguous last dim), keys
    0..step + start counting (step: a one-element integer device tensor; 0 <= step + start
    < n) -> [Hq, 1, D] in q's dtype. Fixed shapes and no host sync: capturable in a CUDA graph."""
    if not triton_ok(q.device):
        raise RuntimeError("the window kernel needs triton on a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")
    hq, _, d = q.shape
    hkv, n, _ = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("the window kernel reads k/v rows in place: their last dim must be contiguous")
    gq = hq // hkv
    gp = max(16, triton.next_power_of_2(gq))
    dp = max(16, triton.next_power_of_2(d))
    n_split = n_split or splits(n, hkv, q.device)
    per = -(-(-(-n // n_split)) // BLOCK) * BLOCK
    n_split = -(-n // per)
    m = torch.empty(hkv, n_split, gp, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(hkv, n_split, gp, dp, device=q.device, dtype=torch.float32)
    qc = q.reshape(hq, d).contiguous()
    out = torch.empty(hq, 1, d, device=q.device, dtype=q.dtype)
    _window_split[(hkv, n_split)](qc, k, v, step, int(start), m, l, acc, n, per, float(scale),
                                  k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                  GQ=gq, GP=gp, D=d, DP=dp, BT=BLOCK, PREC="ieee" if q.dtype == torch.float32 else "tf32")
    _window_merge[(hq,)](m, l, acc, out, n_split, GQ=gq, GP=gp, D=d, DP=dp,
                         SP=max(2, triton.next_power_of_2(n_split)), num_warps=4 if n_split <= 32 else 8)
    return out


def write_rows(kb: torch.Tensor, vb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
               start: int = 0) -> None:
    """kb/vb [Hkv, cap, D] row step + start = k/v [Hkv, 1, D] (one kernel for both, where
    index_copy_ takes two plus the index's addition); same dtype, contiguous last dims."""
    hkv, _, d = k.shape
    if k.dtype != kb.dtype or v.dtype != vb.dtype:
        raise ValueError(f"new rows are {k.dtype}, the buffer holds {kb.dtype}")
    if kb.stride(2) != 1 or vb.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("write_rows needs contiguous last dims")
    _write_rows[(hkv,)](k, v, kb, vb, step, int(start), k.stride(0), v.stride(0), kb.stride(0), kb.stride(1),
                        vb.stride(0), vb.stride(1), D=d, DP=max(16, triton.next_power_of_2(d)))
