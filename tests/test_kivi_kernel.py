"""The fused KIVI decode kernel against its dequantize-then-attend reference.

On CPU it runs under the Triton interpreter (`TRITON_INTERPRET=1`, set before Python
starts: triton reads it when the kernel is defined); on a CUDA GPU it runs compiled.
"""
from __future__ import annotations

import os

import pytest
import torch

from policies import ModelInfo, rope
from policies.kernels import kivi_attn
from policies.kernels.pack import quantize_keys, quantize_values
from policies.kivi import KiviStore

CPU_REASON = ("the kernel needs triton plus TRITON_INTERPRET=1 in the environment "
              "(or a CUDA GPU); triton " + ("is not installed" if kivi_attn.triton is None else
                                             "is installed but TRITON_INTERPRET is not 1"))
cpu_only = pytest.mark.skipif(not kivi_attn.triton_ok("cpu"), reason=CPU_REASON)
cuda = pytest.mark.skipif(not kivi_attn.triton_ok("cuda"), reason="needs a CUDA GPU and triton")


def inv_freq(d, rot=None):
    rot = rot or d
    return 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))


def view(h, d, bits, group, nq, rk, nv, shift, dtype, device, g, rot=None):
    """A random cache of nq + rk tokens: keys with channel offsets, values plain normal.
    bits: (key bits, value bits)."""
    kb, vb = bits
    L = nq + rk
    kq = torch.randn(d, generator=g) * 2 + torch.randn(h, nq, d, generator=g)
    kc, ks, kz = quantize_keys(kq, kb, group, dtype)
    vc, vs, vz = quantize_values(torch.randn(h, nv, d, generator=g), vb, group, dtype)
    kr = torch.randn(h, rk, d, generator=g).to(dtype)
    vr = torch.randn(h, L - nv, d, generator=g).to(dtype)
    t = [x.to(device) for x in (kc, ks, kz, kr, vc, vs, vz, vr)]
    return kivi_attn.QuantView(*t, shift, kb, vb, group, inv_freq(d, rot))


CASES = [  # h, q heads per kv head, d, (key bits, value bits), group, nq, rk, nv, shift, splits, rot
    (2, 4, 64, (2, 2), 32, 64, 20, 40, 5, 1, None),
    (1, 1, 32, (4, 4), 16, 48, 1, 49, 0, 2, None),  # no GQA; every value quantized but the new one
    (2, 3, 80, (2, 2), 16, 96, 33, 60, -7, 3, 32),  # head_dim not a power of 2, partial rotary
    (4, 2, 64, (4, 2), 32, 0, 9, 0, 0, 1, None),  # nothing quantized yet
    (2, 2, 128, (2, 4), 32, 320, 64, 256, 1000, 4, None),  # long, many splits, large shift
    (2, 3, 64, (8, 4), 16, 128, 40, 100, 3, 2, None),  # 8-bit keys: 4 codes per word
    (3, 3, 64, (4, 2), 32, 4064, 32, 4000, 17, 4, None),  # the default model's shape, 4K tokens
]


def _check(case, dtype, device, atol):
    h, gq, d, bits, group, nq, rk, nv, shift, splits, rot = case
    g = torch.Generator().manual_seed(nq + rk + d)
    v = view(h, d, bits, group, nq, rk, nv, shift, dtype, device, g, rot)
    q = (torch.randn(h * gq, 1, d, generator=g) * 0.5).to(device, dtype)
    scale = d ** -0.5
    ref = kivi_attn.reference(q.float(), v, scale)
    out = kivi_attn.decode(q, v, scale, splits=splits, block=16)
    assert out.shape == (h * gq, 1, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    assert ref.float().abs().max() > 0.05  # a real, non-trivial output


@cpu_only
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_interpreted(case):
    _check(case, torch.float32, "cpu", 1e-5)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_scales_interpreted(dtype):
    _check(CASES[0], dtype, "cpu", 2e-2)


@cpu_only
def test_store_decodes_through_the_kernel_like_the_torch_path():
    d, h = 64, 2
    info = ModelInfo(1, 4, h, d, torch.float32, torch.device("cpu"), inv_freq(d), 4096)
    fused, plain = KiviStore(info, 2, 32, 32), KiviStore(info, 2, 32, 32)
    fused.kernel, plain.kernel = True, False
    g = torch.Generator().manual_seed(9)
    for t in [70] + [1] * 40:  # prefill chunk, then decode across key flushes and window slides
        k = rope.rotate(torch.randn(h, t, d, generator=g) + 1, torch.arange(fused.length, fused.length + t), info.inv_freq)
        v = torch.randn(h, t, d, generator=g)
        q = torch.randn(4, t, d, generator=g)
        a, b = fused.attend(q, k, v, 0.125), plain.attend(q, k, v, 0.125)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        fused.append(k, v)
        plain.append(k, v)
    idx = torch.arange(10, 110).expand(h, -1)
    for s in (fused, plain):
        s.compact(idx, torch.full_like(idx, -10))  # the frame shifts: the kernel must follow
    q, k, v = torch.randn(4, 1, d), torch.randn(h, 1, d), torch.randn(h, 1, d)
    torch.testing.assert_close(fused.attend(q, k, v, 0.125), plain.attend(q, k, v, 0.125), atol=1e-5, rtol=0)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_matches_reference_cuda(case, dtype):
    _check(case, dtype, "cuda", 1e-4 if dtype == torch.float32 else 2e-2)


def test_interpreter_flag_is_read_from_the_environment():
    assert kivi_attn.triton_ok("cpu") == (kivi_attn.triton is not None and os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_decode_path_matches_reference(case, dtype):
    """The CPU decode path (no triton) splits logits and probabilities instead of
    concatenating the dequantized cache: the same attention as the reference."""
    h, gq, d, bits, group, nq, rk, nv, shift, _, rot = case
    g = torch.Generator().manual_seed(nq + rk + d + 1)
    v = view(h, d, bits, group, nq, rk, nv, shift, dtype, "cpu", g, rot)
    q = (torch.randn(h * gq, 1, d, generator=g) * 0.5).to(dtype)
    ref = kivi_attn.reference(q.float(), v, d ** -0.5)
    out = kivi_attn.decode_torch(q, v, d ** -0.5)
    assert out.shape == (h * gq, 1, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    assert ref.abs().max() > 0.05
