"""`main.py models` and `--model NAME` over model stores built here: a Hugging Face hub cache,
an Ollama store (manifests -> GGUF blobs), an LM Studio folder and a config-named folder,
with bad entries among good ones."""
from __future__ import annotations

import json

import numpy as np
import pytest

from app.runtime import stores
from app.runtime.resolve import resolve
from app.runtime.types import VramchatError
from stores_fixture import hub_add, ollama_add, write_gguf
from tiny import tiny_pair


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """-> (env, config folder, facts) for a machine with every kind of store."""
    base = tmp_path_factory.mktemp("stores")
    home = base / "home"
    g = write_gguf(base / "tiny.Q8_0.gguf")
    g16 = write_gguf(base / "tiny.F16.gguf", quant="F16")
    f64 = write_gguf(base / "f64.gguf", extra_tensor=("odd.weight", np.zeros(4, np.float64)))
    rwkv = write_gguf(base / "rwkv.gguf", arch="rwkv7")

    model, tok = tiny_pair(0)
    folder = base / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    hub = base / "hub"
    hub_add(hub, "acme/tiny-llama", folder)
    (hub / "models--acme--gone" / "snapshots").mkdir(parents=True)  # an interrupted download

    ol = base / "ollama"
    ollama_add(ol, "tiny:latest", g)
    ollama_add(ol, "tiny:f16", g16)
    ollama_add(ol, "tiny:v1", g, namespace="someone")
    ollama_add(ol, "broken:latest", None, manifest="{not json")
    ollama_add(ol, "nolayer:latest", None)
    ollama_add(ol, "f64:latest", f64)
    ollama_add(ol, "rwkv:latest", rwkv)
    digest = json.loads((ol / "manifests/registry.ollama.ai/library/tiny/latest").read_text())["layers"][0]["digest"]

    lms = home / ".lmstudio" / "models"
    (lms / "pub" / "tiny-GGUF").mkdir(parents=True)
    (lms / "pub" / "tiny-GGUF" / "tiny.Q8_0.gguf").write_bytes(g.read_bytes())
    (lms / "pub" / "tiny-GGUF" / "mmproj-tiny.gguf").write_bytes(b"not a language model")
    (lms / "pub" / "big-GGUF").mkdir(parents=True)
    (lms / "pub" / "big-GGUF" / "big-00001-of-00002.gguf").write_bytes(g.read_bytes())

    mine = base / "mine"
    mine.mkdir()
    model.save_pretrained(mine / "llama-folder")
    tok.save_pretrained(mine / "llama-folder")
    (mine / "solo.gguf").write_bytes(g.read_bytes())
    env = {"HOME": str(home), "HF_HUB_CACHE": str(hub), "OLLAMA_MODELS": str(ol)}
    return env, mine, {"gguf_size": g.stat().st_size, "params": sum(p.numel() for p in model.parameters()),
                       "blob": ol / "blobs" / digest.replace(":", "-")}


def _by_name(entries):
    return {e.name: e for e in entries}


def test_scan_lists_every_store(world):
    env, mine, facts = world
    found, searched = stores.scan([str(mine)], env)
    got = _by_name(found)
    good = {"acme/tiny-llama", "ollama:tiny:latest", "ollama:tiny:f16", "ollama:someone/tiny:v1",
            "lmstudio:pub/tiny-GGUF/tiny.Q8_0.gguf", str(mine / "llama-folder"), str(mine / "solo.gguf")}
    assert good <= set(got)
    for name in good:
        e = got[name]
        assert not e.error, (name, e.error)
        assert (e.arch, e.context) == ("llama", 512), name
    hubm = got["acme/tiny-llama"]
    assert hubm.params == facts["params"] and hubm.quant == "fp32" and hubm.source == "hf"
    assert hubm.size > facts["params"] * 4  # the weights, through the cache's symlinks
    q8 = got["ollama:tiny:latest"]
    assert (q8.quant, q8.size, q8.path) == ("Q8_0", facts["gguf_size"], str(facts["blob"]))
    assert q8.params == got["ollama:tiny:f16"].params and got["ollama:tiny:f16"].quant == "F16"
    assert not any("mmproj" in n for n in got)  # a vision projector is not a language model
    assert {(s, ok) for s, _, ok in searched} >= {("hf", True), ("ollama", True), ("lmstudio", True),
                                                 ("folder", True)}


def test_bad_entries_are_one_line_and_the_rest_still_shows(world):
    env, mine, _ = world
    got = _by_name(stores.scan([str(mine)], env)[0])
    expect = {
        "ollama:broken:latest": "malformed manifest",
        "ollama:nolayer:latest": "no model layer",
        "ollama:f64:latest": "F64",
        "ollama:rwkv:latest": "`rwkv7`",
        "lmstudio:pub/big-GGUF/big-00001-of-00002.gguf": "split GGUF",
        "acme/gone": "no snapshot",
    }
    for name, words in expect.items():
        e = got[name]
        assert words in e.error and "\n" not in e.error, (name, e.error)
    assert not got["ollama:tiny:latest"].error  # listed among the bad ones
    from app.models import render
    text = render(list(got.values()), [])
    assert "ollama:broken:latest: malformed manifest" in text
    assert sum(1 for line in text.splitlines() if line.startswith("ollama:tiny:latest ")) == 1


def test_missing_blob_is_named(tmp_path):
    g = write_gguf(tmp_path / "t.gguf")
    ollama_add(tmp_path / "ol", "tiny:latest", g)
    for blob in (tmp_path / "ol" / "blobs").glob("sha256-*"):
        if blob.stat().st_size == g.stat().st_size:
            blob.unlink()
    e = _by_name(stores.scan((), {"HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "ol")})[0])
    assert "missing" in e["ollama:tiny:latest"].error and "ollama pull" in e["ollama:tiny:latest"].error
    with pytest.raises(VramchatError, match="missing"):
        resolve("ollama:tiny", {"HOME": str(tmp_path), "OLLAMA_MODELS": str(tmp_path / "ol")})


def test_resolve_names(world):
    env, _, facts = world
    assert resolve("ollama:tiny", env) == (facts["blob"], "ollama:tiny")
    assert resolve("ollama:tiny:f16", env)[0].stat().st_size != facts["gguf_size"]
    assert resolve("ollama:someone/tiny:v1", env)[0] == facts["blob"]
    assert resolve("ollama:registry.ollama.ai/someone/tiny:v1", env)[0] == facts["blob"]
    p, shown = resolve("lmstudio:pub/tiny-GGUF", env)  # the only GGUF besides mmproj
    assert p.name == "tiny.Q8_0.gguf" and shown == "lmstudio:pub/tiny-GGUF"
    p, shown = resolve("acme/tiny-llama", env)
    assert (p / "config.json").is_file() and "snapshots" in str(p) and shown == "acme/tiny-llama"
    assert resolve("acme/not-cached", env) is None  # left to transformers (and its hint)
    assert resolve("./some/path", env) is None
    for name, words in [("ollama:nope", "no such model in Ollama's store"), ("ollama:broken", "malformed"),
                        ("ollama:f64", "F64"), ("ollama:", "not an Ollama name"),
                        ("lmstudio:pub/none", "not found in LM Studio"),
                        ("lmstudio:pub/big-GGUF/big-00001-of-00002.gguf", "split GGUF"),
                        ("hf:acme/absent", "not in the Hugging Face cache")]:
        with pytest.raises(VramchatError, match=words):
            resolve(name, env)


def test_model_loads_by_store_name(world, tmp_path, monkeypatch):
    env, _, _ = world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VRAMCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from app.runtime.engine import Runtime
    rt = Runtime.load("ollama:tiny:latest", device="cpu", weights="fp32")
    assert rt.model_id == "ollama:tiny:latest" and rt.adapter.info.n_layers == 2
    assert rt.ask("hello", max_new_tokens=3).new_tokens == 3
    rt = Runtime.load("acme/tiny-llama", device="cpu", weights="fp32")  # from the cache, offline
    assert rt.model_id == "acme/tiny-llama"
    with pytest.raises(VramchatError, match="main.py models"):
        Runtime.load("no-such-model-anywhere", device="cpu")


def test_models_command_json_and_config_dirs(world, tmp_path, monkeypatch, capsys):
    env, mine, _ = world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    (tmp_path / "cfg" / "vramchat").mkdir(parents=True)
    (tmp_path / "cfg" / "vramchat" / "config.toml").write_text(f'model_dirs = ["{mine}"]\n')
    from app.cli import main
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for m in out["models"]}
    assert str(mine / "solo.gguf") in names and names["ollama:tiny:latest"]["quant"] == "Q8_0"
    assert "malformed manifest" in names["ollama:broken:latest"]["error"]
    assert any(s["store"] == "folder" and s["path"] == str(mine) for s in out["searched"])
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "ollama:someone/tiny:v1" in text and "searched:" in text


def test_model_completion(world, tmp_path, monkeypatch):
    env, _, _ = world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    from app.ui import commands
    monkeypatch.setattr(commands, "_models", (0.0, []))
    new, hints = commands.complete("/model ollama:ti")
    assert new == "/model ollama:tiny:" and {"ollama:tiny:latest", "ollama:tiny:f16"} <= set(hints)
    assert commands.complete("/model ollama:someone")[0] == "/model ollama:someone/tiny:v1"
    assert "ollama:broken:latest" not in commands.model_names()  # bad entries are not offered


def test_embedded_model_lists_its_shipped_files():
    try:
        from app.runtime.loader import default_gguf
        default_gguf()
    except VramchatError:
        pytest.skip("the embedded model is not installed")
    e = _by_name(stores.scan((), {"HOME": "/nonexistent"})[0])["SmolLM2-135M-Instruct"]
    assert (e.arch, e.context, e.heads, e.channels) == ("llama", 8192, True, True)
    assert 134e6 < e.params < 136e6


def test_config_model_dirs_must_be_paths():
    from app.config import ConfigError, parse_config
    assert parse_config({"model_dirs": ["~/models"]}).model_dirs == ["~/models"]
    with pytest.raises(ConfigError, match="model_dirs"):
        parse_config({"model_dirs": [3]})


def test_files_made_here_are_listed_and_found(world, tmp_path, monkeypatch):
    """`train-heads` and `calibrate` without --out keep their files for the model on this
    machine: `models` lists them (FILES) and `locret` / `doublesparse` find them."""
    env, _, _ = world
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VRAMCHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from app.cli import main
    e = _by_name(stores.scan((), env)[0])["acme/tiny-llama"]
    assert not e.heads and not e.channels
    assert main(["train-heads", "--model", "acme/tiny-llama", "--device", "cpu", "--steps", "4", "--docs", "2",
                 "--doc-tokens", "100", "--width", "8", "--threads", "1"]) == 0
    assert main(["calibrate", "--model", "acme/tiny-llama", "--device", "cpu", "--blocks", "2", "--block", "64",
                 "--threads", "1"]) == 0
    e = _by_name(stores.scan((), env)[0])["acme/tiny-llama"]
    assert e.heads and e.channels
    assert not _by_name(stores.scan((), env)[0])["ollama:tiny:latest"].heads  # its own name: not these
    from app.runtime.engine import Runtime
    rt = Runtime.load("acme/tiny-llama", device="cpu", weights="fp32", chunk_size=32)
    rt.set_policy("locret:budget=32,stabilizers=8")
    rt.set_policy("doublesparse:channels=4")
    assert rt.ask("hello", max_new_tokens=2).new_tokens == 2
