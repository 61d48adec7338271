"""An answer's sources in the transcript: the passages its tokens attended to most
(`TurnResult.sources`, app/runtime/evidence.py), folded under the answer, with the note
when what answers the question may have been evicted. Enter or a click on a source opens
it in its document (`screens.SourceViewer`).
"""
from __future__ import annotations

from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Collapsible, OptionList, Static
from textual.widgets.option_list import Option

AROUND = 8  # lines shown before and after a source's line in the viewer


def where(source: dict) -> str:
    """"notes.pdf, page 2, line 41"."""
    page = source.get("page")
    return f"{source.get('document', '?')}, " + (f"page {page}, " if page else "") + f"line {source.get('line', '?')}"


def shorten(text: str, width: int = 64) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def row(source: dict) -> Content:
    """One source as the list shows it: weight, place, tier, the passage shortened."""
    return Content.assemble((f"{source.get('weight', 0.0):>4.0%}", "bold"), f"  {where(source)} · ",
                            (str(source.get("tier", "?")), "italic"), f"  “{shorten(source.get('text', ''))}”")


def document_text(messages: list, source: dict) -> str | None:
    """The text of the document the source names (of those with its name, the one whose
    line `line` holds the passage), or None when the conversation no longer has it."""
    docs = [str(m.get("content", "")) for m in messages
            if m.get("role") == "document" and m.get("name") == source.get("document")]
    line, text = int(source.get("line") or 0), str(source.get("text", ""))
    for content in docs:
        lines = content.split("\n")
        if 0 < line <= len(lines) and text[:40] in lines[line - 1]:
            return content
    return docs[0] if docs else None


def excerpt(content: str | None, source: dict, around: int = AROUND) -> list[tuple[int, str, bool]]:
    """[(line number, text, is the source's)] for the source's line and `around` lines either
    side; without the document, the passage alone (numbered with its line)."""
    line, text = int(source.get("line") or 0), str(source.get("text", ""))
    lines = content.split("\n") if content is not None else []
    if not 0 < line <= len(lines):
        return [(line, text, True)]
    # NOTE: evidence.py's passages lie within one line; one that spans more still shows whole
    span = max(1, text.count("\n") + 1)
    a, b = max(1, line - around), min(len(lines), line + span - 1 + around)
    return [(n, lines[n - 1], line <= n < line + span) for n in range(a, b + 1)]


class SourcesBox(Vertical):
    """The sources under one answer: the note (a warning line) when there is one, and the
    sources folded in a Collapsible, best first. Empty (and taking no room) without either."""

    DEFAULT_CSS = """
    SourcesBox { height: auto; }
    SourcesBox .sources-note { height: auto; color: $warning; }
    SourcesBox Collapsible { padding: 0; border-top: none; background: transparent; }
    SourcesBox Collapsible Contents { padding: 0 0 0 2; }
    SourcesBox OptionList { height: auto; max-height: 8; border: none; padding: 0; }
    """

    def __init__(self, sources: list | None = None, note: str = "") -> None:
        super().__init__(classes="sources")
        self.sources, self.note = list(sources or []), note or ""

    def compose(self):
        if self.note:
            yield Static(f"⚠ {self.note}", markup=False, classes="sources-note")
        if self.sources:
            rows = [Option(row(s), id=str(i)) for i, s in enumerate(self.sources)]
            yield Collapsible(OptionList(*rows, classes="sources-list"), title=f"Sources ({len(self.sources)})",
                              collapsed=True)

    async def show(self, sources: list | None, note: str = "") -> None:
        self.sources, self.note = list(sources or []), note or ""
        await self.recompose()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.open(self.sources[int(event.option.id)])

    def open(self, source: dict) -> None:
        """The viewer of `source` in its document. NOTE: the document's text is read from the
        runtime's messages on the UI thread: a document message is appended whole and never
        changed after, so reading the list is safe while the model thread works (during a model
        switch there is no runtime: the passage shows alone)."""
        from app.ui.screens import SourceViewer
        rt = self.app.runtime
        content = document_text(list(rt.messages), source) if rt is not None else None
        missing = "" if content is not None else \
            "The document's text is not in this conversation now; the passage alone:"
        self.app.push_screen(SourceViewer(where(source), excerpt(content, source), source, missing))
