"""`serve` as stock clients use it: `auto` kept on across requests and asked for per request,
its notes in the log, a final assistant message continued (lm-eval's RULER), raw text
completions, the model's own sampling defaults, Prometheus metrics. A tiny model with a
256-token window makes "long" cheap. Nothing waits on the clock."""
import json
import logging
from types import SimpleNamespace

import httpx
import openai
import pytest
from transformers import GenerationConfig

from app.cli import main
from app.runtime.engine import Runtime
from app.runtime.remote import kv_usage_line, prometheus
from app.server import Background, Serving, schema
from app.server import cli as serve_cli
from tiny import tiny_pair

BOUND_S = 120
WINDOW = 256
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something about foxes."}]


def _long(word: str) -> list[dict]:
    return [{"role": "user", "content": f"{word} and no play. " * 16 + "What was it?"}]  # ~370 tokens


def _runtime(policy: str = "full", **over) -> Runtime:
    model, tok = tiny_pair(7, max_position_embeddings=WINDOW, **over)
    return Runtime.from_model(model, tok, policy=policy, model_id="tiny", chunk_size=64)


def _client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=BOUND_S)


@pytest.fixture
def served():
    serving = Serving(_runtime(), max_queue=4).start()
    with Background(serving) as url:
        yield serving, url


def _ext(r) -> dict:
    return r.model_extra["vramchat"]


def test_serve_without_policy_stays_auto_across_long_requests(monkeypatch, capsys):
    """`main.py serve` with no --policy: every request runs under auto, which compresses
    past the window each time (not `full` from the second request on), and its choices
    reach stderr as they happen."""
    monkeypatch.setattr(Runtime, "load", staticmethod(lambda model=None, *, policy="full", **kw: _runtime(policy)))
    got = {}

    def run(serving, host, port, key=None, on_ready=None):  # instead of blocking in uvicorn
        got["serving"] = serving
        on_ready("http://127.0.0.1:1/v1")
    monkeypatch.setattr(serve_cli, "run", run)
    assert main(["serve", "--port", "0"]) == 0
    serving = got["serving"]
    assert "serving tiny (policy auto, now `full`)" in capsys.readouterr().err
    with Background(serving) as url:
        c = _client(url)
        r1 = c.chat.completions.create(model="tiny", messages=_long("All work"), max_tokens=4, temperature=0)
        r2 = c.chat.completions.create(model="tiny", messages=_long("All play"), max_tokens=4, temperature=0)
        rt = serving.rt
        assert rt.auto and rt.auto_choice.spec != "full" and rt.cache.evicts
        for r in (r1, r2):
            assert _ext(r)["auto"] and _ext(r)["policy"] == rt.auto_choice.spec
        assert r2.usage.prompt_tokens > WINDOW and rt.context().retained < rt.context().read
        assert any(f"auto chose `{rt.auto_choice.spec}`" in n for n in _ext(r1)["notes"])
        err = capsys.readouterr().err
        assert f"vramchat: auto chose `{rt.auto_choice.spec}` (was `full`)" in err
        assert "warning:" not in err  # auto never keeps every position past the window


def test_auto_per_request_and_back(served):
    serving, url = served
    c = _client(url)
    r = c.chat.completions.create(model="tiny", messages=_long("All work"), max_tokens=3, temperature=0,
                                  extra_body={"vramchat": {"policy": " auto "}})
    rt = serving.rt
    assert _ext(r)["auto"] and rt.auto and _ext(r)["policy"] == rt.auto_choice.spec != "full"
    assert httpx.get(f"{url}/vramchat/memory").json()["auto"] is True
    again = c.chat.completions.create(model="tiny", messages=_long("All play"), max_tokens=3, temperature=0,
                                      extra_body={"vramchat": {"policy": "auto"}})
    assert _ext(again)["auto"] and _ext(again)["policy"] == rt.auto_choice.spec
    back = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)  # the default
    assert _ext(back)["policy"] == "full" and not _ext(back)["auto"] and not rt.auto
    assert back.usage.prompt_tokens_details.cached_tokens == 0  # another policy: a fresh cache


def test_a_request_naming_autos_choice_leaves_auto():
    serving = Serving(_runtime("auto"), max_queue=2).start()
    assert serving.default_policy == "auto"
    with Background(serving) as url:
        c = _client(url)
        r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
        assert _ext(r)["auto"] and _ext(r)["policy"] == "full"  # short: auto holds `full`
        named = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0,
                                          extra_body={"vramchat": {"policy": "full"}})
        assert not _ext(named)["auto"] and not serving.rt.auto
        long = c.chat.completions.create(model="tiny", messages=_long("All work"), max_tokens=3, temperature=0,
                                         extra_body={"vramchat": {"policy": "full"}})
        assert _ext(long)["policy"] == "full" and any("native window of 256" in n for n in _ext(long)["notes"])


def test_notes_are_logged_as_they_happen(served, caplog):
    serving, url = served
    caplog.set_level(logging.INFO, logger="vramchat.serve")
    r = _client(url).chat.completions.create(model="tiny", messages=_long("All work"), max_tokens=3, temperature=0)
    warned = [rec.getMessage() for rec in caplog.records if rec.name == "vramchat.serve"]
    assert len(warned) == 1 and warned[0].startswith("warning:") and "native window of 256" in warned[0]
    assert _ext(r)["notes"] == warned and serving.rt.notes == []  # the log keeps them, not the runtime


def test_final_assistant_message_is_continued(served):
    """lm-eval's RULER sends the answer's start as a final assistant message: the model
    continues it (vLLM's continue_final_message); the answer holds only the continuation."""
    serving, url = served
    rt, c = serving.rt, _client(url)
    msgs = HELLO + [{"role": "assistant", "content": "Foxes are "}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    opened = rt.tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True) + "Foxes are"
    assert rt.held.text.startswith(opened + text) and text == serving.last.result.answer
    assert r.usage.prompt_tokens == len(rt.tokens(opened))  # the trailing space dropped, as transformers does
    # the same text as a raw completion: the same tokens read, so the same greedy answer
    raw = c.completions.create(model="tiny", prompt=opened, max_tokens=8, temperature=0)
    assert raw.choices[0].text == text and raw.usage.prompt_tokens == r.usage.prompt_tokens
    # the chat goes on with the whole answer: the cache follows it
    c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    turn2 = HELLO + [{"role": "assistant", "content": "Foxes are" + text}, {"role": "user", "content": "More?"}]
    r2 = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens == r.usage.total_tokens


def test_text_completions(served):
    serving, url = served
    c = _client(url)
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == serving.last.result.answer and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(serving.rt.tokens("Once upon a time"))  # read as-is, no template
    assert serving.rt.held.text.startswith("Once upon a time") and serving.rt.messages == []
    chunks = list(c.completions.create(model="tiny", prompt=["Once upon a time"], max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    default = c.completions.create(model="tiny", prompt="Once upon a time", temperature=0)
    n, finish = default.usage.completion_tokens, default.choices[0].finish_reason
    assert n == schema.TEXT_MAX_TOKENS == 16 or finish == "stop" and n < 16  # OpenAI's default length


BAD_TEXT = [
    ({"model": "tiny"}, "prompt", "missing"),
    ({"model": "tiny", "prompt": ""}, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": [1, 2, 3]}, "prompt", "invalid_type"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt", "unsupported"),
    ({"model": "tiny", "prompt": "a", "echo": True}, "echo", "unsupported"),
    ({"model": "tiny", "prompt": "a", "logprobs": 1}, "logprobs", "unsupported"),
    ({"model": "tiny", "prompt": "a", "logprobs": 0}, "logprobs", "unsupported"),
    ({"model": "tiny", "prompt": "a", "best_of": 3}, "best_of", "unsupported"),
    ({"model": "tiny", "prompt": "a", "temperature": "hot"}, "temperature", "invalid_type"),
    ({"model": "nope", "prompt": "a"}, "model", "model_not_found"),
]


@pytest.mark.parametrize("body,field,code", BAD_TEXT, ids=[f"{b[1]}-{b[2]}" for b in BAD_TEXT])
def test_bad_text_completions_get_400_naming_the_field(served, body, field, code):
    serving, url = served
    r = httpx.post(f"{url}/completions", content=json.dumps(body).encode(), timeout=BOUND_S)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == code and err["message"].startswith(f"{field}:")
    assert serving.served == 0


def test_sampling_defaults_come_from_the_model():
    def of(**cfg):
        return schema.model_defaults(SimpleNamespace(generation_config=GenerationConfig(**cfg)))[0]
    assert of() == of(temperature=0.6, top_p=0.9) == of(do_sample=False, temperature=0.6)  # greedy
    s = of(do_sample=True, temperature=0.6, top_p=0.9, top_k=20)
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.9, 20)
    assert of(do_sample=True).temperature == 1.0 and of(do_sample=True).top_k == 0  # only what the file sets
    body = json.dumps({"model": "tiny", "messages": HELLO}).encode()
    req = schema.parse(body, ["tiny"], 512, 64, s)
    assert (req.temperature, req.top_p, req.top_k) == (0.6, 0.9, 20)
    given = json.dumps({"model": "tiny", "messages": HELLO, "temperature": 1.2, "top_k": 0}).encode()
    assert (lambda r: (r.temperature, r.top_p, r.top_k))(schema.parse(given, ["tiny"], 512, 64, s)) == (1.2, 0.9, 0)


def test_a_request_without_sampling_gets_the_models_defaults(monkeypatch):
    rt = _runtime()
    rt.adapter.model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    seen = []
    ask = rt.ask
    monkeypatch.setattr(rt, "ask", lambda q, **kw: seen.append(kw["sampling"]) or ask(q, **kw))
    serving = Serving(rt, max_queue=2).start()
    with Background(serving) as url:
        _client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert (seen[0].temperature, seen[0].top_p, seen[0].top_k) == (0.7, 0.8, 20)


def test_tiny_model_without_sampling_config_answers_greedily(served):
    serving, url = served
    assert serving.sampling.temperature == 0
    c = _client(url)
    plain = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12)
    greedy = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == greedy.choices[0].message.content


def test_metrics_show_the_cache(served):
    serving, url = served
    c = _client(url)
    r1 = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
    r2 = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
    page = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=BOUND_S)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain; version=0.0.4")
    s = prometheus(page.text)
    mem, rt = serving.rt.memory(), serving.rt
    assert sorted(s["vramchat_kv_bytes"]) == sorted(float(n) for kinds in mem.kv.values() for n in kinds.values())
    assert sum(s["vramchat_kv_bytes"]) == mem.kv_total() > 0
    assert s["vramchat_context_read_tokens"] == [rt.context().read] and s["vramchat_context_window_tokens"] == [WINDOW]
    assert s["vllm:num_requests_running"] == [0] and s["vllm:num_requests_waiting"] == [0]
    assert s["vllm:generation_tokens_total"] == [r1.usage.completion_tokens + r2.usage.completion_tokens]
    assert s["vllm:prompt_tokens_total"] == [r1.usage.prompt_tokens + r2.usage.prompt_tokens]
    assert sum(s["vllm:request_success_total"]) == s["vramchat_requests_served_total"][0] == 2
    assert 0 < s["vllm:kv_cache_usage_perc"][0] < 1
    assert kv_usage_line(s).startswith("remote KV cache")  # what `--backend`'s gauge reads off a server
    assert '# TYPE vllm:prompt_tokens_total counter' in page.text and 'vramchat_info{model_name="tiny",policy="full"' \
        in page.text


def test_same_policy_knows_auto_and_spellings():
    from app.server.worker import _same_policy
    assert _same_policy("auto", "auto") and _same_policy("full+kivi", "kivi") and _same_policy("kivi", "kivi:group=32")
    assert not _same_policy("auto", "full") and not _same_policy("full", "auto") and not _same_policy("kivi", "full")
