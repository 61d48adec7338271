"""Parts `sources` and `sources-depths` of `bench quality` (app/bench/sources.py)."""
from __future__ import annotations

import pytest

from app.bench import sources
from app.runtime import evidence

pytestmark = pytest.mark.real_model


def test_candidate_layers_map_as_the_runtime_maps_depths():
    for n in (2, 12, 30, 32):
        assert sources._layers(evidence.DEPTHS, n) == evidence.layers_for(n)
    assert sources._layers("every", 5) == (0, 1, 2, 3, 4)


def test_needle_sits_on_a_line_of_its_own(smol):
    doc = sources.needle_doc(smol.tok, 1024, seed=3)
    (fact,), (turn,) = doc.facts, doc.turns
    lines = doc.text.split("\n")
    assert lines[sources.fact_line(doc, turn) - 1] == fact.statement
    assert fact.value in fact.statement and turn.want == (fact.value,)
    assert abs(len(smol.tokens(doc.text)) - 1024) < 32


def test_a_needle_at_1k_is_the_top_source_under_full(fresh_smol):
    rt = fresh_smol
    rows = sources.run(rt, policies=["full"], lengths=[1024], trials=1, kinds=("needle",), cost_pairs=1, cost_new=6)
    row, cost = rows
    assert row["kind"] == "sources" and row["task"] == "needle" and (row["policy"], row["length"]) == ("full", 1024)
    assert set(sources.COLUMNS) - {"task", "policy", "length", "skipped"} <= set(row) | {"chosen"}
    (rec,) = row["answers"]
    assert rec["correct"] and rec["rank"] == 1 and rec["tier"] == "device", rec
    assert row["correct"] == "1/1" and row["top1"] == row["top1_correct"] == 1.0 and row["right_right"] == 1
    assert row["right_wrong"] == row["wrong_right"] == row["wrong_wrong"] == 0
    assert cost["kind"] == "sources-cost" and cost["pairs"] == 1 and cost["same_answer"]
    assert cost["tok_s_on"] > 0 and cost["tok_s_off"] > 0 and cost["ratio"] > 0 and cost["sources_s"] > 0
    assert rt.sources and not rt.messages  # left as found: sources on, the conversation empty

    depth_rows = sources.depths(rt, candidates=(evidence.DEPTHS, (0.2,)), length=1024, trials=1, kinds=("needle",))
    assert [r["depths"] for r in depth_rows] == [",".join(map(str, evidence.DEPTHS)), "0.2"]
    shipped = depth_rows[0]
    assert shipped["correct"] == "1/1" and shipped["top1"] == 1.0 and shipped["median_rank"] == 1  # as run ranked


def test_summary_splits_the_four_ways():
    recs = [{"correct": c, "rank": r, "tier": "device", "sources_s": 0.1}
            for c, r in ((True, 1), (True, 2), (True, None), (False, 1), (False, 3), (False, None))]
    s = sources.summary(recs)
    assert (s["right_right"], s["right_wrong"], s["wrong_right"], s["wrong_wrong"]) == (1, 2, 1, 2)
    assert s["correct"] == "3/6"
    assert s["top1"] == pytest.approx(2 / 6, abs=1e-3) and s["top3"] == pytest.approx(4 / 6, abs=1e-3)
    assert s["top1_correct"] == pytest.approx(1 / 3, abs=1e-3) and s["top3_correct"] == pytest.approx(2 / 3, abs=1e-3)


def test_default_cells_and_given_ones():
    assert sources.cells(None, None) == list(sources.DEFAULT)
    assert sources.cells(["full", "locret"], [2048]) == [("full", 2048), ("locret", 2048)]
