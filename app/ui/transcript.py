"""The transcript: user turns, streamed Markdown answers with stats and sources, document cards, notes."""
from __future__ import annotations

import re

from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Collapsible, Markdown, Static

from app.ui.sources import SourcesBox
from app.ui.store import stats_line

_FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1\s*$", re.M | re.S)


def last_code_block(text: str) -> str | None:
    blocks = _FENCE.findall(text)
    return blocks[-1][1] if blocks else None


class UserTurn(Static):
    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="turn user")
        self.border_title = "You"


class Note(Static):
    """A line the app writes into the transcript: policy changes, model loads, system prompt."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(text, markup=False, classes=f"note {kind}")


class DocumentCard(Collapsible):
    def __init__(self, name: str, tokens: int, detail: str) -> None:
        super().__init__(Static(detail, markup=False, classes="doc-detail"),
                         title=Content(f"Document: {name} · {tokens:,} tokens"), collapsed=True,  # not markup
                         classes="document")
        self.doc_name = name
        self.tokens = tokens


class Answer(Vertical):
    """An assistant answer: Markdown that streams in batches, then re-renders once at the end;
    under it its stats and its sources (folded; from the stats, a TurnResult as a dict)."""

    def __init__(self, text: str = "", stats: dict | None = None) -> None:
        super().__init__(classes="turn assistant")
        self.border_title = "Assistant"
        self.text = text
        self._initial_stats = stats
        self._stream = None

    def compose(self):
        yield Markdown(self.text)
        stats = self._initial_stats or {}
        yield Static(stats_line(stats) if stats else "generating…", markup=False, classes="stats")
        yield SourcesBox(stats.get("sources"), stats.get("sources_note", ""))

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    async def write(self, piece: str) -> None:
        if not piece:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        self.text += piece
        await self._stream.write(piece)

    async def finish(self, text: str | None, stats: dict | None, note: str = "") -> None:
        """Stop streaming and re-render the whole answer (fixes a half-open code fence)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if text is not None:
            self.text = text
        await self.markdown.update(self.text)
        line = stats_line(stats) if stats else ""
        self.query_one(".stats", Static).update(" · ".join(p for p in (line, note) if p))
        stats = stats or {}
        await self.query_one(SourcesBox).show(stats.get("sources"), stats.get("sources_note", ""))


class Transcript(VerticalScroll):
    """Scrolls to the end as content arrives, unless the user scrolled up to read."""

    def follow(self) -> None:
        if self.max_scroll_y - self.scroll_y <= 3:
            self.scroll_end(animate=False)

    async def add(self, widget) -> None:
        at_end = self.max_scroll_y - self.scroll_y <= 3
        await self.mount(widget)
        if at_end:
            self.scroll_end(animate=False)

    def answers(self) -> list[Answer]:
        return list(self.query(Answer))

    async def rebuild(self, system: str | None, messages: list[dict]) -> None:
        """Show a conversation the runtime already holds (after /open or /model)."""
        await self.remove_children()
        widgets = []
        if system:
            widgets.append(Note(f"System prompt: {system}", "system"))
        for m in messages:
            role = m.get("role")
            if role == "user":
                widgets.append(UserTurn(str(m.get("content", ""))))
            elif role == "assistant":
                stats = dict(m.get("stats") or {})
                if m.get("partial"):
                    stats["stopped"] = True
                widgets.append(Answer(str(m.get("content", "")), stats or None))
            elif role == "document":
                widgets.append(DocumentCard(m.get("name", "?"), int(m.get("tokens", 0)),
                                            document_detail(m.get("path", ""), str(m.get("content", "")))))
        if widgets:
            await self.mount_all(widgets)
        self.scroll_end(animate=False)


def document_detail(path: str, content: str, chars: int | None = None, prefill_s: float | None = None,
                    preview_lines: int = 12) -> str:
    head = []
    if path:
        head.append(f"path: {path}")
    n = chars if chars is not None else len(content)
    head.append(f"{n:,} characters" + (f" · read in {prefill_s:.1f} s" if prefill_s else ""))
    if content:
        lines = content.splitlines()
        preview = "\n".join(lines[:preview_lines])
        more = f"\n… ({len(lines) - preview_lines:,} more lines)" if len(lines) > preview_lines else ""
        head.append("")
        head.append(preview + more)
    return "\n".join(head)


def policy_line(spec: str, r) -> str:
    """The line for a policy switch to `spec` as asked (`auto` marks what it chose); r: a ConversionResult."""
    from app.runtime.auto import AUTO
    from app.ui.panels import fmt_bytes
    how = "re-read the conversation" if r.reprefilled else "converted in place"
    lossy = ", lossy" if r.lossy else ""
    new = f"{AUTO}: {r.new_policy}" if spec == AUTO else r.new_policy
    return (f"Policy {r.old_policy} → {new}: KV {fmt_bytes(r.before_bytes)} → {fmt_bytes(r.after_bytes)} "
            f"({r.message or how}{lossy})")


def loaded_line(loaded) -> str:
    """The line once a model is up; loaded: a jobs.Loaded."""
    rt = loaded.runtime
    return (f"Loaded {rt.model_id} on {rt.device} ({rt.weights}, window {rt.window:,} tokens), policy "
            f"{loaded.policy}. Ask a question, /load a document (Ctrl+O), F1 for help.")
