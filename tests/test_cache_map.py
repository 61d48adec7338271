"""The cache map (app/runtime/cache_map.py) on a real runtime: its spans cover every token
read once, the device share adds up to what the cache retains, the host share to the host
tier's count, the recalled share to the recall buffer's; it reads no K/V to say so; and
`ask --json` and `serve` hand it out."""
from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest

from app.runtime import cache_map
from app.runtime.cache_map import DEVICE, HOST, QUANT, RECALLED
from app.runtime.engine import Runtime
from tiny import tiny_model_dir, tiny_pair, tiny_policy_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("cache-map"))


def _doc(folder, name="doc.txt", k=110, seed=0):
    words = random.Random(seed).choices(["cache", "token", "layer", "budget", "head", "policy", "chunk"], k=k)
    path = folder / name
    path.write_text(" ".join(words), encoding="utf-8")
    return path


def _specs(files) -> dict:
    sel = f"locret:budget=48,stabilizers=8,local=16,heads={files['heads']}"
    return {"full": "full", "locret": sel, "kivi": "kivi:group=16,residual=32",
            "locret+kivi": f"{sel}+kivi:group=16,residual=32",
            "locret+offload": f"{sel}+offload:channels_file={files['ch']},recall=24",
            "streaming+offload": "streaming:sinks=4,window=40+offload:rank=off,quote=16,recall=32",
            "offload": "offload"}


def _covers_once(cmap, seen: int) -> None:
    spans = cmap.spans()
    assert spans[0].start == 0 and spans[-1].end == seen
    assert all(a.end == b.start for a, b in zip(spans, spans[1:])), "a gap or an overlap"
    rows = sorted(r for row in cmap.rows for r in row.ranges)
    assert rows[0][0] == 0 and rows[-1][1] == seen and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    for s in spans:
        assert abs(sum(s.shares.values()) - 1) < 1e-6 and 0 <= s.kept_share <= 1


def _check_against_the_cache(rt) -> None:
    cmap, cache = rt.snapshot().cache_map, rt.cache
    heads = cache.info.n_kv_heads
    assert cmap.seen == cache.seen == rt.context().read
    _covers_once(cmap, cache.seen)
    c = cmap.counts
    on_host_store = [layer.store.tier == "host" for layer in cache.layers]
    device = sum(layer.length * heads for layer, h in zip(cache.layers, on_host_store) if not h)
    assert c[DEVICE].sum() + c[QUANT].sum() == device
    assert c[QUANT].sum() == sum(layer.store.quantized() * heads for layer in cache.layers)
    host_rows = sum(layer.spill.n * heads for layer in cache.layers if layer.spill is not None)
    host_rows += sum(layer.length * heads for layer, h in zip(cache.layers, on_host_store) if h)
    assert c[HOST].sum() + c[RECALLED].sum() == host_rows
    recalled = sum(layer.spill.m * heads for layer in cache.layers if layer.spill is not None)
    assert c[RECALLED].sum() == recalled
    # the spans say the same in shares: tokens x share summed over spans
    spans = cmap.spans()
    dev_tokens = sum((s.end - s.start) * (s.shares["device"] + s.shares["device-quantized"]) for s in spans)
    if len({layer.length for layer in cache.layers}) == 1 and not any(on_host_store):
        assert dev_tokens == pytest.approx(rt.context().retained)  # every layer keeps as many
    host_tokens = sum((s.end - s.start) * (s.shares["host"] + s.shares["recalled"]) for s in spans)
    assert host_tokens * cmap.pairs == pytest.approx(host_rows)


@pytest.mark.parametrize("name", ["full", "locret", "kivi", "locret+kivi", "locret+offload", "streaming+offload",
                                  "offload"])
def test_map_covers_every_token_and_agrees_with_the_cache(name, files, tmp_path):
    spec = _specs(files)[name]
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=32, policy=spec)
    doc = _doc(tmp_path)
    rt.load_document(str(doc))
    _check_against_the_cache(rt)
    rt.ask("Which budget does the cache keep?", max_new_tokens=4)
    _check_against_the_cache(rt)
    rt.load_document(str(_doc(tmp_path, "second.txt", k=40, seed=1)))
    _check_against_the_cache(rt)
    cmap = rt.snapshot().cache_map
    assert [(r.label, r.kind) for r in cmap.rows] == [("doc.txt", "document"), ("second.txt", "document"),
                                                      ("chat", "chat")]
    row = cmap.rows[0]
    assert cmap.text(row, *row.ranges[0]).startswith('<document name="doc.txt">')
    assert cmap.text(row, *row.ranges[0]).rstrip().endswith("</document>")
    tiers = {s.tier for s in cmap.spans()}
    want = {"full": {"device"}, "kivi": {"device", "device-quantized"}, "offload": {"host"}}
    if name in want:
        assert tiers == want[name], tiers
    elif name == "locret" or name == "locret+kivi":
        assert "evicted" in tiers and "host" not in tiers
    else:
        assert "host" in tiers and "evicted" not in tiers


def test_recalled_for_the_question(files, tmp_path):
    """Behind an evicting selector, the question brings host rows back: they show as recalled."""
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=32, policy=_specs(files)["locret+offload"])
    rt.load_document(str(_doc(tmp_path)))
    rt.ask("Which budget does the cache keep?", max_new_tokens=4)
    cmap = rt.snapshot().cache_map
    assert cmap.counts[RECALLED].sum() > 0
    assert "recalled" in {s.tier for s in cmap.spans()}
    _check_against_the_cache(rt)


def test_a_live_switch_moves_the_map(files, tmp_path):
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=32)
    rt.load_document(str(_doc(tmp_path)))
    before = rt.snapshot()
    assert {s.tier for s in before.cache_map.spans()} == {"device"}
    rt.set_policy("kivi:group=16,residual=32")  # converted in place
    after = rt.snapshot()
    assert after.cache_map is not before.cache_map and after.timeline is before.timeline
    assert "device-quantized" in {s.tier for s in after.cache_map.spans()}
    _check_against_the_cache(rt)
    samples = after.timeline.samples()
    assert samples[-1].policy == rt.policy and samples[-2].policy == "full"
    assert samples[-1].gpu < samples[-2].gpu  # the switch is a step down
    assert max(s.documents for s in samples) == 1


def test_tokens_being_read_are_a_reading_row(tmp_path):
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=32)
    rt.load_document(str(_doc(tmp_path)))
    seen = []

    def progress(done, total):
        seen.append(rt.snapshot().cache_map)
    rt.load_document(str(_doc(tmp_path, "second.txt", seed=2)), progress=progress)
    mid = [c for c in seen if any(r.kind == "reading" for r in c.rows)]
    assert mid, "no state published mid-read"
    for c in mid:
        (start, end), = next(r for r in c.rows if r.kind == "reading").ranges
        assert end == c.seen and start == max(b for r in c.rows if r.kind != "reading" for _, b in r.ranges)
        _covers_once(c, c.seen)
        assert [r.label for r in c.rows if r.kind == "document"] == ["doc.txt"]
    final = rt.snapshot().cache_map
    assert [r.label for r in final.rows] == ["doc.txt", "second.txt", "chat"]


def test_the_map_reads_no_keys_or_values(files, tmp_path, monkeypatch):
    """Built from positions and counts only: every store's K/V access raises meanwhile."""
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=32, policy=_specs(files)["locret+offload"])
    rt.load_document(str(_doc(tmp_path)))
    rt.ask("Which budget?", max_new_tokens=3)
    cache = rt.cache

    def refuse(*a, **k):
        raise AssertionError("the map read K/V")
    for layer in cache.layers:
        monkeypatch.setattr(layer.store, "dense", refuse)
        monkeypatch.setattr(layer.store, "attend", refuse)
    segs = cache_map.segments(rt.held, rt.messages, rt.tok, cache.seen)
    cmap = cache_map.build(cache, segs)
    assert np.array_equal(cmap.counts, rt.snapshot().cache_map.counts)


def test_cells_average_the_tokens_they_hold(tmp_path):
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=32, policy="streaming:sinks=4,window=40")
    rt.load_document(str(_doc(tmp_path)))
    cmap = rt.snapshot().cache_map
    for row in cmap.rows:
        cells = cmap.cells(row, 7)
        assert 1 <= len(cells) <= 7 and cells[0].start == row.ranges[0][0] and cells[-1].end == row.ranges[-1][1]
        kept = sum(c.kept_share * (c.end - c.start) for c in cells if c.tier != "evicted") if row.kind == "document" \
            else None
        if kept is not None:
            exact = sum(s.kept_share * (s.end - s.start) for s in cmap.spans()
                        if s.document == row.label and s.tier != "evicted")
            assert kept == pytest.approx(exact)


def test_ask_json_gives_the_map(tmp_path, monkeypatch, capsys):
    from app.cli import main
    model_dir = tiny_model_dir(tmp_path, monkeypatch)
    doc = _doc(tmp_path)
    assert main(["ask", "--model", str(model_dir), "--device", "cpu", "--chunk-size", "32", "--max-new-tokens", "4",
                 "--policy", "streaming:sinks=4,window=40", "--json", "--doc", str(doc), "What is kept?"]) == 0
    out = json.loads(capsys.readouterr().out)
    spans = out["cache_map"]
    assert spans[0]["start"] == 0 and spans[-1]["end"] == out["context_tokens"]
    assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:]))
    assert set(spans[0]) == {"document", "start", "end", "tier", "kept_share", "shares"}
    assert {s["document"] for s in spans} == {"doc.txt", "chat"}
    kept = sum((s["end"] - s["start"]) * s["shares"]["device"] for s in spans)
    assert kept == pytest.approx(out["retained_tokens"], abs=0.01)
    assert {s["tier"] for s in spans} == {"device", "evicted"}


def test_serve_memory_endpoint_gives_the_map():
    from app.server import Background, Serving
    m, t = tiny_pair(7)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=64)
    serving = Serving(rt, max_queue=2).start()
    with Background(serving) as url:
        r = httpx.post(f"{url}/chat/completions", json={
            "model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Say something about foxes."}]},
            timeout=120)
        assert r.status_code == 200
        mem = httpx.get(f"{url}/vramchat/memory", timeout=120).json()
    spans = mem["cache_map"]
    assert spans and spans[0]["start"] == 0 and spans[-1]["end"] == mem["context"]["read"]
    assert {s["tier"] for s in spans} == {"device"} and {s["document"] for s in spans} == {"chat"}
