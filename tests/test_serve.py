"""`serve` on a random loopback port with a tiny model, driven by the official `openai`
client and raw HTTP. Nothing here waits on the clock: the server's `Serving` exposes a
condition that changes whenever a request is queued, starts or ends."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import openai
import psutil
import pytest

from app.cli import main
from app.runtime.engine import Runtime
from app.server import Background, Serving, bind, check_bind, is_loopback
from app.runtime.types import VramchatError
from tiny import tiny_pair

BOUND_S = 120  # no test waits longer than this for anything; reaching it is a failure


@pytest.fixture
def rt():
    model, tok = tiny_pair(7)
    return Runtime.from_model(model, tok, model_id="tiny", chunk_size=64)


def _serve(rt, **kw):
    serving = Serving(rt, **{"max_queue": 4, **kw}).start()
    return serving, Background(serving)


@pytest.fixture
def served(rt):
    serving, bg = _serve(rt)
    with bg as url:
        yield serving, url


def _client(url, key="unused"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=BOUND_S)


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something about foxes."}]


def test_openai_client_streaming_and_not(served):
    serving, url = served
    c = _client(url)
    assert [m.id for m in c.models.list()] == ["tiny"]
    r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens == serving.last.prompt_tokens > 10
    assert text == serving.last.result.answer
    # The same request again (a client's "regenerate"): greedy, so the same answer, streamed.
    stream = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_second_turn_reads_only_its_new_tokens(served, rt):
    serving, url = served
    c = _client(url)
    r1 = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = HELLO + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And about dogs?"}]
    r2 = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=8, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == r1.usage.total_tokens  # everything the first turn put in the cache
    prefilled = r2.model_extra["vramchat"]["prefilled_tokens"]
    assert prefilled == r2.usage.prompt_tokens - cached
    tok = rt.tok
    turn1_text = tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True) + \
        r1.choices[0].message.content
    new_text = tok.apply_chat_template(turn2, tokenize=False, add_generation_prompt=True)[len(turn1_text):]
    assert new_text.startswith("<|im_end|>") and prefilled == len(rt.tokens(new_text))
    # The second question edited: the cache is cut back to the end of the first answer.
    edited = turn2[:-1] + [{"role": "user", "content": "And about cats?"}]
    r3 = c.chat.completions.create(model="tiny", messages=edited, max_tokens=8, temperature=0)
    assert r3.usage.prompt_tokens_details.cached_tokens == r1.usage.total_tokens
    # Another chat shares only part of the system turn, where no message ended: read from scratch.
    other = c.chat.completions.create(model="tiny", messages=HELLO[:1] + [{"role": "user", "content": "Hi."}],
                                      max_tokens=4, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_an_answer_the_client_changed_is_read_as_sent(served, rt):
    _, url = served
    c = _client(url)
    r1 = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    edited = HELLO + [{"role": "assistant", "content": "Foxes are red."}, {"role": "user", "content": "More?"}]
    r2 = c.chat.completions.create(model="tiny", messages=edited, max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens  # cut back before the answer
    assert "Foxes are red.<|im_end|>" in rt.held.text and r1.choices[0].message.content not in rt.held.text


BAD = [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    ({"messages": HELLO}, "model", "missing"),
    ({"model": "gpt-4o", "messages": HELLO}, "model", "model_not_found"),
    ({"model": "tiny", "messages": "hi"}, "messages", "invalid_type"),
    ({"model": "tiny", "messages": []}, "messages", "invalid_type"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]", "invalid_type"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"model": "tiny", "messages": HELLO + [{"role": "assistant", "content": "x"}] * 2}, "messages[3].role",
     "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "invalid_value"),
    ({"model": "tiny", "messages": HELLO, "temperature": "hot"}, "temperature", "invalid_type"),
    ({"model": "tiny", "messages": HELLO, "temperature": 7}, "temperature", "invalid_value"),
    ({"model": "tiny", "messages": HELLO, "top_p": 0}, "top_p", "invalid_value"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": 10**6}, "max_tokens", "invalid_value"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": "10"}, "max_tokens", "invalid_type"),
    ({"model": "tiny", "messages": HELLO, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
    ({"model": "tiny", "messages": HELLO, "stream": "yes"}, "stream", "invalid_type"),
    ({"model": "tiny", "messages": HELLO, "seed": 1.5}, "seed", "invalid_type"),
    ({"model": "tiny", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"model": "tiny", "messages": HELLO, "stop": [""]}, "stop", "invalid_type"),
    ({"model": "tiny", "messages": HELLO, "n": 2}, "n", "unsupported"),
    ({"model": "tiny", "messages": HELLO, "tools": [{"type": "function"}]}, "tools", "unsupported"),
    ({"model": "tiny", "messages": HELLO, "vramchat": {"policy": "nope"}}, "vramchat.policy", "invalid_value"),
    ({"model": "tiny", "messages": HELLO, "vramchat": {"budget": 3}}, "vramchat.budget", "unknown_field"),
]


@pytest.mark.parametrize("body,field,code", BAD, ids=[f"{b[1]}-{b[2]}" for b in BAD])
def test_bad_requests_get_400_naming_the_field(served, body, field, code):
    serving, url = served
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == code
    assert err["message"].startswith(f"{field}:" if field else "the request body")
    assert serving.served == 0  # refused before it reached the model


def test_openai_client_raises_the_message(served):
    _, url = served
    with pytest.raises(openai.BadRequestError, match=r"max_tokens: 100,000 is more than this server allows"):
        _client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=100_000)


def test_prompt_the_policy_cannot_hold_gets_400_with_the_numbers(served, monkeypatch):
    serving, url = served
    real = psutil.virtual_memory()
    tight = real._replace(available=512 * 2**20 + 8 * 1024)  # 8 KiB past the runtime's slack
    monkeypatch.setattr(psutil, "virtual_memory", lambda: tight)
    long = [{"role": "user", "content": "All work and no play. " * 40}]
    r = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": long, "max_tokens": 4},
                   timeout=BOUND_S)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "policy `full` would hold" in msg and "room for about" in msg and "Nothing was read" in msg
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real)
    ok = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": long, "max_tokens": 4},
                    timeout=BOUND_S)
    assert ok.status_code == 200


def test_client_disconnect_stops_decoding_at_the_next_token(served, rt, monkeypatch):
    serving, url = served
    calls, results = [], []
    ask = rt.ask

    def gated(question, **kw):  # the first token waits until the server has seen the client go
        stop, forward = kw["stop"], kw["on_token"]

        def on_token(piece):
            calls.append(piece)
            forward(piece)
            if len(calls) == 1:
                stop.wait(BOUND_S)
        results.append(ask(question, **{**kw, "on_token": on_token}))
        return results[-1]
    monkeypatch.setattr(rt, "ask", gated)
    stream = _client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=400, stream=True,
                                                  temperature=1.0, seed=3)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    assert serving.wait_for(lambda: serving.served == 1, BOUND_S)
    res = results[0]
    assert res.finish == "stopped" and len(calls) == 1  # not one token decoded after the disconnect
    assert rt.context().read == serving.rt.context().read  # the server is still up and consistent
    assert httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 2},
                      timeout=BOUND_S).status_code == 200


def test_full_queue_gets_429_with_retry_after(rt, monkeypatch):
    serving, bg = _serve(rt, max_queue=2)
    entered, release = threading.Event(), threading.Event()
    ask = rt.ask

    def held(question, **kw):
        entered.set()
        release.wait(BOUND_S)
        return ask(question, **kw)
    monkeypatch.setattr(rt, "ask", held)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
    with bg as url, ThreadPoolExecutor(3) as pool:
        post = lambda: httpx.post(f"{url}/chat/completions", json=body, timeout=BOUND_S)  # noqa: E731
        first = pool.submit(post)
        assert entered.wait(BOUND_S)
        queued = [pool.submit(post) for _ in range(2)]
        assert serving.wait_for(lambda: serving.waiting() == 2, BOUND_S)
        refused = post()
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full" and "retry in" in refused.json()["error"]["message"]
        release.set()
        assert [f.result(BOUND_S).status_code for f in [first, *queued]] == [200, 200, 200]


def test_fifty_concurrent_clients_finish_or_get_429(served):
    serving, url = served
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 3}

    def one(i):
        with httpx.Client(timeout=BOUND_S) as h:
            if i % 2:
                r = h.post(f"{url}/chat/completions", json=body)
                return r.status_code, r.headers.get("Retry-After")
            with h.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}) as r:
                lines = [ln for ln in r.iter_lines() if ln]
                assert r.status_code != 200 or lines[-1] == "data: [DONE]"
                return r.status_code, r.headers.get("Retry-After")
    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        done, pending = wait(futures, timeout=BOUND_S * 2)
    assert not pending, f"{len(pending)} clients hung"
    got = [f.result() for f in futures]
    assert {s for s, _ in got} <= {200, 429}
    assert all(ra is not None and int(ra) >= 1 for s, ra in got if s == 429)
    assert serving.wait_for(lambda: serving.served == sum(s == 200 for s, _ in got), BOUND_S)


def test_memory_endpoint_and_per_request_policy(served):
    serving, url = served
    c = _client(url)
    r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3,
                                  extra_body={"vramchat": {"policy": "streaming:window=32"}})
    assert r.model_extra["vramchat"]["policy"] == "streaming:window=32"
    mem = httpx.get(f"{url}/vramchat/memory").json()
    assert mem["policy"] == "streaming:window=32" and mem["context"]["read"] == r.usage.total_tokens
    assert mem["memory"]["weights_bytes"] > 0 and mem["memory"]["host_total"] > 0
    assert sum(mem["memory"]["kv"]["gpu"].values()) > 0
    back = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)  # the server's default again
    assert back.model_extra["vramchat"]["policy"] == "full"
    assert back.usage.prompt_tokens_details.cached_tokens == 0  # another policy: a fresh cache
    with pytest.raises(openai.BadRequestError, match="vramchat.policy: policy `locret` has no retaining heads"):
        c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3,
                                  extra_body={"vramchat": {"policy": "locret"}})
    assert httpx.get(f"{url}/vramchat/memory").json()["policy"] == "full"  # the cache is untouched


def test_stop_sequence_cuts_the_answer(served):
    _, url = served
    c = _client(url)
    kw = dict(model="tiny", messages=HELLO, max_tokens=24, temperature=1.0, seed=11)
    text = c.chat.completions.create(**kw).choices[0].message.content
    at = next(i for i in range(1, len(text) - 1) if text.find(text[i:i + 2]) == i)  # a 2-char cut seen first at i
    for stream in (False, True):
        r = c.chat.completions.create(**kw, stop=["never said", text[at:at + 2]], stream=stream)
        got = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) if stream \
            else r.choices[0].message.content
        assert got == text[:at]


def test_api_key_required_off_loopback_and_checked_when_set(rt, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.raises(VramchatError, match="--api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "k")
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2  # refused before any model loads
    assert "reachable from other machines" in capsys.readouterr().err
    serving = Serving(rt).start()
    with Background(serving, api_key="s3cret") as url:
        assert httpx.get(f"{url}/models").status_code == 401
        wrong = httpx.get(f"{url}/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(url, "nope").models.list()
        assert [m.id for m in _client(url, "s3cret").models.list()] == ["tiny"]


def test_port_in_use_is_a_clear_error():
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        with pytest.raises(VramchatError, match=rf"cannot listen on 127.0.0.1:{port}.*pick another --port"):
            bind("127.0.0.1", port)
    finally:
        sock.close()


def test_bench_serve_compares_both_paths(rt, tmp_path):
    from app.bench import serve as bench_serve
    rows = bench_serve.run(rt, lengths=(200,), decode=4, trials=1, out_dir=tmp_path)
    ask, srv, ratio = rows
    assert (ask["path"], srv["path"], ratio["path"]) == ("ask", "serve", "serve / ask")
    assert ask["prefilled2"] == srv["prefilled2"] > 0  # the second turn reads the same new tokens both ways
    assert ask["tokens"] == srv["tokens"] and srv["ttft1_s"] > 0 and ratio["ttft1_s"] > 0
    assert json.loads((tmp_path / "serve.json").read_text())["machine"]["commit"]


@pytest.mark.real_model
def test_real_model_second_turn_through_serve(fresh_smol):
    serving = Serving(fresh_smol).start()
    with Background(serving) as url:
        c, model = _client(url), fresh_smol.model_id
        ask = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        r1 = c.chat.completions.create(model=model, messages=ask, max_tokens=32, temperature=0)
        assert "Paris" in r1.choices[0].message.content
        turn2 = ask + [{"role": "assistant", "content": r1.choices[0].message.content},
                       {"role": "user", "content": "And of Italy?"}]
        stream = c.chat.completions.create(model=model, messages=turn2, max_tokens=32, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        assert "Rome" in "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        usage = chunks[-1].usage
        assert usage.prompt_tokens_details.cached_tokens == r1.usage.total_tokens
        assert usage.prompt_tokens - r1.usage.total_tokens < 20  # only the new turn was read
