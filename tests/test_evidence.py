"""Sources of an answer (app/runtime/evidence.py): passages located exactly, queries recorded
the same on every decode path, mass only where the cache held tokens, and on the embedded
model the fact's line as the top source."""
import functools

import pytest
import torch

from app.runtime import decode, evidence
from app.runtime.decode import Decoder
from app.runtime.engine import Runtime
from tests.tiny import tiny_pair


def _rt(spec="full", **kw):
    model, tok = tiny_pair()
    return Runtime(model, tok, policy=spec, model_id="tiny", **kw)


def _doc(tmp_path, n=60, fact_at=30, fact="The vault code is 48213.", name="doc.txt"):
    lines = [f"Line {i} tells of rivers, bread and the old tower." for i in range(n)]
    lines[fact_at] = fact
    path = tmp_path / name
    path.write_text("\n\n" + "\n".join(lines) + "\n")  # two blank lines first: line numbers count them
    return path, lines


def test_split_passages_lines_and_long_sentences():
    text = "one\n\ntwo two\n" + "A sentence here. " * 40
    spans = evidence.split_passages(text, max_chars=100)
    assert [text[a:b] for a, b in spans[:2]] == ["one", "two two"]
    rest = spans[2:]
    assert len(rest) > 3 and all(b - a <= 100 for a, b in rest)
    assert "".join(text[a:b] for a, b in rest) == text[text.index("A sentence"):]  # cut, never lost
    assert all(text[a:b].startswith("A sentence") for a, b in rest)  # cut at sentence ends


def test_passages_cover_their_text_with_exact_lines(tmp_path):
    rt = _rt()
    path, lines = _doc(tmp_path)
    rt.load_document(str(path))
    rt.ask("Where is the code?", max_new_tokens=4)
    found = rt._passages.of(rt.held, rt.messages)
    assert [p.text for p in found] == lines
    assert [p.line for p in found] == list(range(3, 3 + len(lines)))
    for p in found:
        got = rt.tok.decode(rt.held.ids[p.start:p.end])
        assert p.text in got and len(got) <= len(p.text) + 2, (p.text, got)


def test_pdf_pages_name_the_page(tmp_path, monkeypatch):
    from app.runtime import documents
    pages = [(0, 1), (40, 3)]  # page 2 had no text layer
    text = "First page line.\nStill the first page.\n\nThird page: the code is 77.\nEnd."
    monkeypatch.setattr(documents, "_read_pdf", lambda p, limit: (text, pages))
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4")
    rt = _rt()
    rt.load_document(str(path))
    assert rt.messages[-1]["pages"] == pages
    rt.ask("What is the code?", max_new_tokens=3)
    found = {p.text: p.page for p in rt._passages.of(rt.held, rt.messages)}
    assert found == {"First page line.": 1, "Still the first page.": 1, "Third page: the code is 77.": 3, "End.": 3}


def test_fixed_shape_windows_record_what_eager_records(tmp_path, monkeypatch):
    """The recorder sees the same queries, at the same positions, through fixed-shape windows
    (a CUDA graph replays that path) as eagerly: the same sources."""
    path, _ = _doc(tmp_path, n=20, fact_at=7)
    ref, rt = _rt(), _rt()
    for r in (ref, rt):
        r.load_document(str(path))
    recs = []
    real = evidence.Recorder

    def keep(layers):
        recs.append(real(layers))
        return recs[-1]
    monkeypatch.setattr(evidence, "Recorder", keep)
    a = ref.ask("Which line has the code?", max_new_tokens=9)
    monkeypatch.setattr(decode, "Decoder", functools.partial(Decoder, fixed=True, room=4))
    b = rt.ask("Which line has the code?", max_new_tokens=9)
    assert b.decode_mode == "fixed shapes" and a.answer == b.answer and a.new_tokens == 9
    for i in recs[0].layers:
        qa, pa = recs[0].queries(i)
        qb, pb = recs[1].queries(i)
        assert pa.tolist() == pb.tolist() == list(range(ref.cache.seen - 10, ref.cache.seen))  # the question's last, 9 steps
        assert torch.allclose(qa, qb, atol=1e-5)
    assert a.sources == b.sources and a.sources


def test_evicted_text_gets_no_mass_and_the_note_says_so(tmp_path):
    rt = _rt("streaming:sinks=4,window=64,chunk=32")
    path, lines = _doc(tmp_path, n=40, fact_at=5, fact="Zorblax keeps the vault code 48213.")
    rt.load_document(str(path))
    res = rt.ask("What does zorblax keep?", max_new_tokens=4)
    found = rt._passages.of(rt.held, rt.messages)
    where = evidence.tiers(rt.cache, rt.cache.seen)
    fact = next(p for p in found if "Zorblax" in p.text)
    assert bool((where[fact.start:fact.end] == evidence.EVICTED).all())
    assert all(s["line"] != fact.line for s in res.sources)
    assert res.sources and all(s["tier"] == "device" for s in res.sources)
    m = evidence.mass(rt.cache, _recorded(rt), rt.adapter.attn_scale)
    kept = evidence.tiers(rt.cache, rt.cache.seen) >= evidence.DEVICE
    assert float(m[~kept].sum()) == 0.0 and float(m[kept].sum()) > 0
    assert res.sources_note.startswith("the part of the document that answers this may have been evicted")
    assert "“zorblax”" in res.sources_note and f"doc.txt line {fact.line}" in res.sources_note


def _recorded(rt):
    """A recorder holding the last token's query at every evidence layer (as after a prefill)."""
    rec = evidence.Recorder(evidence.layers_for(rt.adapter.info.n_layers))
    from app.runtime.adapter import recording
    with recording(rec):
        rt.prefill(rt.tokens(" and?"))
    return rec


def test_recalled_passages_say_so(tmp_path):
    rt = _rt("streaming:sinks=4,window=64,chunk=32+offload:terms=on,rank=off,recall=64,quote=16")
    path, _ = _doc(tmp_path, n=40, fact_at=5, fact="Zorblax keeps the vault code 48213.")
    rt.load_document(str(path))
    res = rt.ask("What does Zorblax keep?", max_new_tokens=4)
    where = evidence.tiers(rt.cache, rt.cache.seen)
    fact = next(p for p in rt._passages.of(rt.held, rt.messages) if "Zorblax" in p.text)
    assert bool((where[fact.start:fact.end] == evidence.RECALLED).any())  # the question named it: recalled
    assert not res.sources_note
    tiers = {s["line"]: s["tier"] for s in res.sources}
    assert tiers.get(fact.line, "recalled") == "recalled"
    assert bool((where == evidence.HOST).any())


def test_sources_off_and_no_documents():
    rt = _rt()
    assert rt.ask("hello?", max_new_tokens=3).sources == []
    rt.sources = False
    res = rt.ask("again?", max_new_tokens=3)
    assert res.sources == [] and res.sources_s == 0.0


@pytest.mark.real_model
def test_the_fact_is_the_top_source_on_the_default_model(fresh_smol, tmp_path):
    path, lines = _doc(tmp_path, n=150, fact_at=97, fact="The secret code for the vault is 48213.")
    fresh_smol.load_document(str(path))
    res = fresh_smol.ask("What is the secret code for the vault?", max_new_tokens=16)
    assert res.sources[0]["line"] == 100 and res.sources[0]["text"] == lines[97]
    assert res.sources[0]["tier"] == "device" and 0 < res.sources[0]["weight"] <= 1
    assert res.to_json()["sources"] == res.sources


def test_a_long_user_message_is_a_document(tmp_path):
    """A client of `serve` sends its documents as user content: a long user message is read as one."""
    rt = _rt()
    _, lines = _doc(tmp_path, n=60)
    rt.set_conversation(None, [{"role": "user", "content": "\n".join(lines)}, {"role": "assistant", "content": "Read."}])
    res = rt.ask("Where is the code?", max_new_tokens=3)
    found = rt._passages.of(rt.held, rt.messages)
    assert [p.text for p in found] == lines and {p.document for p in found} == {"message 1"}
    assert [p.line for p in found] == list(range(1, 61))
    assert res.sources and {s["document"] for s in res.sources} == {"message 1"}
    short = _rt()
    short.set_conversation(None, [{"role": "user", "content": lines[0]}, {"role": "assistant", "content": "Ok."}])
    assert short.ask("And?", max_new_tokens=2).sources == []


def _offsets_calls(monkeypatch, tok) -> list:
    """Texts the tokenizer is asked for offsets of (what `located` computes a read's index from)."""
    calls, real = [], type(tok).__call__

    def counted(self, text, *a, **k):
        if k.get("return_offsets_mapping"):
            calls.append(text)
        return real(self, text, *a, **k)
    monkeypatch.setattr(type(tok), "__call__", counted)
    return calls


def test_a_document_is_tokenized_for_its_offsets_once_not_per_answer(tmp_path, monkeypatch):
    """The sources and the cache map locate the document through one read's offsets; a
    question and an answer appended to the record leave that read as it was, so later answers
    take its offsets from the last index (a 256K-token document took 0.8 s per call, four calls
    an answer)."""
    rt = _rt()
    path, lines = _doc(tmp_path)
    calls = _offsets_calls(monkeypatch, rt.tok)
    rt.load_document(str(path))
    for q in ("Where is the code?", "And the tower?", "What of the bread?"):
        rt.ask(q, max_new_tokens=4)
        assert [p.line for p in rt._passages.of(rt.held, rt.messages)] == list(range(3, 3 + len(lines)))
    doc_calls = [t for t in calls if lines[0] in t]
    assert len(doc_calls) == 1, [len(t) for t in calls]


def test_an_index_takes_no_offsets_for_a_read_whose_text_changed():
    from app.runtime import located
    from app.runtime.held import Held
    _, tok = tiny_pair()
    a, b = "alpha beta gamma. ", "delta epsilon. "
    ids_a, ids_b = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    first = Held(a + b, None, [(len(a), len(ids_a)), (len(a + b), len(ids_a + ids_b))], ids_a + ids_b)
    idx = located.TokenIndex(first, tok)
    assert idx.exact(len(a) + 6) == len(ids_a) + len(tok("delta ", add_special_tokens=False)["input_ids"])
    assert idx.starts(0) is not None and idx.starts(1) is not None
    c = "DELTA epsilon. "  # same length, other text (a record rendered otherwise)
    ids_c = tok(c, add_special_tokens=False)["input_ids"]
    other = Held(a + c, None, [(len(a), len(ids_a)), (len(a + c), len(ids_a + ids_c))], ids_a + ids_c)
    carried = located.TokenIndex(other, tok, prev=idx)
    assert carried._starts.get(0) is idx.starts(0) and 1 not in carried._starts  # the same read's taken, not the other
    assert carried.starts(1) == located.TokenIndex(other, tok).starts(1)
