"""The CPU KIVI decode kernel (kivi_cpu.c) against the torch reference it replaces."""
from __future__ import annotations

import pytest
import torch

from policies import ModelInfo, rope
from policies.kernels import kivi_attn, kivi_cpu
from policies.kernels.switch import Kernels
from policies.kivi import KiviStore
from tests.test_kivi_kernel import inv_freq, view

LIB = kivi_cpu.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler built the CPU kernel")

CASES = [  # h, q heads per kv head, d, (key bits, value bits), group, nq, rk, nv, shift, split, rot
    (3, 3, 64, (2, 2), 32, 4064, 32, 4000, 17, None, None),  # the default model's shape, 4K tokens
    (3, 3, 64, (4, 2), 32, 1024, 100, 996, -40, 64, None),  # many splits across nq and nv
    (2, 4, 64, (2, 4), 16, 96, 20, 70, 5, 16, None),
    (2, 2, 128, (8, 4), 32, 320, 64, 256, 1000, 96, None),  # 8-bit keys, large shift
    (1, 1, 32, (4, 8), 16, 48, 1, 49, 0, None, None),  # no GQA; every value quantized but the new one
    (4, 2, 64, (4, 4), 32, 0, 9, 0, 0, None, None),  # nothing quantized yet
    (2, 3, 80, (2, 2), 16, 96, 33, 60, -7, 32, 32),  # head_dim 80, partial rotary (vector path)
    (2, 3, 48, (2, 2), 16, 64, 20, 50, 3, 16, 20),  # 10 rotary pairs: the portable path
    (2, 2, 64, (2, 2), 8, 64, 20, 70, 2, 8, None),  # group 8
]


@needs_lib
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_matches_reference(case, threads):
    h, gq, d, bits, group, nq, rk, nv, shift, split, rot = case
    g = torch.Generator().manual_seed(nq + rk + d + group)
    v = view(h, d, bits, group, nq, rk, nv, shift, torch.float32, "cpu", g, rot)
    q = torch.randn(h * gq, 1, d, generator=g) * 0.5
    assert kivi_cpu.supported(q, v)
    ref = kivi_attn.reference(q, v, d ** -0.5)
    out = kivi_cpu.decode(LIB, q, v, d ** -0.5, threads=threads, split=split)
    assert out.shape == (h * gq, 1, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert ref.abs().max() > 0.05


@needs_lib
def test_cpu_kernel_reads_strided_views_in_place():
    """The store hands over slices of larger buffers (capacity rows, a sliding value window)."""
    h, gq, d = 3, 3, 64
    g = torch.Generator().manual_seed(3)
    full = view(h, d, (4, 2), 32, 512, 40, 480, 9, torch.float32, "cpu", g)
    cut = lambda t, n: torch.cat((t, torch.randn(h, n, t.shape[2], generator=g).to(t.dtype)), 1)[:, : t.shape[1]]  # noqa: E731
    sliced = full._replace(**{f: cut(getattr(full, f), 7) for f in ("kc", "ks", "kz", "kr", "vc", "vs", "vz", "vr")})
    assert sliced.kr.stride(0) != sliced.kr.shape[1] * d
    q = torch.randn(h * gq, 1, d, generator=g)
    torch.testing.assert_close(kivi_cpu.decode(LIB, q, sliced, 0.125), kivi_attn.reference(q, full, 0.125),
                               atol=2e-5, rtol=0)


def test_unsupported_steps_take_the_torch_path():
    v = view(2, 64, (2, 2), 32, 64, 8, 60, 0, torch.bfloat16, "cpu", torch.Generator().manual_seed(1))
    assert not kivi_cpu.supported(torch.randn(4, 1, 64).bfloat16(), v)


@needs_lib
def test_store_decodes_through_the_cpu_kernel_like_the_torch_path():
    d, h = 64, 3
    fast_info = ModelInfo(1, 9, h, d, torch.float32, torch.device("cpu"), inv_freq(d), 4096,
                          kernels=Kernels(kivi="auto"))
    fast, plain = KiviStore(fast_info, kbits=4, vbits=2, group=32, residual=32), \
        KiviStore(ModelInfo(1, 9, h, d, torch.float32, torch.device("cpu"), inv_freq(d), 4096,
                            kernels=Kernels(kivi="off")), kbits=4, vbits=2, group=32, residual=32)
    assert fast.cpu is not None and plain.cpu is None
    g = torch.Generator().manual_seed(9)
    steps = 0
    for t in [300] + [1] * 40:  # prefill chunk, then decode across key flushes and window slides
        k = rope.rotate(torch.randn(h, t, d, generator=g) + 1, torch.arange(fast.length, fast.length + t),
                        fast_info.inv_freq)
        v, q = torch.randn(h, t, d, generator=g), torch.randn(9, t, d, generator=g)
        torch.testing.assert_close(fast.attend(q, k, v, 0.125), plain.attend(q, k, v, 0.125), atol=2e-5, rtol=0)
        fast.append(k, v)
        plain.append(k, v)
        steps += t == 1
    idx = torch.arange(30, 330).expand(h, -1)
    for s in (fast, plain):
        s.compact(idx, torch.full_like(idx, -40))  # the frame shifts: the kernel must follow
    assert fast.shift == -10
    q, k, v = torch.randn(9, 1, d), torch.randn(h, 1, d), torch.randn(h, 1, d)
    torch.testing.assert_close(fast.attend(q, k, v, 0.125), plain.attend(q, k, v, 0.125), atol=2e-5, rtol=0)
