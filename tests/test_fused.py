"""One-kernel RMSNorm and RoPE (`policies/kernels/fused.py`) against transformers' own
modules, and the adapter routing a model's norms and RoPE through them.

On CPU the kernels run under the Triton interpreter (`TRITON_INTERPRET=1`), whose
float32 -> bfloat16 cast truncates where a GPU rounds to nearest: bfloat16 cases allow
one unit in the last place more on the CPU than on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

import app.runtime.adapter as adapter_mod
from app.runtime.engine import Runtime
from policies.kernels import fused, triton_ok
from policies.kernels.switch import Kernels
from tiny import tiny_pair

cpu_only = pytest.mark.skipif(not triton_ok("cpu"), reason="needs triton and TRITON_INTERPRET=1 on a CPU")
cuda = pytest.mark.skipif(not triton_ok("cuda"), reason="needs a CUDA GPU and triton")
DTYPES = [torch.float32, torch.bfloat16]


def _ulps(a, b):
    """Largest difference in units of the output dtype's last place (at b's magnitude)."""
    eps = torch.finfo(b.dtype).eps
    return ((a.double() - b.double()).abs() / (b.double().abs() * eps).clamp_min(1e-30)).max().item()


def _norm_case(dtype, device, n=96):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(1, 5, n, generator=g) * 3).to(device, dtype)
    return x, torch.randn(n, generator=g).to(device, dtype)


def _rope_case(dtype, device, hq=6, hkv=2, t=5, d=64):
    g = torch.Generator().manual_seed(d)
    # q/k as the attention module makes them: [1, T, H*D] viewed [1, H, T, D] (strided)
    q = torch.randn(1, t, hq * d, generator=g).view(1, t, hq, d).transpose(1, 2).to(device, dtype)
    k = torch.randn(1, t, hkv * d, generator=g).view(1, t, hkv, d).transpose(1, 2).to(device, dtype)
    ang = torch.randn(1, t, d // 2, generator=g) * 50
    emb = torch.cat((ang, ang), -1)
    return q, k, emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def test_references_are_transformers_code():
    x, w = _norm_case(torch.float32, "cpu")
    norm = modeling_llama.LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data.copy_(w)
    assert torch.equal(fused.rmsnorm_reference(x, w, 1e-5), norm(x))
    q, k, cos, sin = _rope_case(torch.float32, "cpu")
    for a, b in zip(fused.rope_reference(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


def _check(dtype, device, ulps):
    x, w = _norm_case(dtype, device)
    out = fused.rmsnorm(x, w, 1e-5)
    ref = fused.rmsnorm_reference(x.double(), w.double(), 1e-5)  # exact, then compared in units of dtype
    assert out.shape == x.shape and out.dtype == dtype
    assert _ulps(out, ref.to(dtype)) <= ulps  # the module itself rounds twice (before and after scaling)
    q, k, cos, sin = _rope_case(dtype, device)
    assert fused.rope_fits(q, k, cos, sin)
    qo, ko = fused.rope(q, k, cos, sin)
    qr, kr = fused.rope_reference(q.double(), k.double(), cos.double(), sin.double())
    for a, b, x in ((qo, qr, q), (ko, kr, k)):
        assert a.dtype == dtype and a.stride() == x.stride()
        tol = 2e-6 if dtype == torch.float32 else ulps * 2 ** -7  # rope's outputs are O(1)
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 4)


@cpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_exact_interpreted(dtype):
    _check(dtype, "cpu", 2 if dtype == torch.float32 else 3)


@cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_kernels_match_exact_cuda(dtype):
    _check(dtype, "cuda", 2)


def test_rope_fits_only_full_rotary_batch_one():
    q, k, cos, sin = _rope_case(torch.float32, "cpu")
    assert fused.rope_fits(q, k, cos, sin) == triton_ok("cpu")
    assert not fused.rope_fits(q, k, cos[..., :32], sin[..., :32])  # partial rotary (Phi-3 style)
    assert not fused.rope_fits(torch.cat((q, q)), torch.cat((k, k)), cos, sin)
    assert not fused.rope_fits(q, k, cos.double(), sin.double())  # the reference would promote


def test_adapter_routes_norms_and_rope():
    rt = Runtime.from_model(*tiny_pair(0), policy="full", model_id="tiny")
    n_layers = rt.adapter.info.n_layers
    assert rt.adapter.fused == {"rmsnorm": 2 * n_layers + 1, "rope": modeling_llama.__name__}
    assert getattr(modeling_llama.apply_rotary_pos_emb, "vramchat_fused", False)


@cpu_only
@pytest.mark.parametrize("spec", ["full", "ffnskip"])
def test_model_with_fused_kernels_equals_without(spec, monkeypatch):
    """The same prefill and decode logits with the kernels on ("always", interpreted) and off;
    ffnskip wraps the same norm, so the fused one must sit under its wrapper."""
    calls = {"norm": 0, "rope": 0}
    norm, rope = fused.rmsnorm, fused.rope
    monkeypatch.setattr(fused, "rmsnorm", lambda *a: calls.__setitem__("norm", calls["norm"] + 1) or norm(*a))
    monkeypatch.setattr(fused, "rope", lambda *a: calls.__setitem__("rope", calls["rope"] + 1) or rope(*a))
    ids = list(range(5, 45))
    out = {}
    for mode in ("off", "always"):
        rt = Runtime.from_model(*tiny_pair(0), policy=spec, model_id="tiny", chunk_size=16)
        rt.adapter.info.kernels = Kernels(fused="on" if mode == "always" else "off")
        out[mode] = [rt.prefill(ids)] + [rt.adapter.forward(torch.tensor([t]), rt.cache,
                                                             rt_chunk(rt, t)) for t in (7, 9)]
    layers = rt.adapter.info.n_layers
    assert calls["rope"] >= 3 * layers and calls["norm"] >= 3 * (2 * layers + 1)
    for a, b in zip(out["always"], out["off"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def rt_chunk(rt, t):
    from policies import Chunk
    return Chunk(torch.tensor([t]), rt.cache.next_position, "decode")


def test_remote_code_norms_are_left_alone():
    """A class that only shares transformers' name (as remote code may) is not replaced."""
    class LlamaRMSNorm(torch.nn.Module):  # same name, another module, other arithmetic
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(64))
            self.variance_epsilon = 1e-6

        def forward(self, h):
            return h * 2

    m, t = tiny_pair(0)
    m.model.norm = LlamaRMSNorm()
    rt = Runtime.from_model(m, t, policy="full", model_id="tiny")
    assert rt.adapter.fused["rmsnorm"] == 2 * rt.adapter.info.n_layers
    assert "forward" not in vars(m.model.norm)


@cpu_only
def test_kernels_stay_out_of_autograd_and_other_signatures(monkeypatch):
    q, k, cos, sin = _rope_case(torch.float32, "cpu")
    Runtime.from_model(*tiny_pair(0), policy="full", model_id="tiny")  # patches the module's rope
    calls = []
    rope = fused.rope
    monkeypatch.setattr(fused, "rope", lambda *a: calls.append(1) or rope(*a))
    want = fused.rope_reference(q, k, cos, sin)
    with torch.no_grad(), adapter_mod.use_kernels(Kernels(fused="on")):
        got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        assert len(calls) == 1
        got2 = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, 1)  # positional: the original runs
        assert len(calls) == 1
    qg = q.clone().requires_grad_(True)
    with adapter_mod.use_kernels(Kernels(fused="on")):
        out = modeling_llama.apply_rotary_pos_emb(qg, k, cos, sin)  # grad enabled: the original runs
    assert len(calls) == 1 and out[0].requires_grad
    for a, b in zip(got + got2, want + want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_transformers_baselines_run_without_our_kernels(monkeypatch):
    """A baseline runs transformers' own forward: no fused kernel, whatever our switchboard says."""
    from app.bench.common import hf_attention
    rt = Runtime.from_model(*tiny_pair(0), policy="full", model_id="tiny")
    rt.adapter.info.kernels = Kernels(fused="on")
    calls = []
    norm = fused.rmsnorm
    monkeypatch.setattr(fused, "rmsnorm", lambda *a: calls.append(1) or norm(*a))
    with hf_attention(rt.adapter.model), torch.no_grad():
        rt.adapter.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls == []


def _other_arch(arch):
    """A tiny random model of another architecture users load (Qwen2 has q/k/v biases;
    Phi-3 fused projections and its own partial-rotary RoPE)."""
    import transformers as tf
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, pad_token_id=0)
    cfg, cls = {"mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM)}[arch]
    torch.manual_seed(0)
    return cls(cfg(**common)).eval()


@cpu_only
@pytest.mark.parametrize("arch,rope", [("mistral", True), ("qwen2", True), ("phi3", False)])
def test_other_architectures_fused_equal_unfused(arch, rope, monkeypatch):
    from app.runtime.adapter import Adapter
    from policies import Chunk
    import copy
    model = _other_arch(arch)
    ids = torch.arange(5, 37)
    out = {}
    for mode in ("off", "always"):
        ad = Adapter(copy.deepcopy(model), None, arch)
        ad.info.kernels = Kernels(fused="on" if mode == "always" else "off")
        assert ad.fused["rmsnorm"] == 2 * 2 + 1 and bool(ad.fused["rope"]) == rope
        cache = ad.new_cache("full")
        out[mode] = ad.forward(ids, cache, Chunk(ids, 0, "prefill"), all_logits=True)
    torch.testing.assert_close(out["always"], out["off"], rtol=1e-5, atol=1e-5)


def test_a_second_adapter_does_not_wrap_twice():
    from app.runtime.adapter import Adapter
    m, t = tiny_pair(0)
    a = Adapter(m, t)
    first = m.model.norm.forward
    b = Adapter(m, t)
    assert m.model.norm.forward is first and a.fused == b.fused
