"""The `full` policy through our own loop equals the plain transformers model."""
import pytest
import torch

from app.runtime.adapter import Adapter
from app.runtime.engine import Runtime
from app.runtime.prefill import prefill
from policies import Chunk
from tiny import tiny_llama, tiny_pair


def _reference_logits(seed, ids, **over):
    ref = tiny_llama(seed, **over)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()


@pytest.mark.parametrize("chunk", [1, 7, 64, 200])
@pytest.mark.parametrize("over", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1, "num_attention_heads": 4}])
def test_chunked_prefill_matches_plain_forward(chunk, over):
    torch.manual_seed(chunk)
    ids = torch.randint(3, 256, (150,))
    ref = _reference_logits(1, ids, **over)
    ad = Adapter(tiny_llama(1, **over), None)
    cache = ad.new_cache("full")
    got = prefill(ad, cache, ids, chunk, all_logits=True)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert cache.length == cache.seen == cache.next_position == 150


def test_full_bytes_are_exact():
    ad = Adapter(tiny_llama(0), None)
    cache = ad.new_cache("full")
    ids = torch.randint(3, 256, (300,))
    ad.forward(ids, cache, Chunk(ids, 0))
    info = ad.info
    by = cache.nbytes()
    cap = cache.layers[0].store.k.shape[1]
    assert cap >= 300 and cap % 256 == 0
    per = info.n_kv_heads * cap * info.head_dim * 4
    assert by[("gpu", "keys")] == by[("gpu", "values")] == per * info.n_layers
    assert set(by) == {("gpu", "keys"), ("gpu", "values")}


def _spy_ids(rt):
    fed = []
    orig = rt.adapter.forward

    def spy(ids, cache, chunk, **kw):
        fed.extend(ids.tolist())
        return orig(ids, cache, chunk, **kw)
    rt.adapter.forward = spy
    return fed


@pytest.mark.parametrize("chunk", [5, 64])
def test_multiturn_greedy_equals_generate(chunk):
    """Each turn prefills only its new tokens; greedy tokens equal model.generate on the
    same ids from scratch (HF's own cache), for every turn."""
    model, tok = tiny_pair(3)
    rt = Runtime.from_model(model, tok, chunk_size=chunk)
    fed = _spy_ids(rt)
    ref = tiny_pair(3)[0]
    for q in ["What is in the box?", "Tell me more.", "Why?"]:
        before = len(fed)
        res = rt.ask(q, max_new_tokens=12)
        # the prompt fed this turn = everything since the last answer, nothing older
        prompt = fed[: before + res.prompt_tokens]
        assert res.prompt_tokens < 40, "history must not be re-prefilled"
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           eos_token_id=list(rt.stop_ids), pad_token_id=0)
        want = [t for t in out[0, len(prompt):].tolist() if t not in rt.stop_ids]
        got = fed[before + res.prompt_tokens:]  # every generated token except the stop token is fed
        assert len(got) == res.new_tokens
        assert got == want


def test_document_then_questions_share_one_prefill():
    model, tok = tiny_pair(4)
    rt = Runtime.from_model(model, tok, chunk_size=32)
    fed = _spy_ids(rt)
    import tempfile, os
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("alpha beta gamma. " * 40)
    try:
        info = rt.load_document(fh.name)
    finally:
        os.unlink(fh.name)
    n_doc = len(fed)
    assert info.tokens == n_doc > 700
    r1 = rt.ask("first?", max_new_tokens=3)
    assert r1.prompt_tokens < 30  # the document was not read again
    # The cache holds exactly the rendering of the conversation: doc + question merged
    # into one user message, as the template renders it from scratch.
    full = rt.conv.render(tok, pending=None)
    assert rt.held.text.startswith(full[: full.index("first?") + len("first?")])
