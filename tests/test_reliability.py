"""Reliability: out of memory during a policy conversion, corrupt heads and
calibration files, a short soak under evicting policies, no network listener."""
from __future__ import annotations

import ast
import json
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.outlier_channels import collect
from app.runtime import reader
from app.runtime.engine import Runtime
from app.runtime.types import VramchatError
from offload import calibrate
from policies import SpecError
from policies.kivi import KiviStore
from policies.locret import model_key
from tiny import random_heads, tiny_pair

REPO = Path(__file__).resolve().parents[1]
KIVI = "kivi:group=16,residual=32"  # fits head_dim 16 of the tiny model


pytestmark = pytest.mark.usefixtures("one_thread")


def _runtime(spec="full", chunk_size=64):
    model, tok = tiny_pair(3)
    return Runtime.from_model(model, tok, policy=spec, model_id="tiny", chunk_size=chunk_size)


def _channels_file(rt, path: Path, seed=0) -> Path:
    """Outlier channels calibrated for rt's model (its key includes the tokenizer's vocab)."""
    gen = torch.Generator().manual_seed(seed)
    stats = collect(rt.adapter, [torch.randint(4, 260, (64,), generator=gen) for _ in range(2)])
    calibrate.save(path, stats.mean(), 4, model_key(rt.adapter.info), ["tiny"], 128, "random tokens (test)")
    return path


def _doc(path: Path, words=260, seed=0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kv", "cache", "token"])
                             for _ in range(words)))
    return path


# ---- 1. out of memory during a policy conversion -------------------------------------------

def _talk(rt, tmp_path):
    rt.load_document(_doc(tmp_path / "doc.txt", words=60))
    rt.ask("what is it?", max_new_tokens=4)
    return json.loads(json.dumps(rt.messages))


def _oom_on_call(monkeypatch, cls, n):
    """Make cls.load raise torch.OutOfMemoryError on its n-th call (n=1: the first layer)."""
    calls, orig = [], cls.load

    def load(self, k, v):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return orig(self, k, v)
    monkeypatch.setattr(cls, load.__name__, load)
    return calls


def test_oom_midway_through_conversion_rereads_under_the_new_policy(tmp_path, monkeypatch):
    rt = _runtime()
    msgs = _talk(rt, tmp_path)
    before = sum(rt.cache.bytes_by_tier().values())
    calls = _oom_on_call(monkeypatch, KiviStore, 2)  # layer 0 converted, layer 1 runs out
    res = rt.set_policy(KIVI)
    assert len(calls) == 2  # it really failed midway, after one layer had been moved
    assert res.old_policy == "full" and res.new_policy == KIVI == rt.policy
    assert res.reprefilled and res.before_bytes == before
    assert res.message == f"re-read the conversation under `{KIVI}` (out of memory while converting)"
    assert rt.messages == msgs
    assert all(l is not None for l in rt.cache.layers)
    assert rt.cache.seen == len(rt.tokens(rt.conv.render(rt.tok)))
    assert res.after_bytes == sum(rt.cache.bytes_by_tier().values()) > 0
    # the cache now holds exactly what a fresh runtime under the new policy reads from the file
    other = _runtime(KIVI)
    other.restore({"messages": msgs})
    assert rt.held.text == other.held.text
    a, b = rt.ask("and then?", max_new_tokens=6), other.ask("and then?", max_new_tokens=6)
    assert a.answer == b.answer and a.policy == KIVI and a.prompt_tokens == b.prompt_tokens


def test_oom_in_conversion_and_in_the_reread_keeps_the_conversation(tmp_path, monkeypatch):
    rt = _runtime()
    msgs = _talk(rt, tmp_path)
    _oom_on_call(monkeypatch, KiviStore, 1)

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(reader, "prefill", no_memory)  # the one prefill loop every Reader read goes through
    with pytest.raises(VramchatError) as e:
        rt.set_policy(KIVI)
    msg = str(e.value)
    assert msg.startswith(f"switched to `{KIVI}` but re-reading the conversation failed: out of memory")
    assert msg.endswith("It is re-read on the next question.")
    assert rt.policy == KIVI and rt.messages == msgs
    assert rt.cache.seen == 0 and rt.held.text == ""
    monkeypatch.undo()
    res = rt.ask("still there?", max_new_tokens=3)  # usable: the whole conversation is re-read
    assert res.policy == KIVI
    assert rt.cache.seen == res.prompt_tokens + res.new_tokens  # the conversation was re-read whole
    assert rt.messages[: len(msgs)] == msgs


def test_error_midway_through_conversion_leaves_a_usable_runtime(tmp_path, monkeypatch):
    """A non-memory error after some old layers were freed must not leave a broken cache."""
    rt = _runtime()
    msgs = _talk(rt, tmp_path)
    calls, orig = [], KiviStore.load

    def load(self, k, v):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom")
        return orig(self, k, v)
    monkeypatch.setattr(KiviStore, "load", load)
    with pytest.raises(ValueError, match="boom"):
        rt.set_policy(KIVI)
    assert rt.policy == "full" and rt.messages == msgs
    assert all(l is not None for l in rt.cache.layers)
    monkeypatch.undo()
    res = rt.ask("again?", max_new_tokens=3)
    assert res.policy == "full"
    assert rt.cache.seen == res.prompt_tokens + res.new_tokens  # the conversation was re-read whole


# ---- 2. corrupt, truncated and mismatched files --------------------------------------------

def _corruptions(good: bytes) -> dict[str, bytes]:
    n = struct.unpack("<Q", good[:8])[0]
    return {"empty": b"", "garbage": bytes(random.Random(0).randrange(256) for _ in range(500)),
            "half": good[: len(good) // 2], "header only": good[: 8 + n], "last bytes cut": good[:-4],
            "header cut": good[: 8 + n // 2]}


def _each_corruption_refused(good: Path, spec, tmp_path):
    """Every corruption of the file `good`, passed through spec(path), is a SpecError naming
    the bad file. -> the bad files."""
    bads = []
    for i, (what, data) in enumerate(_corruptions(good.read_bytes()).items()):
        bad = tmp_path / f"bad{i}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(SpecError) as e:
            _runtime(spec(bad))
        assert str(bad) in str(e.value) and "truncated or corrupt" in str(e.value), what
        bads.append(bad)
    return bads


def test_truncated_or_garbage_heads_file_is_refused_with_its_path(tmp_path):
    rt = _runtime()
    spec = lambda f: f"locret:budget=128,stabilizers=16,heads={f}"  # noqa: E731
    for bad in _each_corruption_refused(random_heads(rt.adapter.info, tmp_path / "good.safetensors"), spec, tmp_path):
        with pytest.raises(SpecError, match="truncated or corrupt"):
            rt.set_policy(spec(bad))
        assert rt.policy == "full"


@pytest.mark.parametrize("policy", ["offload", "doublesparse"])
def test_corrupt_calibration_file_is_refused_with_its_path(tmp_path, policy):
    rt = _runtime()
    heads = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    good = _channels_file(rt, tmp_path / "good.safetensors")
    selector = f"locret:budget=128,stabilizers=16,heads={heads}+" if policy == "offload" else ""
    spec = lambda f: f"{selector}{policy}:channels_file={f}"  # noqa: E731
    _runtime(spec(good))  # the good file works
    assert len(_each_corruption_refused(good, spec, tmp_path)) == 6


def _flip_a_data_byte(path):
    """Flip one bit in the tensor data: every shape and the header stay valid."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n + (len(data) - 8 - n) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_heads_or_channels_is_caught_by_the_checksum(tmp_path):
    rt = _runtime()
    heads = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    chans = _channels_file(rt, tmp_path / "ch.safetensors")
    _runtime(f"locret:budget=128,stabilizers=16,heads={heads}+offload:channels_file={chans}")  # both good
    _flip_a_data_byte(heads)
    with pytest.raises(SpecError, match=f"{heads}: checksum mismatch.*train-heads"):
        _runtime(f"locret:budget=128,stabilizers=16,heads={heads}")
    _flip_a_data_byte(chans)
    with pytest.raises(SpecError, match=f"{chans}: checksum mismatch.*calibrate"):
        _runtime(f"doublesparse:channels_file={chans}")
    # the shipped files carry checksums too
    from policies.files import read_meta
    for f in (REPO / "policies" / "heads").glob("*.safetensors"):
        assert len(read_meta(f)["sha256"]) == 64, f
    for f in (REPO / "offload" / "channels").glob("*.safetensors"):
        assert len(read_meta(f)["sha256"]) == 64, f


def test_heads_file_with_shapes_of_another_model_is_refused_with_its_path(tmp_path):
    rt = _runtime()
    info = rt.adapter.info
    # made for another model: its key says so
    other, tok = tiny_pair(3, hidden_size=32, intermediate_size=64)
    small = Runtime.from_model(other, tok, model_id="tiny")
    f = random_heads(small.adapter.info, tmp_path / "other.safetensors")
    with pytest.raises(SpecError) as e:
        _runtime(f"locret:heads={f}")
    assert str(f) in str(e.value) and "trained for a model with key" in str(e.value)
    # the right key but a head count that does not fit this model
    f = random_heads(rt.adapter.info, tmp_path / "kv.safetensors", n_kv=info.n_kv_heads + 1)
    with pytest.raises(SpecError, match=f"locret heads {f}: shapes .* do not fit this model"):
        _runtime(f"locret:heads={f}")
    # metadata that lies about the tensors inside
    from safetensors.torch import load_file, save_file
    f = random_heads(rt.adapter.info, tmp_path / "lies.safetensors")
    from policies.files import read_meta
    meta = read_meta(f) | {"d_r": "8"}
    save_file(load_file(str(f)), str(f), metadata=meta)
    with pytest.raises(SpecError, match=f"locret heads {f}: tensors do not match the shapes in its metadata"):
        _runtime(f"locret:heads={f}")
    meta.pop("d_r")
    save_file(load_file(str(f)), str(f), metadata=meta)
    with pytest.raises(SpecError, match=f"locret heads {f}: broken shape metadata"):
        _runtime(f"locret:heads={f}")


# ---- 3. soak: many turns stay bounded ------------------------------------------------------

BUDGET, LOCAL, NEW = 128, 32, 4


@pytest.mark.parametrize("store", ["", "+" + KIVI, "+offload"])
def test_soak_turns_do_not_grow_the_cache(tmp_path, store):
    """30 turns after a ~1.4K-token document. Bound: every layer holds at most
    budget + local (the protected final chunk) + the answer = 164 tokens, and the
    device-tier KV bytes (the offload labels apart) never change after turn 2. For
    offload the host tier holds every evicted token: between evicted x bytes-per-token
    and (1.125 x evicted + one block) x bytes-per-token (its growth step), plus the token
    log (8 B per token read, grown by 1/4) and each layer's row map (4 B per KV head over
    the log's capacity)."""
    rt = _runtime()
    heads = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    if store == "+offload":
        store += f":channels_file={_channels_file(rt, tmp_path / 'ch.safetensors')}"
    rt = _runtime(f"locret:budget={BUDGET},chunk=64,stabilizers=16,local={LOCAL},heads={heads}{store}")
    doc = rt.load_document(str(_doc(tmp_path / "doc.txt")))
    assert 1000 < doc.tokens < 2000
    info = rt.adapter.info
    rows = []
    for i in range(30):
        res = rt.ask(f"question {i}: what is it about?", max_new_tokens=NEW)
        assert res.new_tokens >= 1
        nb = rt.cache.nbytes()
        device = sum(n for (tier, kind), n in nb.items() if tier == "gpu" and kind != "labels")
        rows.append((rt.cache.length, device, rt.cache.seen))
        if "offload" in store:
            per_tok = info.n_kv_heads * (2 * info.head_dim * info.dtype.itemsize + 8)  # K, V, position
            evicted = [l.seen - l.length for l in rt.cache.layers]
            host = rt.cache.bytes_by_tier()["host"]
            log = rt.cache.layers[0].spill.quotes  # the token log quote following reads: 8 B a token read
            assert log is not None and log.nbytes() <= 8 * max(4096, 1.25 * rt.cache.seen + 1)
            host -= log.nbytes()
            for l in rt.cache.layers:  # each layer's row map: int32 per KV head over the log's capacity
                assert l.spill.row_at.nbytes == 4 * info.n_kv_heads * log.ids.shape[0]
                host -= l.spill.row_at.nbytes
            block = rt.cache.layers[0].spill.BLOCK
            assert sum(evicted) * per_tok <= host <= sum(1.125 * e + block for e in evicted) * per_tok, i
            r = rt.cache.layers[0].spill.ch.shape[1]  # label channels per KV head
            assert nb[("gpu", "labels")] <= sum(1.125 * e + block for e in evicted) * info.n_kv_heads * r * \
                info.dtype.itemsize
    assert rows[-1][2] > doc.tokens + 30 * 20  # every turn was read
    assert all(length <= BUDGET + LOCAL + NEW for length, _, _ in rows)
    assert len({device for _, device, _ in rows[1:]}) == 1  # no growth per turn
    assert len({length for length, _, _ in rows[1:]}) == 1


# ---- 4. no network listener ----------------------------------------------------------------

def _own_py_files():
    """The app's own modules (tests may bind a unix socket to check that it is refused)."""
    skip = {".venv", ".git", ".whl", "build", "node_modules", "__pycache__", "tests"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def test_no_module_opens_a_network_listener():
    """Only `serve` listens (app/server: loopback unless given an API key; tests/test_serve.py)."""
    calls = []
    for path in _own_py_files():
        if path.relative_to(REPO).parts[:2] == ("app", "server"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("bind", "listen", "create_server", "start_server", "serve_forever",
                            "HTTPServer", "TCPServer", "ThreadingHTTPServer"):
                    calls.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert calls == []
    assert len(_own_py_files()) > 20  # the scan saw the repo


def test_importing_the_whole_app_binds_no_socket(tmp_path):
    """Import the app in a fresh process with socket.bind/listen/create_server trapped."""
    code = (
        "import socket, asyncio\n"
        "seen = []\n"
        "def trap(name):\n"
        "    def f(*a, **k):\n"
        "        seen.append(name); raise OSError('listener: ' + name)\n"
        "    return f\n"
        "socket.socket.bind = trap('bind'); socket.socket.listen = trap('listen')\n"
        "socket.create_server = trap('create_server')\n"
        "asyncio.start_server = trap('start_server')\n"
        "import app.ui.app, app.runtime.engine, policies, offload, main\n"
        "print('seen', seen)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "seen []"
    assert socket.socket.bind is not None
