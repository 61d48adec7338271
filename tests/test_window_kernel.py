"""The Triton window-decode kernel (`policies/kernels/window_attn.py`) against exact
attention in float64 and against its torch reference, `policies.attention.attend_window`.

On CPU it runs under the Triton interpreter (`TRITON_INTERPRET=1`); on a CUDA GPU compiled.
"""
from __future__ import annotations

import pytest
import torch

from policies.attention import attend_window as reference
from policies.kernels import triton_ok, window_attn

cpu_only = pytest.mark.skipif(not triton_ok("cpu"), reason="needs triton and TRITON_INTERPRET=1 on a CPU")
cuda = pytest.mark.skipif(not triton_ok("cuda"), reason="needs a CUDA GPU and triton")

# (Hq, Hkv, D, n, buffer capacity, at, forced splits)
CASES = [(8, 2, 64, 256, 320, 100, None), (9, 3, 64, 1000, 1024, 999, None), (32, 8, 128, 640, 704, 0, None),
         (4, 4, 32, 192, 256, 191, 1), (8, 2, 64, 512, 512, 70, 8), (6, 2, 64, 130, 192, 129, 3)]


def _case(hq, hkv, d, n, cap, at, dtype, device):
    g = torch.Generator().manual_seed(n + at)
    q = torch.randn(hq, 1, d, generator=g).to(device, dtype)
    kb = torch.randn(hkv, cap, d, generator=g).to(device, dtype)
    vb = torch.randn(hkv, cap, d, generator=g).to(device, dtype)
    kb[:, at + 1:] = float("nan")  # past `at`: never read (a NaN would poison the output)
    vb[:, at + 1:] = float("nan")
    return q, kb[:, :n], vb[:, :n], at


def _exact(q, k, v, at):
    hq, _, d = q.shape
    hkv = k.shape[0]
    k, v = k[:, :at + 1].double(), v[:, :at + 1].double()
    s = (q.double().reshape(hkv, hq // hkv, d) @ k.transpose(1, 2)) * d ** -0.5
    return (s.softmax(-1) @ v).reshape(hq, 1, d)


def _check(case, dtype, device):
    hq, hkv, d, n, cap, at, n_split = case
    q, k, v, a = _case(hq, hkv, d, n, cap, at, dtype, device)
    # keys 0..step + start count: the step of a window that opened at `start`
    start = at // 2
    out = window_attn.attend_window(q, k, v, d ** -0.5, torch.tensor([at - start], device=device), start, n_split)
    assert out.shape == (hq, 1, d) and out.dtype == dtype
    exact = _exact(q, k, v, at)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double().cpu(), exact.cpu(), rtol=tol, atol=tol)
    # as close to exact as the torch reference is (on keys with finite tails)
    k2, v2 = torch.nan_to_num(k), torch.nan_to_num(v)
    ref = reference(q, k2, v2, d ** -0.5, torch.arange(n, device=device) <= at)
    ref_err = (ref.double().cpu() - exact.cpu()).abs().max().item()
    err = (out.double().cpu() - exact.cpu()).abs().max().item()
    assert err <= 2 * ref_err + (1e-6 if dtype == torch.float32 else 2e-3)


@cpu_only
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_kernel_matches_exact_interpreted(case, dtype):
    _check(case, dtype, "cpu")


@cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_window_kernel_matches_exact_cuda(case, dtype):
    _check(case, dtype, "cuda")


def test_splits_fill_the_machine_but_keep_two_blocks_each():
    assert window_attn.splits(64, 8, "cpu") == 1
    assert window_attn.splits(4096, 8, "cpu") == 1  # 8 programs on a CPU
    assert window_attn.splits(4096, 2, "cpu") == 4
    assert window_attn.splits(5 * window_attn.BLOCK, 1, "cpu") == 3


def _check_write(dtype, device):
    kb = torch.zeros(3, 20, 16, dtype=dtype, device=device)
    vb = torch.zeros_like(kb)
    k = torch.randn(3, 1, 16).to(device, dtype)
    v = torch.randn(3, 1, 16).to(device, dtype)
    window_attn.write_rows(kb, vb, k, v, torch.tensor([4], device=device), 7)
    assert torch.equal(kb[:, 11], k[:, 0]) and torch.equal(vb[:, 11], v[:, 0])
    assert kb.count_nonzero() == k.count_nonzero() and vb.count_nonzero() == v.count_nonzero()
    with pytest.raises(ValueError, match="buffer holds"):
        window_attn.write_rows(kb, vb, k.double(), v, torch.tensor([0], device=device))


@cpu_only
def test_write_rows_interpreted():
    _check_write(torch.float32, "cpu")


@cuda
def test_write_rows_cuda():
    _check_write(torch.bfloat16, "cuda")


@cpu_only
def test_rejects_rows_that_are_not_contiguous():
    q = torch.randn(4, 1, 32)
    k = torch.randn(2, 32, 64)[:, :, ::2]
    with pytest.raises(ValueError, match="last dim"):
        window_attn.attend_window(q, k, k, 0.1, torch.tensor([3]))
