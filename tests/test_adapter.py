"""The adapter's views of a layer's attention (`query_states`, `attn_scale`, `qkv_weights`)
against what the model's own attention computes, per architecture."""
from __future__ import annotations

import pytest
import torch

from app.runtime.adapter import Adapter
from policies import Chunk
from tiny import tiny_arch, tiny_llama

# Phi-3 with half of each head rotated: its own apply_rotary_pos_emb passes the rest through
ARCHS = {"llama": lambda: tiny_llama(0), "qwen2": lambda: tiny_arch("qwen2"), "qwen3": lambda: tiny_arch("qwen3"),
         "phi3": lambda: tiny_arch("phi3", partial_rotary_factor=0.5)}


def _model(arch):
    """The tiny model with noise on every parameter: transformers initialises biases to
    zero and norm gains to one, which would hide a missing bias or q_norm."""
    model = ARCHS[arch]()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _attention_inputs(ad: Adapter, ids: torch.Tensor, start: int):
    """Prefill `start` tokens, then run the rest as one chunk at positions start..: -> (each
    layer's normed input [T, hidden], each layer's (q [Hq, T, D], scale) as handed to our
    registered attention function)."""
    cache = ad.new_cache("full")
    ad.forward(ids[:start], cache, Chunk(ids[:start], 0))
    seen = {}
    for layer in cache.layers:
        run = layer.forward

        def spy(q, k, v, scale, chunk, _run=run, _i=layer.layer):
            seen[_i] = (q.clone(), scale)
            return _run(q, k, v, scale, chunk)
        layer.forward = spy
    chunk = Chunk(ids[start:], start)
    hidden = chunk.hidden
    ad.forward(chunk.input_ids, cache, chunk, capture_hidden=True)
    return hidden, seen


@pytest.mark.parametrize("arch", list(ARCHS))
def test_query_states_equal_the_models_own_queries(arch):
    model = _model(arch)
    ad = Adapter(model, None, arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (21,), generator=g)
    hidden, seen = _attention_inputs(ad, ids, 13)
    pos = torch.arange(13, 21)
    assert len(seen) == ad.info.n_layers
    for i, (q, scale) in seen.items():
        with torch.inference_mode():
            mine = ad.query_states(i, hidden[i], pos)
        assert mine.shape == (ad.info.n_q_heads, 8, ad.info.head_dim)
        torch.testing.assert_close(mine, q, rtol=1e-5, atol=1e-5)
        assert ad.attn_scale(i) == scale
    assert ad.hidden_act == model.config.hidden_act


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_qkv_weights_project_q_k_and_v_as_the_model_does(arch):
    model = _model(arch)
    ad = Adapter(model, None, arch)
    x = torch.randn(5, ad.info.hidden_size, generator=torch.Generator().manual_seed(1))
    for i, layer in enumerate(ad.layers):
        w, b = ad.qkv_weights(i)
        a = layer.self_attn
        with torch.no_grad():
            want = a.qkv_proj(x) if arch == "phi3" else torch.cat((a.q_proj(x), a.k_proj(x), a.v_proj(x)), -1)
        got = x @ w.t() + (b if b is not None else 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (b is not None) == (arch == "qwen2")
