"""A saved conversation's Markdown (`store.to_markdown`) lists each answer's sources under
it, best first, with where each stands in its document and its tier, and the evicted note."""
from __future__ import annotations

from app.ui.store import to_markdown


def test_the_markdown_lists_an_answers_sources_and_note():
    sources = [{"document": "notes.pdf", "page": 2, "line": 41, "text": "The pass key is 60494.\n", "weight": 0.62,
                "tier": "kept"},
               {"document": "notes.pdf", "page": None, "line": 7, "text": "x" * 200, "weight": 0.21, "tier": "recalled"}]
    data = {"model": "m", "policy": "auto", "messages": [
        {"role": "document", "name": "notes.pdf", "tokens": 900, "content": "..."},
        {"role": "user", "content": "What is the pass key?"},
        {"role": "assistant", "content": "60494", "stats": {"new_tokens": 3, "policy": "locret", "sources": sources,
                                                            "sources_note": "the part … may have been evicted"}},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome.", "stats": {"new_tokens": 4, "sources": []}}]}
    md = to_markdown(data)
    first = md.index("60494\n")
    block = md[first:md.index("## You", first)]
    assert "Sources:\n\n- 62% · notes.pdf, page 2, line 41 · kept — “The pass key is 60494.”\n" in block
    assert "- 21% · notes.pdf, line 7 · recalled — “" + "x" * 119 + "…”\n" in block
    assert "- _the part … may have been evicted_\n" in block
    assert block.index("62%") < block.index("21%") < block.index("may have been evicted")
    assert md.count("Sources:") == 1  # an answer with none gets no heading
