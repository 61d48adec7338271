"""Part `hosttier` of `bench quality` (app/bench/hosttier.py): how its rows are counted and
compared; the tasks themselves are the kvbits, needles, copy and dense parts' own."""
from __future__ import annotations

import pytest

from app.bench import hosttier
from app.bench.quality import check_parts

FP, CODED = hosttier.DEFAULT


def test_compare_counts_each_coded_row_against_the_first_of_its_task():
    rows = hosttier.compare([
        {"task": "passkey", "policy": FP, "correct": 7, "of": 8, "per_trial": 1},
        {"task": "passkey", "policy": CODED, "correct": 6, "of": 8, "per_trial": 1},
        {"task": "passkey", "policy": CODED + "x", "correct": 5, "of": 8, "per_trial": 1},
        {"task": "dense", "policy": FP, "correct": 4, "of": 8, "per_trial": 2},
        {"task": "dense", "policy": CODED, "correct": 2, "of": 8, "per_trial": 2},
        {"task": "dense", "policy": "x", "skipped": "why"},
        {"task": "copy", "policy": FP, "correct": 800, "of": 900, "per_trial": 300},
        {"task": "copy", "policy": CODED, "correct": 810, "of": 900, "per_trial": 300},
    ])
    by = {(r["task"], r["policy"]): r for r in rows}
    assert "delta" not in by["passkey", FP] and by["passkey", FP]["accuracy"] == 0.875
    assert (by["passkey", CODED]["delta"], by["passkey", CODED]["within"]) == (-1, True)
    assert (by["passkey", CODED + "x"]["delta"], by["passkey", CODED + "x"]["within"]) == (-2, False)
    assert (by["dense", CODED]["delta"], by["dense", CODED]["within"]) == (-2, True)  # one trial: two questions
    assert "accuracy" not in by["dense", "x"]
    assert (by["copy", CODED]["delta"], by["copy", CODED]["within"]) == (10, True)


def test_run_gathers_each_task_from_its_part(monkeypatch):
    calls = []

    def kv(rt, specs, lengths, trials, **k):
        calls.append(("kvbits", tuple(specs), tuple(lengths), trials))
        return [{"policy": s, "kl_nats": 0.1 * i, "bytes_per_token": 100 - i, "answers": {},
                 **{f"passkey_{n}": f"{trials - i}/{trials}" for n in lengths}} for i, s in enumerate(specs)]

    def needles(rt, doc_tokens, specs):
        return [{"spec": specs[0], "answer": "a", "correct": j < (3 if specs[0] == FP else 2)} for j in range(3)]

    def copy(rt, spec, doc_tokens, depth):
        return {"correct": 290 if spec == FP else 280, "tokens": 300, "accuracy": 0.9}

    def dense(rt, policies, lengths, trials, kinds):
        assert kinds == ("multikey",) and lengths == (12288,)
        return [{"policy": s, "trials": trials, "correct": f"{5 - i}/{2 * trials}", "answers": []}
                for i, s in enumerate(policies)]

    monkeypatch.setattr(hosttier.kvbits, "run", kv)
    monkeypatch.setattr(hosttier.recall, "needles", needles)
    monkeypatch.setattr(hosttier.recall, "copy_fidelity", copy)
    monkeypatch.setattr(hosttier.dense, "run", dense)
    rows = hosttier.run(None, trials=4)
    assert calls == [("kvbits", (FP, CODED), (12288, 16384), 4)]
    assert not any("skipped" in r for r in rows)
    got = {(r["task"], r["policy"]): (r["correct"], r["of"], r.get("delta"), r.get("within")) for r in rows}
    assert got == {("passkey", FP): (8, 8, None, None), ("passkey", CODED): (6, 8, -2, False),
                   ("needles", FP): (3, 3, None, None), ("needles", CODED): (2, 3, -1, True),
                   ("copy", FP): (870, 900, None, None), ("copy", CODED): (840, 900, -30, True),
                   ("dense", FP): (5, 8, None, None), ("dense", CODED): (4, 8, -1, True)}


def test_hosttier_takes_whole_specs_and_runs_only_when_named():
    from app.bench.quality import PARTS
    assert "hosttier" not in PARTS
    check_parts(("hosttier",), [FP, CODED])
    with pytest.raises(ValueError, match="whole specs go to parts kvbits, dense and hosttier"):
        check_parts(("hosttier", "passkey"), [FP])


def test_a_task_a_spec_cannot_run_is_skipped_not_counted_wrong(monkeypatch):
    def kv(rt, specs, lengths, trials, **k):
        return [{"policy": "full", "kl_nats": 0.0, "bytes_per_token": 1, "answers": {},
                 "passkey_12288": "not run: keeps every position past the 8,192-token window",
                 "passkey_16384": "not run: keeps every position past the 8,192-token window"},
                {"policy": CODED, "kl_nats": 0.1, "bytes_per_token": 1, "answers": {},
                 "passkey_12288": "3/4", "passkey_16384": "not run: why"}]
    monkeypatch.setattr(hosttier.kvbits, "run", kv)
    monkeypatch.setattr(hosttier.recall, "needles", lambda rt, doc_tokens, specs: [{"spec": specs[0], "skipped": "no"}])
    monkeypatch.setattr(hosttier.recall, "copy_fidelity", lambda rt, spec, doc_tokens, depth: {"correct": 1, "tokens": 2, "accuracy": 0.5})
    monkeypatch.setattr(hosttier.dense, "run", lambda rt, policies, **k: [])
    rows = hosttier.run(None, specs=["full", CODED], trials=4)
    pk = [r for r in rows if r["task"] == "passkey"]
    assert "correct" not in pk[0] and "window" in pk[0]["skipped"]
    assert (pk[1]["correct"], pk[1]["of"], pk[1]["skipped"]) == (3, 4, "not run: why")
    assert [r.get("skipped") for r in rows if r["task"] == "needles"] == ["no", "no"]
