"""train-heads documents: distractors are inserted, asked about by no question, and leave
the facts, the questions and the question/answer tail as they were."""
from __future__ import annotations

import random
import re

import pytest

from app.heads.data import _THINGS, build_document, load_texts, make_example
from tiny import tiny_tokenizer


@pytest.mark.parametrize("seed", [0, 7, 31])
def test_distractors_are_inserted_and_never_asked(seed):
    text = load_texts(())[0][0]
    n = 5
    base, qa0 = build_document(random.Random(seed), text, 2400, 4)
    doc, qa = build_document(random.Random(seed), text, 2400, 4, n_distractors=n)
    assert qa == qa0, "the facts, their questions and their order do not depend on the distractors"
    paras0, paras = base.split("\n\n"), doc.split("\n\n")
    extra = list(paras)
    for p in paras0:  # the document without distractors is the one with them, minus n paragraphs, in order
        extra.remove(p)
    assert len(paras) == len(paras0) + n and len(extra) == n
    it = iter(paras)
    assert all(p in it for p in paras0), "text and facts keep their order"
    for d in extra:
        assert re.search(r"\d", d), f"distractor {d!r} is not fact-shaped"
        assert not any(e in d.lower() for e in _THINGS), f"distractor {d!r} names an entity a question asks about"


def test_distractors_leave_the_question_answer_tail_unchanged():
    tok = tiny_tokenizer()
    text = load_texts(())[0][0]
    ids0, n0 = make_example(tok, random.Random(3), text, 300)
    ids, n = make_example(tok, random.Random(3), text, 300, n_distractors=4)
    assert n > n0, "distractors lengthen the context"
    assert ids[n:].tolist() == ids0[n0:].tolist(), "every question and answer stays as it was"
    assert tok.decode(ids0[n0:]).count("<|im_start|>user") == tok.decode(ids[n:]).count("<|im_start|>user")


def test_features_of_other_documents_are_not_reused(tmp_path):
    from app.runtime.engine import Runtime
    from app.runtime.types import VramchatError
    from app.heads.train import train_heads
    from tiny import tiny_pair
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=16)
    kw = dict(steps=2, docs=1, val_docs=1, doc_tokens=120, d_r=8, warmup=1)
    card = train_heads(rt, tmp_path, distractors=2, **kw)
    assert card["hyper_parameters"]["distractors"] == 2 and "2 fact-shaped" in card["data"]["distractors"]
    with pytest.raises(VramchatError, match="distractors.: 2.*distractors.: 0.*another --out"):
        train_heads(rt, tmp_path, distractors=0, **kw)
    train_heads(rt, tmp_path, distractors=2, **kw)  # the same documents resume


@pytest.mark.parametrize("seed", [1, 5, 9])
def test_same_shape_documents_hold_similar_facts_each_asked(seed):
    """A same-shape document: every fact one family, distinct entities and values, every one
    asked; without it the documents of a run are what they were (no extra draws)."""
    from app.heads.data import _FACTS
    text = load_texts(())[0][0]
    doc, qa = build_document(random.Random(seed), text, 2400, 5, same_shape=True)
    families = {q.replace(e, "{e}") for q, _ in qa for e in _THINGS if e in q}
    assert len(families) == 1 and families <= {f[2] for f in _FACTS}
    entities = [next(e for e in _THINGS if e in q) for q, _ in qa]
    assert len(set(entities)) == 5
    values = {a.replace(e, "") for (_, a), e in zip(qa, entities)}
    assert len(values) == 5, "each entity's value differs"
    for (q, a), e in zip(qa, entities):
        assert e in doc.lower() or e[0].upper() + e[1:] in doc
    tok = tiny_tokenizer()
    a = make_example(tok, random.Random(seed), text, 300)
    b = make_example(tok, random.Random(seed), text, 300, same_shape=0.0)
    assert a[0].tolist() == b[0].tolist()


def test_data_files_named_as_a_user_types_them(tmp_path, monkeypatch):
    from app.heads.data import ROOT
    monkeypatch.chdir(ROOT)  # relative to the checkout: named from it
    assert load_texts(["data/train/code.txt"])[1][0]["file"] == "data/train/code.txt"
    mine = tmp_path / "mine.txt"
    mine.write_text("A line of my own text. " * 200)
    monkeypatch.chdir(tmp_path)  # relative elsewhere: the full path
    assert load_texts(["mine.txt"])[1][0]["file"] == str(mine.resolve())


def test_genres_each_document_from_one_text_and_held_out_from_each_tail():
    from app.heads.data import GENRES
    from app.heads.train import _documents
    texts, prov = load_texts(GENRES)
    assert len(texts) == 4 and all(p["chars"] > 30000 for p in prov)
    assert [p["file"] for p in prov] == [f"data/train/{f}" for f in
                                         ("python_topics.txt", "code.txt", "changelogs.txt", "tables.txt")]
    tok = tiny_tokenizer()
    docs = _documents(tok, texts, 12, 10, 200, 0, 0, None, None)
    bodies = [tok.decode(ids[:n]) for ids, n in docs]
    found = set()
    for j, body in enumerate(bodies):
        lines = [ln for ln in body.splitlines()[1:-1] if len(ln) > 30]  # (the first may start mid-line)
        homes = {i for ln in lines for i, t in enumerate(texts) if ln in t}  # (inserted facts are in none)
        assert len(homes) == 1, f"document {j} comes from one text"
        found |= homes
        t = texts[homes.pop()]
        tail = t[int(len(t) * 0.9):]
        inside = [ln in tail for ln in lines if ln in t]
        assert all(inside) if j >= 10 else not any(inside[1:-1]), f"document {j}: held out iff from the tail"
    assert len(found) >= 3, "documents come from several genres"
    one = _documents(tok, texts[:1], 3, 2, 200, 0, 0, None, None)
    text0 = load_texts(())[0][0]
    from app.heads.data import make_example as mk
    want = mk(tok, random.Random(0 * 100003 + 0), text0[:int(len(text0) * 0.9)], 200, 0)
    assert one[0][0].tolist() == want[0].tolist(), "one text: the documents of a one-file run"
