"""serve: an answer's sources and their note in its `vramchat` field, streamed or not (a tiny
model on a loopback port). A request's messages carry no documents, so the served runtime is
given one the way a conversation holds it (a `document` message before the request's own)."""
import openai
import pytest

from app.runtime.engine import Runtime
from app.server import Background, Serving
from tiny import tiny_pair

LINES = [f"Line {n} of the notes tells of foxes and the old mill." for n in range(1, 41)]
LINES[4] = "Zorblax keeps the vault code 48213."
DOC = {"role": "document", "name": "notes.txt", "content": "\n".join(LINES)}


def _runtime(with_doc: bool) -> Runtime:
    model, tok = tiny_pair(7)
    rt = Runtime.from_model(model, tok, model_id="tiny", chunk_size=64)
    if with_doc:
        given = rt.set_conversation
        rt.set_conversation = lambda system, messages: given(system, [DOC] + list(messages))
    return rt


def _serve(rt):
    serving = Serving(rt, policy="full", max_queue=4).start()
    return serving, Background(serving)


def _client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def _check(sources):
    assert 0 < len(sources) <= 3
    for s in sources:
        assert set(s) == {"document", "page", "line", "text", "weight", "tier"}
        assert s["document"] == "notes.txt" and s["page"] is None and s["tier"] == "device"
        assert LINES[s["line"] - 1] == s["text"] and 0 < s["weight"] <= 1
    assert sum(s["weight"] for s in sources) <= 1 + 1e-6
    assert [s["weight"] for s in sources] == sorted((s["weight"] for s in sources), reverse=True)


def test_sources_in_the_answer_and_the_last_streamed_chunk():
    serving, bg = _serve(_runtime(with_doc=True))
    ask = [{"role": "user", "content": "What do the notes say about the mill?"}]
    with bg as url:
        c = _client(url)
        r = c.chat.completions.create(model="tiny", messages=ask, max_tokens=6, temperature=0)
        ext = r.model_extra["vramchat"]
        assert ext["sources"] == serving.last.result.sources and ext["sources_note"] == ""
        _check(ext["sources"])
        chunks = list(c.chat.completions.create(model="tiny", messages=ask + [
            {"role": "assistant", "content": r.choices[0].message.content},
            {"role": "user", "content": "And the foxes?"}], max_tokens=6, temperature=0, stream=True))
        last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
        streamed = last.model_extra["vramchat"]
        assert streamed["sources"] == serving.last.result.sources and streamed["sources_note"] == ""
        _check(streamed["sources"])
        assert all("vramchat" not in (ch.model_extra or {}) for ch in chunks if ch is not last)


def test_the_note_when_what_answers_was_evicted():
    serving, bg = _serve(_runtime(with_doc=True))
    with bg as url:
        r = _client(url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What does zorblax keep?"}], max_tokens=4,
            temperature=0, extra_body={"vramchat": {"policy": "streaming:sinks=4,window=64,chunk=32"}})
    ext = r.model_extra["vramchat"]
    assert ext["policy"].startswith("streaming")
    assert ext["sources_note"].startswith("the part of the document that answers this may have been evicted")
    assert "“zorblax”" in ext["sources_note"] and "notes.txt line 5" in ext["sources_note"]
    assert all(s["line"] != 5 for s in ext["sources"])


def test_a_chat_without_documents_has_none():
    serving, bg = _serve(_runtime(with_doc=False))
    with bg as url:
        r = _client(url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say something about foxes."}], max_tokens=4,
            temperature=0)
    assert r.model_extra["vramchat"]["sources"] == [] and r.model_extra["vramchat"]["sources_note"] == ""


@pytest.mark.parametrize("on", [True, False])
def test_a_runtime_with_sources_off_serves_none(on):
    rt = _runtime(with_doc=True)
    rt.sources = on
    serving, bg = _serve(rt)
    with bg as url:
        r = _client(url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What about the mill?"}], max_tokens=4,
            temperature=0)
    assert bool(r.model_extra["vramchat"]["sources"]) is on
