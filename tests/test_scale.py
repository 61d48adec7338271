"""`bench scale` (app/bench/scale.py) on a tiny model: a row per (length, policy) with the
read's speed at its start and end, memory beside plan's estimate and the first answer's
recall; the quantized host tier holds less than the full-precision one for the same read."""
from __future__ import annotations

import json

import pytest

from app.bench import scale
from app.runtime.engine import Runtime
from tiny import tiny_pair, tiny_policy_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("files"))


def test_scale_rows(files, tmp_path):
    loc = "locret:budget=64,stabilizers=8,local=10,heads={heads}".format(**files)
    stack = loc + "+offload:terms=on,rank=off,recall=32,quote=16"
    specs = [loc, stack, stack + ",kbits=8,vbits=4"]
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=32)
    rows = scale.run(rt, policies=specs, lengths=(900,), decode=4, out_dir=tmp_path)
    assert [r["policy"] for r in rows] == specs
    for r in rows:  # every needle asked in turn after the pass key, scored against its value
        assert [a["question"] for a in r["needle_answers"]] == [q for _, q, _, _ in scale.NEEDLES]
        assert r["needles"] == f"{sum(a['correct'] for a in r['needle_answers'])}/3"
        assert all(a["correct"] == (a["want"].lower() in a["answer"].lower()) for a in r["needle_answers"])
    for r in rows:
        assert 880 <= r["tokens"] <= 1000 and r["chunks"] >= 25
        assert r["prefill_tok_s"] > 0 and r["chunk_start_ms"] > 0 and r["chunk_end_ms"] > 0
        assert len(r["chunk_ms_tenths"]) == 10 and min(r["chunk_ms_tenths"]) > 0
        assert r["rss_mib"] > 0 and r["device_kv_mib"] > 0 and 0 < r["ttft_s"] < r["answer_s"]
        # plan replays the cache's own rule: what the read holds, to the byte, plus offload's
        # recall buffer at its full size (the live one is taken at the first question)
        assert r["plan_device_mib"] == r["device_kv_mib"]
        assert 0 <= r["recall_mib"] <= r["plan_recall_mib"]  # allocated as spans are recalled, up to plan's
        assert r["device_kv_answered_mib"] >= r["device_kv_mib"]
    bare, fp, coded = rows
    assert bare["host_kv_mib"] == bare["plan_host_mib"] == bare["plan_recall_mib"] == bare["recall_mib"] == 0 and bare["recall_s"] == 0
    assert fp["recall_s"] > 0 and coded["recall_s"] > 0  # the question recalled (timed per layer)
    assert 0 < coded["host_kv_mib"] < fp["host_kv_mib"] / 2
    for r in (fp, coded):  # plan counts the spill's rows; the read also holds its token log (8 B a token)
        assert r["plan_host_mib"] <= r["host_kv_mib"] <= r["plan_host_mib"] + 8 * 4096 / 2**20
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved["suite"] == "scale" and len(saved["rows"]) == 3 and "commit" in saved["machine"]
    assert saved["rows"][0]["chunk_ms_tenths"] == rows[0]["chunk_ms_tenths"]


def test_tenths_are_the_medians_of_consecutive_runs():
    # 25 chunks: runs of 2 or 3 in order; a cost that climbs climbs through the tenths, and one
    # slow chunk (a blip) moves only its own run's median if the run is longer than two
    times = [float(i) for i in range(25)]
    assert scale.tenths(times) == [0.5, 3.0, 5.5, 8.0, 10.5, 13.0, 15.5, 18.0, 20.5, 23.0]
    flat = [1.0] * 30
    flat[14] = 50.0
    assert scale.tenths(flat) == [1.0] * 10
    assert scale.tenths([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert scale.tenths([]) == []


def test_the_document_hides_the_key_at_half_depth_and_three_needles_at_theirs():
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=32)
    text, key, needles = scale.document(rt, 3000, seed=3)
    at = text.index(f"The pass key is {key}.")
    assert 0.3 < at / len(text) < 0.7 and abs(len(rt.tokens(text)) - 3000) < 150
    assert [q for q, _ in needles] == [q for _, q, _, _ in scale.NEEDLES]
    for (stmt, _, values, depth), (_, x) in zip(scale.NEEDLES, needles):
        assert x in values and text.count(stmt.format(x=x)) == 1
        assert abs(text.index(stmt.format(x=x)) / len(text) - depth) < 0.1, stmt
    other = scale.document(rt, 3000, seed=4)
    assert (other[1], other[2]) != (key, needles)  # another trial, other values
