"""`--backend URL`: `ask` and the app's runtime over an OpenAI-compatible server — our own
`serve` on a tiny model, and stand-ins for vLLM / SGLang / a server that reports nothing."""
import json
import socket
import threading

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from app.cli import main
from app.runtime.engine import Runtime
from app.runtime.metrics import NOT_REPORTED, RemoteMemory, kv_usage_line, prometheus
from app.runtime.remote import RemoteRuntime, split_url
from app.runtime.types import Sampling, VramchatError
from app.server import Background, Serving, bind, url_of
from tiny import tiny_pair

BOUND_S = 120


@pytest.fixture(scope="module")
def served():
    model, tok = tiny_pair(7)
    rt = Runtime.from_model(model, tok, model_id="tiny", chunk_size=64)
    serving = Serving(rt, max_queue=4).start()
    with Background(serving) as url:
        yield serving, url


class _Other:
    """A stand-in OpenAI-compatible server with only /v1/models and, optionally, /metrics."""

    def __init__(self, metrics: str | None):
        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "big-model", "object": "model"}]})

        async def metrics_page(request):
            return PlainTextResponse(metrics)
        routes = [Route("/v1/models", models)] + ([Route("/metrics", metrics_page)] if metrics else [])
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(BOUND_S)
        self.sock.close()


VLLM = """# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="big-model"} 0.375
vllm:num_requests_running{engine="0",model_name="big-model"} 2.0
vllm:num_requests_waiting{engine="0",model_name="big-model"} 1.0
"""
SGLANG = 'sglang:token_usage{model_name="big-model"} 0.28\nsglang:num_running_reqs{model_name="big-model"} 3.0\n'


def test_ask_backend_reuses_the_servers_cache(served, tmp_path, capsys):
    serving, url = served
    doc = tmp_path / "notes.txt"
    doc.write_text("Foxes are quick. Dogs are lazy. " * 10)
    code = main(["ask", "--backend", url, "--doc", str(doc), "--json", "--max-new-tokens", "6",
                 "What are foxes?", "And dogs?"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    a1, a2 = out["answers"]
    assert out["model"] == "tiny" and a1["decode_mode"] == "remote" and a1["policy"] == "full"
    assert 1 <= a1["new_tokens"] <= 6 and a2["answer"] == serving.last.result.answer
    # The second question sent the whole chat back; the server read only its new tokens.
    assert a2["prompt_tokens"] == serving.last.result.prompt_tokens
    assert serving.last.cached_tokens >= a1["new_tokens"] + 100 > a2["prompt_tokens"]
    assert out["memory"]["weights_bytes"] > 0  # from /v1/vramchat/memory


def test_remote_runtime_streams_and_stops(served):
    serving, url = served
    rt = RemoteRuntime(url)
    try:
        assert (rt.model_id, rt.window, rt.policy) == ("tiny", 512, "server's")
        pieces = []
        res = rt.ask("Tell me a story.", max_new_tokens=8, sampling=Sampling(temperature=0), on_token=pieces.append)
        assert res.answer == "".join(pieces) == serving.last.result.answer and res.policy == "full"
        assert rt.messages[-1]["role"] == "assistant" and res.new_tokens == serving.last.result.new_tokens
        stop = threading.Event()

        def on_token(piece):
            stop.set()
        res = rt.ask("Another one, long.", max_new_tokens=400, sampling=Sampling(temperature=1.0, seed=2),
                     on_token=on_token, stop=stop)
        assert res.stopped and res.finish == "stopped" and rt.messages[-1]["partial"] is True
        assert serving.wait_for(lambda: serving.running is None, BOUND_S)
        mem = rt.memory()
        assert isinstance(mem, RemoteMemory) and mem.host_total > 0 and "policy full" in mem.remote
        with pytest.raises(VramchatError, match="switching the KV policy needs the local runtime"):
            rt.set_policy("kivi")
        data = rt.to_json()
        rt.clear()
        rt.restore(data)
        assert rt.messages == data["messages"]
    finally:
        rt.close()


@pytest.mark.parametrize("metrics,line", [
    (VLLM, "remote KV cache 38% used (vLLM; 2 running, 1 waiting)"),
    (SGLANG, "remote KV cache 28% used (SGLang)"),
    (None, NOT_REPORTED),
])
def test_gauge_shows_what_the_server_exposes(metrics, line):
    with _Other(metrics) as url:
        rt = RemoteRuntime(url.removesuffix("/v1"))  # the root works too: /v1 is added
        try:
            assert rt.model_id == "big-model" and rt.window == 0
            assert rt.memory().remote == line and rt.memory().host_total == 0
        finally:
            rt.close()


def test_prometheus_parsing():
    s = prometheus(VLLM + "# a comment\nbad line\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.5 1700000000\n")
    assert s["vllm:kv_cache_usage_perc"] == [0.375, 0.5]
    assert kv_usage_line(s).startswith("remote KV cache 50% used") and kv_usage_line({}) is None


def test_backend_errors_say_what_to_do(served):
    _, url = served
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(VramchatError, match="cannot reach the backend .* Is the server running"):
        RemoteRuntime(dead)
    with pytest.raises(VramchatError, match="does not serve 'gpt-4'; it serves: tiny"):
        RemoteRuntime(url, model="gpt-4")
    with pytest.raises(VramchatError, match="give the server's URL"):
        split_url("localhost:8000")
    assert split_url("http://h:1") == ("http://h:1/v1", "http://h:1")
    assert split_url("http://h:1/v1/") == ("http://h:1/v1", "http://h:1")
    assert split_url("http://h:11434/api/v1") == ("http://h:11434/api/v1", "http://h:11434/api")


def test_local_only_options_and_commands_refused(served, capsys):
    _, url = served
    assert main(["ask", "--backend", url, "--policy", "kivi", "q"]) == 2
    assert "--policy shapes the local runtime" in capsys.readouterr().err
    assert main(["bench", "memory", "--backend", url]) == 2
    assert "`bench` needs the local runtime" in capsys.readouterr().err


def test_wrong_key_is_named(served):
    model, tok = tiny_pair(7)
    serving = Serving(Runtime.from_model(model, tok, model_id="tiny"), max_queue=1).start()
    with Background(serving, api_key="right") as url:
        with pytest.raises(VramchatError, match="refused the API key .* --api-key"):
            RemoteRuntime(url, api_key="wrong")
        rt = RemoteRuntime(url, api_key="right")
        assert rt.memory().host_total > 0  # the gauge's requests carry the key too
        rt.close()


def test_app_gauge_shows_the_remote_line():
    from app.ui.panels import Gauge
    vram, host = Gauge("vram"), Gauge("host")
    for g in (vram, host):
        g.set_reactive(Gauge.report, RemoteMemory(device="remote http://h", has_gpu=True, remote=NOT_REPORTED))
    assert str(vram.render()) == NOT_REPORTED and str(host.render()) == "remote: host memory not reported"
