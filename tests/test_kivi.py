"""The `kivi` store: quantizers, layout rules, exact bytes, eviction, conversion, `full` parity."""
from __future__ import annotations

import pytest
import torch

from policies import ModelInfo, SpecError, parse_spec, rope
from policies.base import FullStore
from policies.kernels import kivi_attn
from policies.kernels.pack import (dequantize_keys, dequantize_values, pack, quantize_keys,
                                   quantize_values, unpack)
from policies.kivi import KiviStore

H, GQ, D = 2, 2, 64
INV = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def info(dtype=torch.float32, window=4096, d=D, inv=INV):
    return ModelInfo(1, H * GQ, H, d, dtype, torch.device("cpu"), inv, window)


def pre_keys(t, g, offset):
    """Keys shaped like real ones: per-channel offsets (outlier channels) + noise, pre-RoPE."""
    return offset + torch.randn(H, t, D, generator=g) * 0.5


def feed(stores, t, g, pos, offset, dtype=torch.float32):
    """Attend + append t fresh tokens (post-RoPE at pos..) to every store; returns outputs."""
    k = rope.rotate(pre_keys(t, g, offset), torch.arange(pos, pos + t), INV).to(dtype)
    v = torch.randn(H, t, D, generator=g).to(dtype)
    q = torch.randn(H * GQ, t, D, generator=g).to(dtype)
    outs = [s.attend(q, k, v, D ** -0.5) for s in stores]
    for s in stores:
        s.append(k, v)
    return outs


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantizers_round_trip(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(H, 96, D, generator=g) * torch.rand(D, generator=g) * 4).to(dtype)
    x[0, :32, 5] = 1.25  # a constant group must stay finite and exact
    ulp = torch.finfo(dtype).eps * x.float().abs().amax()
    codes, s, z = quantize_keys(x.float(), bits, 32, dtype, "minmax")
    assert codes.dtype == torch.int32 and codes.shape == (H, 96, D * bits // 32)
    err = (dequantize_keys(codes, s, z, bits, 32) - x.float()).abs()
    bound = s.float().repeat_interleave(32, 1) / 2 + 2 * ulp
    assert (err <= bound).all() and err[0, :32, 5].max() <= 2 * ulp
    assert err.max() > 0.01  # it really quantizes
    codes, s, z = quantize_values(x.float(), bits, 32, dtype, "minmax")
    err = (dequantize_values(codes, s, z, bits, 32) - x.float()).abs()
    assert (err <= s.float().repeat_interleave(32, 2) / 2 + 2 * ulp).all()
    c = torch.randint(0, 2**bits, (3, 5, 64), generator=g)
    assert torch.equal(unpack(pack(c, bits), bits).long(), c)


@pytest.mark.parametrize("fit", ["mse", "minmax"])
def test_requantizing_a_dequantized_group_is_exact(fit):
    x = torch.randn(H, 64, D) * 3
    x[0, 3, :] = 40.0  # an outlier token: mse narrows those groups' range
    c, s, z = quantize_keys(x, 2, 32, torch.float16, fit)
    c2, s2, z2 = quantize_keys(dequantize_keys(c, s, z, 2, 32), 2, 32, torch.float16, fit)
    assert torch.equal(c, c2) and torch.equal(s, s2) and torch.equal(z, z2)
    c, s, z = quantize_values(x, 2, 32, torch.float16, fit)
    c2, s2, z2 = quantize_values(dequantize_values(c, s, z, 2, 32), 2, 32, torch.float16, fit)
    assert torch.equal(c, c2) and torch.equal(s, s2) and torch.equal(z, z2)


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_fit_never_worse_than_minmax_per_group_and_better_with_outliers(bits):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(H, 128, D, generator=g) * torch.rand(D, generator=g) * 3
    x[:, ::29] *= 8  # heavy-tailed: a few large entries per group
    err = {}
    for fit in ("minmax", "mse"):
        c, s, z = quantize_keys(x, bits, 32, torch.float32, fit)
        err[fit] = ((dequantize_keys(c, s, z, bits, 32) - x) ** 2).reshape(H, 4, 32, D).sum(2)  # per group
    assert (err["mse"] <= err["minmax"] * (1 + 1e-6)).all()
    gain = {2: 0.8, 4: 0.995}[bits]  # 4 levels gain the most from a narrower range
    assert err["mse"].sum() < gain * err["minmax"].sum(), (err["mse"].sum(), err["minmax"].sum())
    with pytest.raises(ValueError, match="fit must be"):
        quantize_keys(x, bits, 32, torch.float32, "nope")


def test_store_frame_quantizes_better_than_post_rope():
    g = torch.Generator().manual_seed(1)
    pre = pre_keys(256, g, torch.randn(D, generator=g) * 3)
    post = rope.rotate(pre, torch.arange(1000, 1256), INV)
    st = KiviStore(info(), 2, 32, 32)
    st.load(post, torch.randn(H, 256, D))
    e_frame = rel(st.dense()[0][:, : st.nq], post[:, : st.nq])
    c, s, z = quantize_keys(post, 2, 32, torch.float32)
    e_post = rel(dequantize_keys(c, s, z, 2, 32), post)
    assert e_frame < 0.6 * e_post, (e_frame, e_post)


def test_exact_nbytes_and_bits_per_element():
    st = KiviStore(info(torch.float16), 2, 32, 128)
    g = torch.Generator().manual_seed(2)
    st.load(torch.randn(H, 1000, D, generator=g).half(), torch.randn(H, 1000, D, generator=g).half())
    # keys: 1000 >= R, so 1000 - 1000 % 32 = 992 quantized, 8 residual; values: newest 128 fp
    assert (st.nq, st.rk, st.nv, st.rv) == (992, 8, 872, 128)
    cap = 1024  # both code buffers round up to a 256-token block
    assert st.nbytes() == {
        "codes": 2 * H * cap * (D // 16) * 4,
        "scales": H * (cap // 32) * D * 2 + H * cap * (D // 32) * 2,
        "zeros": H * (cap // 32) * D * 2 + H * cap * (D // 32) * 2,
        "residual": H * 32 * D * 2 + H * 160 * D * 2,  # key rows <= R, value rows <= R + G
    }
    st.load(torch.randn(H, 4224, D, generator=g).half(), torch.randn(H, 4224, D, generator=g).half())
    n = st.nbytes()
    quant_bits = 8 * (n["codes"] + n["scales"] + n["zeros"]) / (H * D * (st.nq + st.nv))
    assert quant_bits <= 3.1, quant_bits
    full = FullStore(info(torch.float16))
    full.load(*st.dense())
    assert sum(n.values()) * 4 < sum(full.nbytes().values())


def test_key_flush_only_in_whole_groups_values_slide():
    st = KiviStore(info(), 2, 32, 64)
    g = torch.Generator().manual_seed(3)
    off = torch.randn(D, generator=g)
    feed([st], 37, g, 0, off)  # a prefill chunk waits in full precision
    assert st.nq == 0 and st.nv == 0 and st.pending is not None
    last_nq = 0
    for i in range(150):
        feed([st], 1, g, st.length, off)
        grew = st.nq - last_nq
        assert grew == 0 or (grew % 32 == 0 and grew >= 32), grew  # never a one-token flush
        last_nq = st.nq
        assert st.nq % 32 == 0 and st.rk < 64 and st.nq + st.rk == st.length
        assert st.rv == min(st.length, 64) and st.nv + st.rv == st.length
    k, v = st.dense()
    assert k.shape == v.shape == (H, 187, D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attend_matches_dequantized_reference_and_residual_is_exact(dtype):
    st = KiviStore(info(dtype), 2, 32, 64)
    g = torch.Generator().manual_seed(4)
    off = torch.randn(D, generator=g) * 2
    ks, vs = [], []
    for t in (100, 1, 1, 50, 1):
        k = rope.rotate(pre_keys(t, g, off), torch.arange(st.length, st.length + t), INV).to(dtype)
        v = torch.randn(H, t, D, generator=g).to(dtype)
        q = torch.randn(H * GQ, t, D, generator=g).to(dtype)
        dk, dv = st.dense()
        st._settle()
        ref = kivi_attn.attend(q, torch.cat((st.dense()[0], k), 1), torch.cat((st.dense()[1], v), 1), 0.125)
        out = st.attend(q, k, v, 0.125)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)
        st.append(k, v)
        ks.append(k), vs.append(v)
    k, v = torch.cat(ks, 1), torch.cat(vs, 1)
    dk, dv = st.dense()
    assert torch.equal(dk[:, st.nq:], k[:, st.nq:]) and torch.equal(dv[:, st.nv:], v[:, st.nv:])
    assert 0.01 < rel(dk, k) < 0.3 and 0.05 < rel(dv, v) < 0.5


def test_lossless_setting_equals_full_through_the_adapter():
    pytest.importorskip("transformers")
    from app.runtime.adapter import Adapter
    from app.runtime.prefill import prefill
    from policies import Chunk
    from tests.tiny import tiny_llama

    ids = torch.randint(3, 256, (300,), generator=torch.Generator().manual_seed(5))
    logits = {}
    lossless, k4, k2 = "kivi:group=16,residual=512", "kivi:bits=4,group=16,residual=32", "kivi:group=16,residual=32"
    for spec in ("full", lossless, k4, k2):  # the tiny model's head_dim is 16
        ad = Adapter(tiny_llama(0), None)
        cache = ad.new_cache(spec)
        if spec == lossless:
            assert cache.layers[0].store.lossless
        out = [prefill(ad, cache, ids[:250], plan=[128, 122], all_logits=True)]
        for i in range(250, 300):
            out.append(ad.forward(ids[i:i + 1], cache, Chunk(ids[i:i + 1], i, "decode"))[None])
        logits[spec] = torch.cat(out)
    torch.testing.assert_close(logits[lossless], logits["full"], atol=1e-4, rtol=1e-4)
    e4, e2 = rel(logits[k4], logits["full"]), rel(logits[k2], logits["full"])
    assert 0 < e4 < e2 < 0.5, (e4, e2)


def _evict(stores, g, b, new_base):
    L = stores[0].length
    idx = torch.stack([torch.sort(torch.randperm(L, generator=g)[:b])[0] for _ in range(H)])
    delta = torch.arange(new_base, new_base + b)[None] - idx
    for s in stores:
        s.compact(idx, delta)


@pytest.mark.parametrize("bits", [2, 4])
def test_repeated_eviction_error_is_bounded(bits):
    """locret+kivi: every round appends a chunk then evicts a quarter with compacted positions.
    Values never drift (per-token groups re-quantize exactly); keys re-grouped after each
    eviction drift a little: after 8 rounds within 2x of quantizing the same tokens once."""
    g = torch.Generator().manual_seed(6)
    off = torch.randn(D, generator=g) * 3
    st, fu = KiviStore(info(), bits, 32, 64), FullStore(info())
    for r in range(8):
        feed([st, fu], 128, g, fu.length + 7 * r, off)
        _evict([st, fu], g, fu.length * 3 // 4, 7 * (r + 1))  # frame moves: shift changes
    assert st.shift != 0
    k, v = fu.dense()
    once = KiviStore(info(), bits, 32, 64)
    once.load(k, v)
    sk, sv = st.dense()
    ok, ov = once.dense()
    assert rel(sv, v) <= rel(ov, v) * 1.0001
    assert rel(ok, k) < rel(sk, k) < 2 * rel(ok, k), (rel(sk, k), rel(ok, k))
    # decoding goes on; its output error is about that of quantizing once
    a, b, c = feed([st, fu, once], 1, g, fu.length + 56, off)
    assert rel(a, b) < 1.5 * rel(c, b), (rel(a, b), rel(c, b))


def test_rebase_shifts_the_frame_without_touching_codes():
    g = torch.Generator().manual_seed(7)
    st, fu = KiviStore(info(), 2, 32, 32), FullStore(info())
    feed([st, fu], 200, g, 0, torch.randn(D, generator=g))
    st._settle()
    codes = st.kc[:, : st.nq].clone()
    before = st.dense()[0]
    idx = torch.arange(200).expand(H, -1)
    st.compact(idx, torch.full_like(idx, -50))
    fu.compact(idx, torch.full_like(idx, -50))
    assert st.shift == -50 and torch.equal(st.kc[:, : st.nq], codes)
    torch.testing.assert_close(st.dense()[0], rope.rotate(before, torch.full((200,), -50), INV),
                               atol=1e-4, rtol=1e-4)
    # arbitrary (non-compacted) moves fall back to re-quantizing every key in a fresh frame:
    # keys then spin like post-RoPE keys inside a group, so the error is larger, but bounded
    idx = torch.stack([torch.sort(torch.randperm(200, generator=g)[:120])[0] for _ in range(H)])
    delta = torch.randint(-3, 3, (H, 120), generator=g)
    st.compact(idx, delta)
    fu.compact(idx, delta)
    assert rel(st.dense()[0], fu.dense()[0]) < 0.35


def test_live_conversion_and_truncate():
    g = torch.Generator().manual_seed(8)
    off = torch.randn(D, generator=g)
    fu, st = FullStore(info()), KiviStore(info(), 2, 32, 64)
    feed([fu], 300, g, 0, off)
    st.load(*fu.dense())  # full -> kivi, quantized in place
    assert st.length == 300 and st.nq == 288 and st.nv == 236
    k, v = fu.dense()
    assert torch.equal(st.dense()[0][:, 288:], k[:, 288:]) and rel(st.dense()[1], v) < 0.5
    a, b = feed([st, fu], 1, g, 300, off)
    assert rel(a, b) < 0.45
    back = FullStore(info())
    back.load(*st.dense())  # kivi -> full (lossy)
    torch.testing.assert_close(back.dense()[0], st.dense()[0])
    dk, dv = st.dense()
    st.truncate(250)  # cuts a key group: its kept tokens return to the residual as they were
    assert st.length == 250 and (st.nq, st.rk, st.nv, st.rv) == (224, 26, 186, 64)
    torch.testing.assert_close(st.dense()[0], dk[:, :250], atol=1e-5, rtol=0)
    torch.testing.assert_close(st.dense()[1], dv[:, :250], atol=1e-5, rtol=0)


def test_options_are_validated_by_name():
    assert parse_spec("kivi:bits=4,group=16,residual=64")["store"].opts["bits"] == 4
    for spec, word in [("kivi:bits=3", "bits"), ("kivi:group=64,residual=32", "group"),
                       ("kivi:group=32,residual=48", "residual"), ("kivi:residual=0", "residual")]:
        with pytest.raises(SpecError, match=word):
            parse_spec(spec)
    with pytest.raises(SpecError, match="group"):
        KiviStore(info(), 2, 24, 48)  # 24 does not divide head_dim 64
    with pytest.raises(SpecError, match="bits"):
        KiviStore(info(d=40, inv=INV[:20]), 2, 8, 64)  # 40 channels do not fill 16-code words


def test_fit_option_reaches_the_store():
    assert parse_spec("kivi:fit=minmax")["store"].opts["fit"] == "minmax"
    assert parse_spec("kivi")["store"].opts["fit"] == "mse"
    with pytest.raises(SpecError, match="fit"):
        parse_spec("kivi:fit=best")
    g = torch.Generator().manual_seed(4)
    pre = pre_keys(256, g, torch.randn(D, generator=g) * 3)
    pre[:, 0] *= 6  # an attention-sink-like first token
    post = rope.rotate(pre, torch.arange(256), INV)
    vals = torch.randn(H, 256, D, generator=g)
    err = {}
    for fit in ("minmax", "mse"):
        st = KiviStore(info(), 2, 32, 32, fit)
        st.load(post, vals)
        k, v = st.dense()
        err[fit] = (rel(k[:, : st.nq], post[:, : st.nq]), rel(v[:, : st.nv], vals[:, : st.nv]))
    assert err["mse"][0] < 0.9 * err["minmax"][0] and err["mse"][1] < 0.9 * err["minmax"][1], err
