"""Runtime behaviour on a tiny model: stop, out-of-memory, fit, conversion, save/restore."""
import json
import threading

import pytest
import torch

from app.runtime import engine
from app.runtime.engine import Runtime
from app.runtime.types import Sampling, Stopped, VramchatError
from policies import SpecError
from tiny import tiny_pair


@pytest.fixture
def rt():
    model, tok = tiny_pair(7)
    return Runtime.from_model(model, tok, chunk_size=64)


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    return p


def _state(rt):
    return rt.held.text, rt.cache.seen, rt.cache.length, [dict(m) for m in rt.messages]


def test_stop_mid_prefill_rolls_back(rt, doc):
    rt.ask("hello", max_new_tokens=4)
    before = _state(rt)
    stop = threading.Event()

    def progress(done, total):
        if done >= 128:
            stop.set()
    with pytest.raises(Stopped, match="stopped after 128 of"):
        rt.load_document(doc, progress, stop)
    assert _state(rt) == before  # the document is not half in the conversation
    res = rt.ask("again", max_new_tokens=3)
    assert res.prompt_tokens < 40


def test_stop_mid_answer_keeps_partial(rt):
    stop = threading.Event()
    pieces = []

    def on_token(p):
        pieces.append(p)
        if len(pieces) == 3:
            stop.set()
    res = rt.ask("tell me", max_new_tokens=50, on_token=on_token, stop=stop,
                 sampling=Sampling(temperature=1.0, seed=1))
    assert res.stopped and res.finish == "stopped" and 3 <= res.new_tokens < 50
    assert res.answer.startswith("".join(pieces)) and len(pieces) == 3
    assert rt.messages[-1]["role"] == "assistant" and rt.messages[-1]["partial"] is True
    assert rt.cache.seen == res.prompt_tokens + res.new_tokens  # every kept token is in the cache
    # the conversation goes on after a stop
    assert rt.ask("go on", max_new_tokens=2).new_tokens >= 0


def _oom_on_call(rt, n):
    calls = {"n": 0}
    orig = rt.adapter.forward

    def forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return orig(*a, **k)
    rt.adapter.forward = forward
    return calls


def test_oom_during_prefill_keeps_conversation(rt, doc):
    rt.ask("hi", max_new_tokens=3)
    before = _state(rt)
    _oom_on_call(rt, 3)  # the second chunk of the document
    with pytest.raises(VramchatError, match="out of memory while reading .* the conversation is intact"):
        rt.load_document(doc)
    assert _state(rt) == before
    info = rt.load_document(doc)  # works once memory is there
    assert info.tokens > 64


def test_oom_during_decode_keeps_partial_answer(rt):
    _oom_on_call(rt, 4)  # prefill is call 1; decode steps follow
    with pytest.raises(VramchatError, match="out of memory after 2 generated tokens"):
        rt.ask("hi", max_new_tokens=20, sampling=Sampling(temperature=1.0, seed=0))
    assert rt.messages[-1]["partial"] is True and rt.messages[-1]["stats"]["new_tokens"] == 2
    assert rt.cache.seen == rt.messages[-1]["stats"]["prompt_tokens"] + 2


def test_document_too_large_for_memory_is_refused_with_numbers(rt, doc, monkeypatch):
    import psutil
    real = psutil.virtual_memory()
    fake = type(real)(*[real.total, 512 * 2**20 + 10_000] + list(real[2:]))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    with pytest.raises(VramchatError) as e:
        rt.load_document(doc)
    msg = str(e.value)
    assert "policy `full` would hold" in msg and "room for about" in msg and "locret" in msg
    assert rt.cache.seen == 0 and rt.messages == []


def test_bad_inputs(rt):
    with pytest.raises(VramchatError, match="empty question"):
        rt.ask("   ")
    with pytest.raises(VramchatError, match="max-new-tokens 0"):
        rt.ask("x", max_new_tokens=0)
    with pytest.raises(SpecError, match="unknown policy `zip`"):
        rt.set_policy("zip")
    with pytest.raises(VramchatError, match="no such file"):
        rt.load_document("/nonexistent/file.txt")
    assert rt.messages == []


def test_seeded_sampling_is_reproducible(rt):
    a = rt.ask("x", max_new_tokens=8, sampling=Sampling(temperature=0.9, top_p=0.9, top_k=20, seed=5)).answer
    rt.clear()
    b = rt.ask("x", max_new_tokens=8, sampling=Sampling(temperature=0.9, top_p=0.9, top_k=20, seed=5)).answer
    assert a == b


def test_system_change_rebuilds_from_scratch(rt):
    rt.ask("one", max_new_tokens=3)
    fed = []
    orig = rt.adapter.forward
    rt.adapter.forward = lambda ids, *a, **k: (fed.extend(ids.tolist()), orig(ids, *a, **k))[1]
    rt.set_system("Be brief.")
    res = rt.ask("two", max_new_tokens=2)
    # history is re-read once because the prefix changed; the cache holds the new rendering
    assert fed[: res.prompt_tokens] == rt.tokens(rt.conv.render(rt.tok)[: len(rt.held.text)])[: res.prompt_tokens]
    assert rt.cache.seen == res.prompt_tokens + res.new_tokens
    assert rt.held.text.startswith("<|im_start|>system\nBe brief.")


def test_clear_frees_cache(rt, doc):
    rt.load_document(doc)
    assert rt.memory().kv_total() > 0
    rt.clear()
    assert rt.memory().kv_total() == 0 and rt.messages == [] and rt.context().read == 0


def test_save_and_restore_round_trip(rt, doc, tmp_path):
    rt.load_document(doc)
    rt.ask("q1", max_new_tokens=4)
    data = json.loads(json.dumps(rt.to_json()))
    text, seen = rt.held.text, rt.cache.seen
    model, tok = tiny_pair(7)
    other = Runtime.from_model(model, tok, chunk_size=64)
    other.restore(data)
    assert other.messages == rt.messages
    assert other.held.text == rt.conv.render(tok) and other.held.text.startswith(text)
    # both now hold the same tokens once the next question is read: same greedy answer
    assert other.ask("q2", max_new_tokens=6).answer == rt.ask("q2", max_new_tokens=6).answer
    assert other.cache.seen == rt.cache.seen > seen
    with pytest.raises(VramchatError, match="not a vramchat conversation"):
        other.restore({"messages": [{"role": "wizard", "content": 1}]})


def test_live_conversion_full_to_full_keeps_tokens(rt, doc):
    rt.load_document(doc)
    r1 = rt.ask("q", max_new_tokens=3)
    k0 = [l.store.dense()[0].clone() for l in rt.cache.layers]
    res = rt.set_policy("full")
    assert not res.reprefilled and not res.lossy
    assert res.before_bytes == res.after_bytes > 0
    for l, k in zip(rt.cache.layers, k0):
        torch.testing.assert_close(l.store.dense()[0], k, rtol=0, atol=0)
    assert rt.ask("q2", max_new_tokens=2).prompt_tokens < 30
    assert r1.policy == "full"


def test_chunk_size_must_be_positive():
    model, tok = tiny_pair(0)
    with pytest.raises(VramchatError, match="chunk-size"):
        Runtime.from_model(model, tok, chunk_size=-1)


def test_a_changed_chunk_size_is_the_one_reads_use():
    """A bench reads in one pass by setting `chunk_size`; the Reader's reads and checks follow."""
    r = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=16)
    seen = []
    r.prefill(list(range(5, 45)), progress=lambda done, total: seen.append(done))
    assert seen == [16, 32, 40]
    r.reset_cache()
    r.chunk_size, seen = 40, []
    r.prefill(list(range(5, 45)), progress=lambda done, total: seen.append(done))
    assert seen == [40] and r.chunk_size == r.kv.fit.chunk_size == 40
