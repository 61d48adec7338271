"""train-heads documents: distractors are inserted, asked about by no question, and leave
the facts, the questions and the question/answer tail as they were."""
from __future__ import annotations

import random
import re

import pytest

from app.heads.data import _THINGS, build_document, load_text, make_example
from tiny import tiny_tokenizer


@pytest.mark.parametrize("seed", [0, 7, 31])
def test_distractors_are_inserted_and_never_asked(seed):
    text, _ = load_text(())
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
    text, _ = load_text(())
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
