"""`kivi` with key and value bits chosen separately (`kbits`, `vbits`; `bits` sets both)."""
from __future__ import annotations

import pytest
import torch

from policies import ModelInfo, SpecError, parse_spec, rope
from policies.kivi import DEFAULT_BITS, KiviStore, bits_of

H, GQ, D = 2, 2, 64
INV = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def info(dtype=torch.float32):
    return ModelInfo(1, H * GQ, H, D, dtype, torch.device("cpu"), INV, 4096)


def kv(n, seed):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(D, generator=g) * 3 + torch.randn(H, n, D, generator=g) * 0.5
    return rope.rotate(pre, torch.arange(n), INV), torch.randn(H, n, D, generator=g)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def store(spec: str, dtype=torch.float32) -> KiviStore:
    pol = parse_spec(spec)["store"]
    return KiviStore(info(dtype), **pol.opts)


@pytest.mark.parametrize("spec, want", [
    ("kivi", DEFAULT_BITS), ("kivi:bits=4", (4, 4)), ("kivi:kbits=4,vbits=2", (4, 2)),
    ("kivi:bits=2,kbits=8", (8, 2)), ("kivi:vbits=4", (DEFAULT_BITS[0], 4)), ("kivi:bits=8", (8, 8)),
])
def test_spec_sets_key_and_value_bits(spec, want):
    opts = parse_spec(spec)["store"].opts
    assert bits_of(opts) == want
    st = store(spec)
    assert (st.kbits, st.vbits) == want


@pytest.mark.parametrize("spec, word", [("kivi:kbits=3", "kbits"), ("kivi:vbits=1", "vbits"),
                                        ("kivi:bits=16", "bits")])
def test_bad_bits_are_refused_by_name(spec, word):
    with pytest.raises(SpecError, match=f"`{word}`"):
        parse_spec(spec)


def test_keys_and_values_quantize_at_their_own_bits():
    """K4V2 keeps K2V2's values bit for bit and K4V4's keys bit for bit."""
    k, v = kv(600, 1)
    got = {}
    for kb, vb in ((2, 2), (4, 2), (4, 4), (2, 4), (8, 4)):
        st = KiviStore(info(), kbits=kb, vbits=vb, group=32, residual=64)
        st.load(k, v)
        got[kb, vb] = st.dense()
    assert torch.equal(got[4, 2][1], got[2, 2][1]) and torch.equal(got[4, 2][0], got[4, 4][0])
    assert torch.equal(got[2, 4][0], got[2, 2][0]) and torch.equal(got[2, 4][1], got[4, 4][1])
    ek = {b: rel(got[b][0], k) for b in got}
    ev = {b: rel(got[b][1], v) for b in got}
    assert ek[8, 4] < 0.2 * ek[4, 4] < 0.2 * ek[2, 2], ek
    assert ev[4, 4] < 0.5 * ev[2, 2], ev


def test_split_bits_bytes_are_exact_and_match_token_bytes():
    st = store("kivi:kbits=4,vbits=2,group=32,residual=128", torch.float16)
    k, v = kv(1000, 2)
    st.load(k.half(), v.half())
    assert (st.nq, st.nv) == (992, 872)
    cap = 1024  # code buffers round up to 256-token blocks
    n = st.nbytes()
    assert n["codes"] == H * cap * (D // 8) * 4 + H * cap * (D // 16) * 4
    assert n["scales"] == n["zeros"] == H * (cap // 32) * D * 2 + H * cap * (D // 32) * 2
    # per quantized token: 4 + 2 bits per channel, fp16 scale+zero per 32 tokens (keys)
    # and per 32 channels (values)
    assert st.token_bytes() == H * (D * 6 / 8 + 2 * D * 2 / 32 + 2 * (D // 32) * 2)
    k2, v2 = kv(1000 + 512, 3)
    st.load(k2.half(), v2.half())
    grown = sum(st.nbytes().values()) - sum(n.values())
    assert grown == pytest.approx(st.token_bytes() * 512, rel=0.02)


def test_split_store_attends_like_its_dequantized_cache():
    from policies.kernels import kivi_attn
    st = KiviStore(info(), kbits=4, vbits=2, group=32, residual=32)
    k, v = kv(300, 4)
    st.load(k, v)
    q = torch.randn(H * GQ, 1, D, generator=torch.Generator().manual_seed(5))
    kn, vn = kv(1, 6)
    dk, dv = st.dense()
    ref = kivi_attn.attend(q, torch.cat((dk, kn), 1), torch.cat((dv, vn), 1), 0.125)
    torch.testing.assert_close(st.attend(q, kn, vn, 0.125), ref, atol=1e-5, rtol=0)
