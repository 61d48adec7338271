"""The architecture matrix: tiny random models of the architectures people bring, saved to a
folder and loaded through `--model` as a user's would be. For each: our `full` equals the
model's own eager attention (sliding windows, soft-capping, query pre-scaling, q/k norms,
biases, fused qkv and partial rotary included), and every registered policy passes the
conformance checks (lossless equals `full`, exact bytes, live conversion) or is refused
with a message naming the policy and the architecture."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from app.runtime.engine import Runtime
from app.runtime.prefill import prefill
from policies import REGISTRY, SpecError
from test_policies_conformance import LOSSLESS, _hand_count
from tiny import random_heads, tiny_tokenizer

CHUNK, N, W = 32, 200, 48  # chunked prefill, context, sliding window: N > W, so windows bind
BASE = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(head_dim=16, sliding_window=W, query_pre_attn_scalar=24, tie_word_embeddings=True,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
# arch -> (transformers class prefix, config overrides, policies it must refuse)
ARCHS = {
    "llama": ("Llama", {}, set()),
    "mistral": ("Mistral", dict(sliding_window=W), {"kivi", "doublesparse"}),
    "qwen2": ("Qwen2", {}, set()),  # q/k/v biases
    "qwen3": ("Qwen3", dict(head_dim=16), set()),  # q/k norms
    "phi3": ("Phi3", dict(partial_rotary_factor=0.5), set()),  # fused qkv, partial rotary
    "gemma2": ("Gemma2", dict(GEMMA, attn_logit_softcapping=20.0, final_logit_softcapping=15.0),
               {"kivi", "doublesparse", "ffnskip"}),
    "gemma3": ("Gemma3", dict(GEMMA, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                  "sliding_attention"]),
               {"kivi", "doublesparse", "ffnskip"} | {n for n, e in REGISTRY.items() if e.slot == "selector"} - {"full"}),
}
EXTRA = {"offload": "offload", "doublesparse": "doublesparse:keep=1,dense_layers=0,channels_file={ch}"}


def _build(arch: str, folder):
    name, over, _ = ARCHS[arch]
    cfg_cls = getattr(tf, f"{name}TextConfig" if arch == "gemma3" else f"{name}Config")
    torch.manual_seed(0)
    model = getattr(tf, f"{name}ForCausalLM")(cfg_cls(**(BASE | over))).eval()
    with torch.no_grad():  # larger weights: peaked attention, so a missed window or cap shows
        for pname, p in model.named_parameters():
            if "proj" in pname:
                p.mul_(3.0)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """arch -> {folder, heads, ch, ref: (full's prefill logits [N, V], full's answer)}, made once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            d = tmp_path_factory.mktemp(arch)
            _build(arch, d / "model")
            rt = Runtime.load(str(d / "model"), device="cpu", weights="fp32", chunk_size=CHUNK)
            info = rt.adapter.info
            heads = random_heads(info, d / "heads.safetensors", seed=5)
            from offload.calibrate import save
            from policies.files import model_key
            stat = torch.rand(info.n_layers, info.n_kv_heads, info.head_dim, generator=torch.Generator().manual_seed(0))
            ch = save(d / "ch.safetensors", stat, 4, model_key(info), ["tiny"], 0, "random (test)")
            logits = prefill(rt.adapter, rt.cache, _ids(), CHUNK, all_logits=True)
            answer = rt.ask("what is it?", max_new_tokens=6).answer
            cache[arch] = dict(folder=str(d / "model"), heads=str(heads), ch=str(ch), ref=(logits, answer))
        return cache[arch]
    return get


def _ids(n=N):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (n,), generator=g)
    ids[::17] = ord(".") + 4  # separators, so `anchor` has anchors
    return ids.tolist()


def _spec(name, b):
    spec = EXTRA.get(name) or LOSSLESS.get(name) or name
    return spec.format(heads=b["heads"], ch=b["ch"])


@pytest.mark.parametrize("arch", ARCHS)
def test_full_equals_the_model(arch, built):
    """Our attention and cache against transformers' eager attention, past the window,
    chunked, then three decode steps."""
    from app.runtime.decode import Decoder
    b = built(arch)
    ref = tf.AutoModelForCausalLM.from_pretrained(b["folder"], attn_implementation="eager", dtype=torch.float32)
    ids = _ids()
    rt = Runtime.load(b["folder"], device="cpu", weights="fp32", chunk_size=CHUNK)
    ours = prefill(rt.adapter, rt.cache, ids, CHUNK, all_logits=True)
    steps = []
    with Decoder(rt.adapter, rt.cache) as dec:
        for tok in (5, 77, 130):
            steps.append(dec.step(torch.tensor([tok])))
            ids = ids + [tok]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs[:N], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps), theirs[N:], rtol=1e-4, atol=1e-4)


def test_model_info_says_what_attention_does(built):
    infos = {a: Runtime.load(built(a)["folder"], device="cpu", weights="fp32").adapter.info for a in
             ("llama", "mistral", "gemma2", "gemma3")}
    assert infos["llama"].windows == () and infos["llama"].softcap == 0 and infos["llama"].local_inv_freq is None
    assert infos["mistral"].windows == (W,) * 4
    assert infos["gemma2"].windows == (W, 0, W, 0) and infos["gemma2"].softcap == 20.0
    g3 = infos["gemma3"]
    assert g3.windows == (W, W, 0, W) and g3.local_inv_freq is not None
    assert not torch.equal(g3.local_inv_freq, g3.inv_freq)  # 10K vs 1M base
    assert g3.kernels.window == "off"  # the Triton window kernel applies neither window nor cap


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("arch", ARCHS)
def test_policy_conforms_or_is_refused(arch, name, built):
    b = built(arch)
    spec = _spec(name, b)
    refused = name in ARCHS[arch][2]
    try:
        rt = Runtime.load(b["folder"], policy=spec, device="cpu", weights="fp32", chunk_size=CHUNK)
    except SpecError as e:
        assert refused, f"`{name}` refused on {arch}: {e}"
        assert f"`{name}`" in str(e) and arch in str(e)
        return
    assert not refused, f"`{name}` should be refused on {arch}"
    # lossless: the same logits and the same greedy answer as `full`
    logits = rt.prefill(_ids())
    assert rt.cache.length == rt.cache.seen == N
    torch.testing.assert_close(logits, b["ref"][0][-1], rtol=1e-4, atol=1e-4)
    assert rt.ask("what is it?", max_new_tokens=6).answer == b["ref"][1]
    # exact bytes
    want = _hand_count(rt.cache)
    if want is not None:
        assert +rt.cache.nbytes() == want
    # live conversion from `full`
    live = Runtime.load(b["folder"], device="cpu", weights="fp32", chunk_size=CHUNK)
    live.ask("x" * 120 + " what is it?", max_new_tokens=4)
    seen = live.cache.seen
    res = live.set_policy(spec)
    assert live.policy == live.cache.spec and (res.reprefilled or live.cache.seen == seen)
    assert live.ask("and?", max_new_tokens=3).new_tokens >= 0 and live.cache.seen > seen


def test_loads_through_the_command_line(built, capsys):
    """`main.py ask --model FOLDER` on a Gemma 2 folder, and a refused spec's message."""
    from app.cli import main
    b = built("gemma2")
    assert main(["ask", "--model", b["folder"], "--device", "cpu", "--json", "--max-new-tokens", "3", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["answers"][0]["new_tokens"] <= 3
    assert main(["ask", "--model", b["folder"], "--device", "cpu", "--policy", "kivi", "hi"]) == 2
    err = capsys.readouterr().err
    assert "`kivi` cannot serve gemma2" in err and "sliding-window layers and logit soft-capping" in err
