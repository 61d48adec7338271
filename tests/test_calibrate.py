"""Outlier-channel calibration: the qk statistic, its accumulation, files, the shipped one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.outlier_channels import collect
from app.runtime.adapter import Adapter
from offload import calibrate as cal
from policies import ModelInfo, SpecError
from tiny import tiny_llama


def test_qk_sum_is_per_token_query_times_own_key_over_the_group():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    want = torch.zeros(2, 8, dtype=torch.float64)
    for h in range(6):
        for t in range(5):
            want[h // 3] += (q[h, t].double() * k[h // 3, t].double()).abs()
    torch.testing.assert_close(cal.qk_sum(q, k), want)


def test_two_half_blocks_equal_one_block():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 40, 8, generator=g), torch.randn(2, 40, 8, generator=g)
    one, two = cal.QKStats(1, 2, 8), cal.QKStats(1, 2, 8)
    one.add(0, q, k)
    two.add(0, q[:, :10], k[:, :10])
    two.add(0, q[:, 10:], k[:, 10:])
    torch.testing.assert_close(one.mean(), two.mean())
    assert two.tokens[0] == 40
    # a running *mean* that overwrote per block (the reference script's bug) would differ
    last = cal.QKStats(1, 2, 8)
    last.add(0, q[:, 10:], k[:, 10:])
    assert not torch.allclose(last.mean(), one.mean())


def test_collect_on_a_model_matches_its_post_rope_q_and_k():
    ad = Adapter(tiny_llama(0), None)
    ids = torch.randint(3, 256, (48,), generator=torch.Generator().manual_seed(2))
    whole = collect(ad, [ids])
    halves = collect(ad, [ids[:24], ids[24:]])
    assert whole.tokens.tolist() == [48] * ad.info.n_layers
    # different blocks see different contexts, so only the token count must agree exactly
    assert halves.tokens.tolist() == whole.tokens.tolist()
    # layer 0's k and the first layer's q depend on context only through position: recompute
    attn = ad.layers[0].self_attn
    with torch.no_grad():
        x = ad.layers[0].input_layernorm(ad.decoder.embed_tokens(ids[None]))[0]
        d = ad.info.head_dim
        q = attn.q_proj(x).view(48, -1, d).transpose(0, 1)
        k = attn.k_proj(x).view(48, -1, d).transpose(0, 1)
        from policies import rope
        pos = torch.arange(48)
        q, k = rope.rotate(q, pos, ad.info.inv_freq), rope.rotate(k, pos, ad.info.inv_freq)
    torch.testing.assert_close(whole.sums[0], cal.qk_sum(q, k), rtol=1e-4, atol=1e-4)


def test_save_load_roundtrip_and_refusals(tmp_path):
    ad = Adapter(tiny_llama(0), None)
    stat = torch.rand(ad.info.n_layers, ad.info.n_kv_heads, ad.info.head_dim)
    p = cal.save(tmp_path / "c.safetensors", stat, 4, cal.model_key(ad.info), ["tiny"], 100, "test data")
    got, meta = cal.load(p, ad.info)
    torch.testing.assert_close(got, stat)
    assert meta["channels"] == "4" and meta["data"] == "test data" and meta["statistic"] == "qk"
    ch = cal.find_channels(ad.info, 5, str(p))
    assert ch.shape == (ad.info.n_layers, ad.info.n_kv_heads, 5)
    assert torch.equal(ch, stat.topk(5, -1).indices.sort(-1).values)
    with pytest.raises(SpecError, match="must be between 1 and head_dim 16"):
        cal.find_channels(ad.info, 17, str(p))
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "nope"})
    with pytest.raises(SpecError, match="not a vramchat channels file"):
        cal.load(bad)


SHIPPED = Path(cal.CHANNELS_DIR) / "SmolLM2-135M-Instruct.safetensors"


class _Tok:
    def __len__(self):
        return 49152


def _smol_info():
    """SmolLM2-135M-Instruct's shapes, without loading it."""
    return ModelInfo(n_layers=30, n_q_heads=9, n_kv_heads=3, head_dim=64, dtype=torch.float32,
                     device=torch.device("cpu"), inv_freq=torch.ones(32), window=8192,
                     model_id="SmolLM2-135M-Instruct", hidden_size=576, tokenizer=_Tok())


def test_shipped_channels_load_for_the_default_model():
    info = _smol_info()
    assert cal.shipped(info) == SHIPPED
    stat, meta = cal.load(SHIPPED, info)
    assert stat.shape == (30, 3, 64) and torch.isfinite(stat).all() and (stat > 0).all()
    assert meta["command"].startswith("python main.py calibrate") and "sha256" in meta["data"]
    assert json.loads(meta["names"]) == ["SmolLM2-135M-Instruct"]
    ch = cal.find_channels(info, 16)
    assert ch.shape == (30, 3, 16)
    # real keys are far from uniform: the top 16 of 64 channels carry most of the statistic
    share = stat.gather(-1, ch).sum(-1) / stat.sum(-1)
    assert share.mean() > 0.4
    other = _smol_info()
    other.model_id = "some-other-model"
    with pytest.raises(SpecError, match="none ship in"):
        cal.find_channels(other, 16)
