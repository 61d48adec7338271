"""Fast tests of the pure parts: config, saved conversations, gauge arithmetic, completion."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.config import Config, ConfigError, load_config, parse_config, to_toml
from app.runtime.types import ContextInfo, MemoryReport, VramchatError
from app.ui import commands, store
from app.ui.context import context_level
from app.ui.panels import bar, fmt_bytes, host_segments, vram_segments
from app.ui.screens import compose_spec
from app.ui.transcript import last_code_block

GiB = 1 << 30


def test_config_defaults_written_and_round_trip(tmp_path):
    path = tmp_path / "cfg" / "config.toml"
    assert load_config(path) == Config()
    assert path.is_file()
    custom = Config(model='org/m "x"', policy="full", theme="nord", max_new_tokens=64, temperature=0.7,
                    keymap={"policy": "f3", "copy_answer": "ctrl+shift+c"})
    path.write_text(to_toml(custom))
    assert load_config(path) == custom


@pytest.mark.parametrize("data, message", [
    ({"modle": "x"}, "unknown key `modle`"),
    ({"max_new_tokens": "many"}, "`max_new_tokens` must be a int"),
    ({"max_new_tokens": 0}, "at least 1"),
    ({"keymap": {"policy": 3}}, "keymap entry `policy`"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_config_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("model = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_store_save_load_private_and_atomic(tmp_path):
    data = {"model": "m", "policy": "full", "system": "be brief",
            "messages": [{"role": "document", "name": "a.txt", "tokens": 1234, "content": "text"},
                         {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a", "partial": True,
                          "stats": {"new_tokens": 3, "ttft_s": 0.5, "decode_tok_s": 10.0, "policy": "full",
                                    "stopped": True}}]}
    path = store.save(tmp_path / "conv", "my chat!", data)
    assert path.name == "my-chat.json" and (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert store.load(path) == data
    md = path.with_suffix(".md").read_text()
    assert "## Document: a.txt (1,234 tokens)" in md and "stopped (partial)" in md
    assert [p.name for p in path.parent.iterdir()] and not list(path.parent.glob("*.tmp"))
    assert store.resolve(tmp_path / "conv", "my chat!") == path
    (tmp_path / "bad.json").write_text(json.dumps([1]))
    with pytest.raises(VramchatError, match="not a vramchat conversation"):
        store.load(tmp_path / "bad.json")


def test_vram_segments_add_up_and_split_kv_by_kind():
    r = MemoryReport(device="cuda:0", has_gpu=True, weights_bytes=4 * GiB,
                     kv={"gpu": {"keys": GiB, "values": GiB, "codes": GiB // 2, "scales": GiB // 8,
                                 "labels": GiB // 16}, "host": {"keys": 2 * GiB}},
                     gpu_total=24 * GiB, gpu_used=10 * GiB, torch_reserved=8 * GiB, host_total=64 * GiB,
                     host_available=40 * GiB, rss=6 * GiB)
    segs, total = vram_segments(r)
    d = dict(segs)
    assert total == 24 * GiB and sum(d.values()) == total
    assert d["KV fp"] == 2 * GiB and d["KV quant"] == GiB // 2 + GiB // 8 and d["KV labels"] == GiB // 16
    assert d["free"] == 14 * GiB and d["torch other"] == 8 * GiB - 4 * GiB - d["KV fp"] - d["KV quant"] - d["KV labels"]
    host, host_total = host_segments(r)
    assert dict(host)["offloaded KV"] == 2 * GiB and host_total == 64 * GiB
    assert len(bar(segs, total, 37).plain) == 37


def test_no_gpu_split_is_against_host_memory():
    r = MemoryReport(device="cpu", has_gpu=False, weights_bytes=2 * GiB, kv={"host": {"keys": GiB}},
                     host_total=16 * GiB, host_available=8 * GiB, rss=4 * GiB)
    segs, total = vram_segments(r)
    d = dict(segs)
    assert total == 16 * GiB and d["free"] == 8 * GiB and d["KV fp"] == GiB and d["process"] == GiB
    assert sum(d.values()) == total


def test_small_helpers():
    assert fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(3 * GiB) == "3.0 GiB" and fmt_bytes(None) == "n/a"
    assert context_level(ContextInfo(100, 100, 1000)) == "green"
    assert context_level(ContextInfo(9000, 950, 1000)) == "red"
    assert last_code_block("a\n```py\nx = 1\n```\nb\n~~~\ny\n~~~\n") == "y\n"
    assert last_code_block("no code") is None
    assert compose_spec("full", "full") == "full"
    assert compose_spec("bogus+full", "full") == "full"


def test_completion_and_parsing(tmp_path):
    assert commands.parse("/policy  full ") == ("policy", "full")
    assert commands.parse("hello") is None and commands.parse("//not a command") is None
    assert commands.complete("/he") == ("/help ", ["/help: keys and commands"])
    assert commands.complete("/policy fu")[0] == "/policy full"
    (tmp_path / "long doc.txt").write_text("x")
    (tmp_path / "image.png").write_text("x")
    new, hints = commands.complete(f"/load {tmp_path}/lo")
    assert new == f"/load {tmp_path}/long doc.txt" and hints == ["long doc.txt"]
    assert commands.complete(f"/load {tmp_path}/im")[1] == []
    assert commands.complete("/open my", ["my-talk", "other"])[0] == "/open my-talk"
    assert "unknown command" in commands.hint("/zz")


def test_engine_modules_never_import_textual():
    code = ("import sys, app.runtime, policies, app.config\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('offload'): import offload\n"
            "bad = [m for m in ('textual', 'rich', 'app.ui') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
