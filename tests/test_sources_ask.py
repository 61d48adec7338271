"""On the embedded default model under `full`: `ask --json` names the fact's line as the top
source of its answer, and a PDF's source names the page the fact is on."""
import json

import pytest

from app.cli import main

FACT = "The secret code for the vault is 48213."
QUESTION = "What is the secret code for the vault?"


def _filler(n: int, prefix: str = "Line") -> list[str]:
    return [f"{prefix} {i} tells of rivers, bread and the old tower." for i in range(1, n + 1)]


def _pdf(path, pages: list[list[str]]) -> None:
    """A PDF with one text page per entry of `pages` (its lines, top to bottom)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
    w = PdfWriter()
    font = w._add_object(DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                                           NameObject("/Subtype"): NameObject("/Type1"),
                                           NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for lines in pages:
        page = w.add_blank_page(420, 600)
        fonts = DictionaryObject({NameObject("/F1"): font})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
        stream = DecodedStreamObject()
        text = " T* ".join(f"({line}) Tj" for line in lines)
        stream.set_data(f"BT /F1 10 Tf 12 TL 20 580 Td {text} ET".encode())
        page[NameObject("/Contents")] = w._add_object(stream)
    with open(path, "wb") as fh:
        w.write(fh)


@pytest.mark.real_model
def test_ask_json_names_the_facts_line_first(tmp_path, monkeypatch, capsys):
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("VRAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    lines = _filler(200)
    lines[136] = FACT
    doc = tmp_path / "vault.txt"
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["ask", "--device", "cpu", "--policy", "full", "--max-new-tokens", "16", "--json",
                 "--doc", str(doc), QUESTION]) == 0
    answer = json.loads(capsys.readouterr().out)["answers"][0]
    top = answer["sources"][0]
    assert top == {"document": "vault.txt", "page": None, "line": 137, "text": FACT, "weight": top["weight"],
                   "tier": "device"}
    assert 0 < top["weight"] <= 1 and len(answer["sources"]) <= 3 and answer["sources_note"] == ""
    assert all(lines[s["line"] - 1] == s["text"] for s in answer["sources"])


@pytest.mark.real_model
def test_a_pdf_source_names_its_page(fresh_smol, tmp_path):
    pages = [_filler(30, f"Page {p} line") for p in (1, 2, 3)]
    pages[1][11] = FACT
    path = tmp_path / "report.pdf"
    _pdf(path, pages)
    fresh_smol.load_document(str(path))
    assert [p for _, p in fresh_smol.messages[-1]["pages"]] == [1, 2, 3]
    res = fresh_smol.ask(QUESTION, max_new_tokens=16)
    top = res.sources[0]
    assert top["document"] == "report.pdf" and top["page"] == 2 and top["text"] == FACT
    doc = next(m for m in fresh_smol.messages if m["role"] == "document")
    assert doc["content"].split("\n")[top["line"] - 1] == FACT
    assert all(s["page"] == int(s["text"].split()[1]) for s in res.sources[1:] if s["text"].startswith("Page "))
