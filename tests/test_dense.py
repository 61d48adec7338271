"""Part `dense` of `bench quality`: the document builder, the scorer, the source split, and
the rows of one run on the tiny model."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tok():
    from tiny import tiny_tokenizer
    return tiny_tokenizer()


def _text():
    from app.bench.dense import HAYSTACK
    return HAYSTACK.read_text()


def _digits(text: str, v: str) -> int:
    return len(re.findall(rf"(?<!\d){v}(?!\d)", text))


@pytest.mark.parametrize("kind", ["multikey", "multivalue", "after-turn"])
def test_facts_placed_at_their_depths_once_each(kind):
    from app.bench.dense import MV_VALUES, build
    tok = _tok()
    doc = build(tok, _text(), 8000, kind, seed=3)
    n = {"multikey": 6, "multivalue": MV_VALUES, "after-turn": 1}[kind]
    assert len(doc.facts) == n
    total = len(tok(doc.text)["input_ids"])
    for f in doc.facts:
        assert doc.text[f.at:f.at + len(f.statement)] == f.statement
        assert doc.text.count(f.statement) == 1 and _digits(doc.text, f.value) == 1
        assert f.at == 0 or doc.text[f.at - 1] == "\n"  # a line of its own
        assert doc.text[f.at + len(f.statement)] == "\n"
        assert abs(len(tok(doc.text[:f.at])["input_ids"]) / total - f.depth) < 0.02
    assert [f.at for f in doc.facts] == sorted(f.at for f in doc.facts)
    names = {f.name for f in doc.facts}
    for name in names:  # invented: in the document only where a fact states it
        assert len(re.findall(rf"\b{name}\b", doc.text)) == sum(f.name == name for f in doc.facts)
    assert len(names) == (n if kind == "multikey" else 1)
    values = [f.value for f in doc.facts]
    assert len(set(values)) == n and all(re.fullmatch(r"[1-9]\d{4}", v) for v in values)
    if kind == "multikey":
        assert [round(f.depth, 6) for f in doc.facts] == [round(0.1 + 0.16 * i, 6) for i in range(6)]


@pytest.mark.parametrize("n", [3072, 12288])
def test_length_within_tolerance_and_windows_differ(n):
    from app.bench.dense import build
    tok, text = _tok(), _text()
    docs = [build(tok, text, n, "multikey", seed=s) for s in range(8)]
    for d in docs:
        assert abs(len(tok(d.text)["input_ids"]) - n) <= max(8, n // 200)
        assert text[d.start:d.start + 40].split(" (")[0] == d.text.split(" (")[0]  # begins at an entry
    assert len({d.start for d in docs}) >= 6  # distinct windows across trials


@pytest.mark.parametrize("n_facts", [2, 3, 5, 6, 8])
def test_multikey_asks_two_in_turn_and_every_fact_over_trials(n_facts):
    from app.bench.dense import build
    tok, text = _tok(), _text()
    asked: set[int] = set()
    for seed in range((n_facts + 1) // 2):
        doc = build(tok, text, 3000, "multikey", seed=seed, n_facts=n_facts)
        assert len(doc.turns) == 2 and all(t.scored for t in doc.turns)
        values = [f.value for f in doc.facts]
        for t in doc.turns:
            i = values.index(t.want[0])
            assert doc.facts[i].name in t.question and t.want == (values[i],)
            assert sorted(t.wrong) == sorted(values[:i] + values[i + 1:])
            asked.add(i)
        assert doc.turns[0].want != doc.turns[1].want
    assert asked == set(range(n_facts))


def test_multivalue_and_after_turn_questions():
    from app.bench.dense import MV_VALUES, build
    tok, text = _tok(), _text()
    mv = build(tok, text, 3000, "multivalue", seed=1)
    (turn,) = mv.turns
    assert sorted(turn.want) == sorted(f.value for f in mv.facts) and len(turn.want) == MV_VALUES
    assert mv.facts[0].name in turn.question and not turn.wrong
    at = build(tok, text, 3000, "after-turn", seed=2)
    first, second = at.turns
    assert not first.scored and second.scored
    assert at.text.startswith(first.want[0] + " (")  # the package the document begins with
    assert at.facts[0].name not in first.question and at.facts[0].value not in first.question
    assert at.facts[0].name in second.question and second.want == (at.facts[0].value,)
    assert at.facts[0].depth == 0.5  # ONE_DEPTHS[2 % 5]


def test_deterministic_for_a_seed():
    from app.bench.dense import build
    tok, text = _tok(), _text()
    for kind in ("multikey", "multivalue", "after-turn"):
        assert build(tok, text, 3000, kind, 5) == build(tok, text, 3000, kind, 5)
        a, b = build(tok, text, 3000, kind, 5), build(tok, text, 3000, kind, 6)
        assert (a.start, a.facts) != (b.start, b.facts)


def test_refuses_what_it_cannot_build():
    from app.bench.dense import build
    tok, text = _tok(), _text()
    with pytest.raises(ValueError, match="cannot hold 6 facts"):
        build(tok, text, 200, "multikey", 0)
    with pytest.raises(ValueError, match="cannot hold"):
        build(tok, text, 10 ** 7, "multikey", 0)
    with pytest.raises(ValueError, match="unknown kind"):
        build(tok, text, 3000, "multi-key", 0)
    with pytest.raises(ValueError, match="at least 2"):
        build(tok, text, 3000, "multikey", 0, n_facts=1)


def test_score_wants_exact_digits():
    from app.bench.dense import Turn, score
    t = Turn("?", ("48213",), ("51907", "10482"))
    assert score("48213", t) and score("The build number of Velgard is 48213.", t) and score("48,213", t)
    assert not score("4821", t) and not score("482130", t) and not score("148213", t)
    assert not score("4 8 2 1 3", t) and not score("", t)
    assert not score("51907", t) and not score("48213 or 51907", t)  # another fact's number
    mv = Turn("?", ("11111", "22222", "33333"))
    assert score("11111, 22222, 33333", mv) and score("33333,22222,11111", mv)
    assert not score("11111, 22222", mv)
    first = Turn("?", ("glibc",), scored=False)
    assert score("Glibc.", first) and not score("glibcx", first) and not score("libc6", first)


def _shingles(text: str, k: int = 200) -> set[int]:
    return {hash(text[i:i + k]) for i in range(len(text) - k + 1)}


def test_source_split_no_window_shared_with_training_or_passkey_text():
    dense = _text()
    assert len(dense) > 400_000
    seen: set[int] = set()
    for f in ("train/python_topics.txt", "train/PSF-LICENSE.txt", "haystack/licenses.txt"):
        seen |= _shingles((ROOT / "data" / f).read_text())
    k = 200
    shared = [i for i in range(0, len(dense) - k + 1) if hash(dense[i:i + k]) in seen]
    assert not shared, f"data/dense/changelogs.txt shares text with training data at {shared[:3]}"
    sources = (ROOT / "data" / "dense" / "SOURCES.md").read_text()
    assert "python" not in sources.split("## The split")[0].lower()  # no Python package among the sources


def test_fact_wording_in_no_training_template():
    from app.bench.dense import SHAPES
    train = (ROOT / "app" / "heads" / "data.py").read_text().lower()
    for noun, plural in SHAPES:
        assert noun not in train and plural not in train


def test_run_rows_on_tiny_model(tmp_path):
    import torch
    from app.bench import dense
    from app.runtime.engine import Runtime
    from tiny import tiny_pair, tiny_policy_files
    torch.set_num_threads(1)
    f = tiny_policy_files(tmp_path, max_position_embeddings=1024)
    m, t = tiny_pair(0, max_position_embeddings=1024)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=128)
    loc = f"locret:budget=96,chunk=128,stabilizers=8,local=0,heads={f['heads']}"
    seen = []
    rows = dense.run(rt, policies=("full", loc, "locret"), lengths=(400, 1200), trials=2, progress=seen.append)
    assert seen == rows and len(rows) == 3 * 2 * 3
    for r in rows:
        assert r["kind"] == "dense" and r["task"] in dense.KINDS and r["length"] in (400, 1200)
    by = {(r["task"], r["policy"], r["length"]): r for r in rows}
    assert "1,024-token window" in by[("multikey", "full", 1200)]["skipped"]
    assert "locret" in by[("multikey", "locret", 400)]["skipped"]  # no heads for the tiny model: why
    for task, asked in (("multikey", 4), ("multivalue", 2), ("after-turn", 2)):
        for key in ((task, "full", 400), (task, loc, 400), (task, loc, 1200)):
            r = by[key]
            c, n = map(int, r["correct"].split("/"))
            assert n == asked and 0 <= c <= n and r["trials"] == 2 and "skipped" not in r
            assert len(r["answers"]) == 2 and all(isinstance(a["got"], str) for tr in r["answers"] for a in tr)
            assert ("turn1" in r) == (task == "after-turn")
    # the same documents for every policy of a cell
    assert [a["q"] for tr in by[("multikey", "full", 400)]["answers"] for a in tr] == \
           [a["q"] for tr in by[("multikey", loc, 400)]["answers"] for a in tr]
    assert rt.messages == [] and rt.policy == loc  # each trial ends on an empty conversation


def test_quality_wires_dense(capsys):
    from app.bench import quality
    assert "dense" not in quality.PARTS  # hours on a CPU: only when named
    quality.check_parts(("dense",), ["snapkv:budget=2048,window=64", "locret+kivi:kbits=4,vbits=2"])
    with pytest.raises(ValueError, match="unknown part"):
        quality.check_parts(("denser",))
    from policies import parse_spec
    for spec in quality.dense.DEFAULT:
        parse_spec(spec)
    import torch
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    torch.set_num_threads(1)
    m, t = tiny_pair(0, max_position_embeddings=1024)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=128)
    rows = quality.run(rt, trials=1, lengths=[400], policies=["full"], parts=("dense",))
    assert [(r["task"], r["correct"]) for r in rows if "correct" in r] and len(rows) == 3
    assert "\ndense\n| task | policy | length | trials | correct | turn1 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--trials 0"):
        quality.run(rt, trials=0, parts=("dense",))
