"""Cache files (app/runtime/snapshot.py, policies/state.py) and the document cache
(app/runtime/doc_cache.py).

Exactness: a conversation saved with its cache and reopened in a fresh runtime continues
bit for bit as the live one -- the next token's logits are equal (torch.equal), the
cache's state and bytes are equal -- for every registered policy on a tiny model, and for
`locret`, `locret+kivi`, `locret+offload` on the default model. Files that are truncated,
corrupt, for another model or policy, or for a conversation that changed are refused in
one line, and the conversation is read again instead (never lost).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from app.runtime.decode import Decoder
from app.runtime.doc_cache import DocCache
from app.runtime.engine import Runtime
from policies import REGISTRY, state
from tiny import tiny_model_dir, tiny_pair, tiny_policy_files

CHUNK = 32
# name -> a spec that puts it to work on a ~500-token conversation (evicting selectors at a
# budget far below it, kivi quantizing, offload recalling and quoting, ffnskip skipping)
SPECS = {
    "full": "full",
    "streaming": "streaming:sinks=4,window=60",
    "h2o": "h2o:budget=64,recent=16,local=0",
    "snapkv": "snapkv:budget=64,window=8,local=0",
    "anchor": "anchor:budget=64,local=16,sinks=4",
    "locret": "locret:budget=64,stabilizers=8,local=0,heads={heads}",
    "lighttransfer": "lighttransfer:sinks=4,window=60,queries=8",
    "kivi": "kivi:group=16,residual=32",
    "offload": "locret:budget=64,stabilizers=8,local=0,heads={heads}+offload:recall=32,quote=16,channels_file={ch}",
    "doublesparse": "streaming:sinks=4,window=96+doublesparse:channels_file={ch},keep=0.25,dense_layers=1",
    "ffnskip": "ffnskip:cold=1:1,threshold=0.5,warmup=1",
}
# stacks whose parts meet in one layer: a store swapped by a selector, the host store alone
COMBOS = ["lighttransfer:sinks=4,window=60,queries=8+kivi:group=16,residual=32", "offload",
          "locret:budget=64,stabilizers=8,local=0,heads={heads}+kivi:group=16,residual=32",
          "streaming:sinks=4,window=40+offload:terms=on,rank=off,recall=32,quote=16"]  # no labels
DOC = ("The pass key is 4242. Remember it well. " * 3 + "Apples are red; the sky is blue. " * 4).strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("files"))


def _rt(spec: str, seed: int = 0) -> Runtime:
    return Runtime.from_model(*tiny_pair(seed), policy=spec, model_id="tiny", chunk_size=CHUNK)


def _talk(rt: Runtime, doc) -> None:
    rt.load_document(str(doc))
    rt.ask("What is the pass key?", max_new_tokens=6)


def _doc(tmp_path, text: str = DOC):
    p = tmp_path / "doc.txt"
    p.write_text(text)
    return p


def _same_state(a, b) -> None:
    ta, ma = state.state(a.cache)
    tb, mb = state.state(b.cache)
    assert ma == mb
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].cpu(), tb[k].cpu()), k
    assert +a.cache.nbytes() == +b.cache.nbytes()


def _next_logits(rt: Runtime, ids: list[int]) -> list[torch.Tensor]:
    """What the cache gives next: a decode step's logits (as if the answer went on), a
    prefill's last logits, and the decode step after it."""
    out = []
    with Decoder(rt.adapter, rt.cache) as dec:
        out.append(dec.step(ids[0]).clone())
    out.append(rt.prefill(ids[1:]))
    with Decoder(rt.adapter, rt.cache) as dec:
        out.append(dec.step(int(out[-1].argmax())).clone())
    return out


def _reopen_and_compare(live: Runtime, spec: str, path) -> Runtime:
    n = live.save_cache(path)
    assert n == path.stat().st_size > 0
    fresh = _rt(spec)
    how = fresh.restore(live.to_json(), cache_file=path)
    assert how.startswith("restored its cache"), how
    _same_state(live, fresh)
    assert fresh.messages == live.messages and fresh.cache.seen == live.cache.seen
    follow = [int(t) for t in torch.randint(4, 260, (40,), generator=torch.Generator().manual_seed(3))]
    for a, b in zip(_next_logits(live, follow), _next_logits(fresh, follow)):
        assert torch.equal(a, b)
    _same_state(live, fresh)
    return fresh


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_reopened_cache_continues_exactly(name, files, tmp_path):
    assert name in SPECS, f"add `{name}` to SPECS: every registered policy is tested here"
    spec = SPECS[name].format(**files)
    live = _rt(spec)
    _talk(live, _doc(tmp_path))
    if name in ("streaming", "locret", "offload", "h2o", "snapkv", "anchor"):
        assert live.cache.length < live.cache.seen  # it evicted: positions were compacted
    fresh = _reopen_and_compare(live, spec, tmp_path / "c.cache.safetensors")
    ra, rb = live.ask("And the apples?", max_new_tokens=8), fresh.ask("And the apples?", max_new_tokens=8)
    assert (ra.answer, ra.prompt_tokens) == (rb.answer, rb.prompt_tokens)


@pytest.mark.parametrize("spec", COMBOS)
def test_reopened_stack_continues_exactly(spec, files, tmp_path):
    spec = spec.format(**files)
    live = _rt(spec)
    _talk(live, _doc(tmp_path))
    _reopen_and_compare(live, spec, tmp_path / "c.cache.safetensors")
    if spec.startswith("lighttransfer"):  # lazy layers swapped kivi for full precision, and stay swapped
        kinds = {type(l.store).__name__ for l in live.cache.layers}
        assert kinds == {"FullStore", "KiviStore"}


def test_file_is_private_whole_and_described(files, tmp_path):
    live = _rt("kivi:group=16,residual=32")
    _talk(live, _doc(tmp_path))
    path = tmp_path / "c.cache.safetensors"
    live.save_cache(path)
    live.save_cache(path)  # replaced atomically
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "vramchat-kv-1" and meta["spec"] == live.policy and meta["model_id"] == "tiny"
    assert int(meta["tokens"]) == live.cache.seen
    from app.runtime.snapshot import ids_hash
    assert meta["tokens_sha256"] == ids_hash(live.held.ids) and len(live.held.ids) == live.cache.seen


def _refused(live: Runtime, path, spec: str, seed: int = 0, check: bool = False) -> str:
    """Reopen with a bad file: -> the one-line reason. The conversation was read again (all
    of it, into a cache of its own); check: it answers as one read from scratch does."""
    rt = _rt(spec, seed)
    data = live.to_json()
    how = rt.restore(data, cache_file=path)
    assert how.startswith("re-read the conversation (") and "\n" not in how, how
    assert rt.messages == live.messages and rt.cache.seen == len(rt.held.ids) == len(rt.tokens(rt.held.text)) > 0
    if check:
        ref = _rt(spec, seed)
        ref.restore(data)
        assert rt.ask("Again?", max_new_tokens=6).answer == ref.ask("Again?", max_new_tokens=6).answer
    return how


def test_bad_files_are_refused_and_the_conversation_read_again(tmp_path):
    live = _rt("full")
    _talk(live, _doc(tmp_path))
    good = tmp_path / "good.cache.safetensors"
    live.save_cache(good)
    blob = good.read_bytes()

    cut = tmp_path / "cut.cache.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    assert "truncated" in _refused(live, cut, "full", check=True)

    flipped = bytearray(blob)
    flipped[-100] ^= 0xFF  # inside the last tensor's data: the header still parses
    bad = tmp_path / "bad.cache.safetensors"
    bad.write_bytes(bytes(flipped))
    assert "checksum mismatch" in _refused(live, bad, "full")

    junk = tmp_path / "junk.cache.safetensors"
    junk.write_bytes(os.urandom(4096))
    assert "not a safetensors file" in _refused(live, junk, "full")

    assert "made with other weights" in _refused(live, good, "full", seed=1)
    assert "made under policy `full`, not `streaming" in _refused(live, good, "streaming:window=60")
    assert "no cache file was saved" in _refused(live, tmp_path / "none.cache.safetensors", "full")


@pytest.mark.parametrize("spec", ["full", "streaming:sinks=4,window=60"])
def test_edited_conversation_reads_from_the_change(spec, tmp_path):
    """A conversation edited after its cache was saved: the cache is restored and the next
    turn reads from the change (cut back where nothing was evicted, else all of it), as the
    runtime does for an edited chat; the answer is the one a runtime given the edited chat
    with an empty cache gives (it reads all of it with the question)."""
    live = _rt(spec)
    _talk(live, _doc(tmp_path))
    path = tmp_path / "c.cache.safetensors"
    live.save_cache(path)
    edited = json.loads(json.dumps(live.to_json()))
    edited["messages"][-1]["content"] = "Something else entirely."
    rt, ref = _rt(spec), _rt(spec)
    how = rt.restore(edited, cache_file=path)
    assert "the conversation changed after it was saved" in how and "\n" not in how
    ref.set_conversation(edited["system"], edited["messages"])
    ra, rb = rt.ask("Sure?", max_new_tokens=6), ref.ask("Sure?", max_new_tokens=6)
    assert ra.answer == rb.answer


def test_foreign_state_of_the_same_spec_name_is_refused(tmp_path):
    """A file whose metadata claims this spec but whose tensors another cache made (its
    digest rewritten to match) fails to fit, in one line."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    from policies.files import digest
    live = _rt("full")
    _talk(live, _doc(tmp_path))
    path = tmp_path / "c.cache.safetensors"
    live.save_cache(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    t = load_file(str(path))
    t["cache.layers.0.store.k"] = t["cache.layers.0.store.k"][:, :-1].contiguous()  # one token short
    meta["sha256"] = digest(t)
    save_file(t, str(path), metadata=meta)
    how = _refused(live, path, "full")
    assert "does not fit policy `full`" in how


def test_partial_save_reopens_on_the_last_cache(tmp_path):
    """The app autosaves a streaming answer's JSON without a cache file: reopening restores
    the last turn's cache and reads only what came after it."""
    live = _rt("full")
    _talk(live, _doc(tmp_path))
    path = tmp_path / "c.cache.safetensors"
    live.save_cache(path)
    data = live.to_json()
    data["messages"] += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "Yes", "partial": True}]
    rt = _rt("full")
    assert rt.restore(data, cache_file=path).startswith("restored its cache")
    ref = _rt("full")
    ref.restore(data)
    assert rt.ask("Why?", max_new_tokens=6).answer == ref.ask("Why?", max_new_tokens=6).answer


def test_document_cache_skips_the_read(tmp_path):
    doc = _doc(tmp_path)
    dc = DocCache(tmp_path / "docs", 1 << 30)
    a = _rt("kivi:group=16,residual=32")
    a.doc_cache = dc
    ia = a.load_document(str(doc))
    assert not ia.from_cache and len(dc.entries()) == 1
    b = _rt("kivi:group=16,residual=32")
    b.doc_cache = dc
    ib = b.load_document(str(doc))
    assert ib.from_cache and ib.tokens == ia.tokens and b.messages == a.messages
    _same_state(a, b)
    ra, rb = a.ask("What is the pass key?", max_new_tokens=8), b.ask("What is the pass key?", max_new_tokens=8)
    assert ra.answer == rb.answer
    # another policy, another file content or another conversation start is another entry
    c = _rt("full")
    c.doc_cache = dc
    assert not c.load_document(str(doc)).from_cache
    d = _rt("kivi:group=16,residual=32")
    d.doc_cache = dc
    d.set_system("Be brief.")
    assert not d.load_document(str(doc)).from_cache
    doc.write_text(DOC + " One more line.")
    e = _rt("kivi:group=16,residual=32")
    e.doc_cache = dc
    assert not e.load_document(str(doc)).from_cache
    assert len(dc.entries()) == 4
    assert dc.clear()[0] == 4 and dc.entries() == []


def test_document_cache_drops_the_least_recently_used(tmp_path):
    from app.runtime.doc_cache import file_hash
    docs = []
    for i in range(3):
        (tmp_path / str(i)).mkdir()
        docs.append(_doc(tmp_path / str(i), f"Document number {i}. " * 20))
    probe = DocCache(tmp_path / "probe", 1 << 30)

    def load(d, dc) -> bool:
        rt = _rt("full")
        rt.doc_cache = dc
        return rt.load_document(str(d)).from_cache
    load(docs[0], probe)
    dc = DocCache(tmp_path / "docs", int(2.5 * probe.entries()[0].bytes))  # room for two entries
    assert not load(docs[0], dc) and not load(docs[1], dc)
    for when, e in zip((2000, 1000), dc.entries()):  # docs[1] used last, docs[0] before it
        os.utime(e.path, (when, when))
    assert load(docs[0], dc)  # used now: docs[1] is the least recently used
    assert not load(docs[2], dc)
    entries = dc.entries()
    assert len(entries) == 2 and sum(e.bytes for e in entries) <= dc.cap
    kept = [json.loads(e.meta["extra"])["file_sha256"] for e in entries]
    assert kept == [file_hash(docs[2]), file_hash(docs[0])]  # most recently used first


def test_document_too_large_for_the_cap_is_read_and_said(tmp_path):
    rt = _rt("full")
    rt.doc_cache = DocCache(tmp_path / "docs", 1000)
    info = rt.load_document(str(_doc(tmp_path)))
    assert not info.from_cache and "over its cap" in info.note and rt.doc_cache.entries() == []


def test_a_cache_held_past_the_cap_is_refused_before_it_is_written(tmp_path):
    """A million-token cache (~10 GiB) over a 4 GiB cap is not written to disk and then deleted."""
    dc = DocCache(tmp_path / "docs", 1000)

    def write(path):
        raise AssertionError("written although the cache holds more than the cap")
    class Held:  # a KVCache's byte count: 1,001 bytes, one past the cap
        def __init__(self, n):
            self.n = n

        def bytes_by_tier(self):
            return {"gpu": self.n - 1, "host": 1}
    why = dc.put("k" * 32, write, Held(1001))
    assert why.startswith("not kept in the document cache: the cache holds 0.00 GiB, over its cap")
    assert not dc.path("k" * 32).exists() and dc.entries() == []
    dc.folder.mkdir(parents=True)
    assert dc.put("k" * 32, lambda p: p.write_bytes(b"x" * 10), Held(1000)) == ""  # at the cap: written
    assert [e.bytes for e in dc.entries()] == [10]


def test_cli_ask_save_resume_and_cache_commands(tmp_path, monkeypatch, capsys):
    """`ask --save`, `ask --resume` (its cache restored) and `main.py cache list|clear`, on a
    tiny model saved as a folder, config and caches in temporary dirs."""
    from app.cli import main
    model_dir = tiny_model_dir(tmp_path, monkeypatch)
    doc = _doc(tmp_path)
    common = ["--model", str(model_dir), "--device", "cpu", "--chunk-size", "32", "--max-new-tokens", "5", "--json"]
    assert main(["ask", *common, "--doc", str(doc), "--save", "talk", "What is the pass key?"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["documents"][0]["from_cache"] is False
    conv = tmp_path / "data" / "vramchat" / "conversations"
    assert (conv / "talk.json").is_file() and (conv / "talk.cache.safetensors").stat().st_mode & 0o777 == 0o600
    assert main(["ask", *common, "--resume", "talk", "And then?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resumed"]["how"].startswith("restored its cache"), out["resumed"]
    assert out["answers"][0]["prompt_tokens"] < 60 < out["context_tokens"]  # only the new question was read
    assert main(["ask", *common, "--doc", str(doc), "Again?"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"][0]["from_cache"] is True
    assert main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert "doc.txt" in listed and "1 cached document," in listed
    assert main(["cache", "clear"]) == 0
    assert "removed 1 cached document " in capsys.readouterr().out


@pytest.mark.real_model
@pytest.mark.parametrize("spec", ["locret:budget=256,stabilizers=64", "locret:budget=256,stabilizers=64+kivi",
                                  "locret:budget=256,stabilizers=64+offload"])
def test_reopened_cache_continues_exactly_on_the_default_model(spec, smol, tmp_path):
    """The default model with its shipped heads and channels: a 900-token document read
    with eviction, a question answered, the conversation saved with its cache; reopening it
    gives the live cache's next logits bit for bit."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "data" / "haystack" / "licenses.txt").read_text()[:3600]
    doc = _doc(tmp_path, text)
    rt = smol
    rt.clear()
    rt.set_system(None)
    rt.set_policy(spec)
    rt.load_document(str(doc))
    rt.ask("Who may copy this license?", max_new_tokens=8)
    assert rt.cache.length < rt.cache.seen  # it evicted
    path = tmp_path / "c.cache.safetensors"
    rt.save_cache(path)
    data, tensors, meta, nbytes = rt.to_json(), *state.state(rt.cache), +rt.cache.nbytes()
    tensors = {k: v.clone() for k, v in tensors.items()}
    follow = rt.tokens(" Which version of the license is this, and who published it?")
    want = _next_logits(rt, follow)
    how = rt.restore(data, cache_file=path)
    assert how.startswith("restored its cache"), how
    t2, m2 = state.state(rt.cache)
    assert m2 == meta and sorted(t2) == sorted(tensors) and all(torch.equal(t2[k], tensors[k]) for k in t2)
    assert +rt.cache.nbytes() == nbytes
    for a, b in zip(want, _next_logits(rt, follow)):
        assert torch.equal(a, b)
