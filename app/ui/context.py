"""The Context panel: how full the model's window is, and the cache map (one strip per
document and one for the chat; app/ui/cache_map.py lays it out)."""
from __future__ import annotations

import time

from rich.text import Text
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import Static

from app.runtime.types import ContextInfo
from app.ui import cache_map as strip_map
from app.ui.panels import published

def context_level(info: ContextInfo) -> str:
    """Colour of the context meter: how full the model's native window is."""
    used = max(info.retained, 0) / max(info.window, 1)
    return "red" if used >= 0.9 else "yellow" if used >= 0.7 else "green"


class ContextMeter(Static, can_focus=True):
    """How full the window is, and the cache map: one strip per document and one for the chat,
    each cell where its tokens sit (click a cell, or move with the arrows, for its text)."""

    info: reactive[ContextInfo | None] = reactive(None, layout=True)
    BINDINGS = [Binding("left", "move(0, -1)", show=False), Binding("right", "move(0, 1)", show=False),
                Binding("up", "move(-1, 0)", show=False), Binding("down", "move(1, 0)", show=False)]
    DRAW_S = 0.25  # a map that changes mid-read is drawn at most this often

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cache_map = None  # the CacheMap drawn (runtime/cache_map.py)
        self.selected: tuple | None = None  # (row, cell) of the strip
        self._drawn = 0.0
        self._rows: list = []  # [(row, cells)] as last laid out
        self._laid: tuple = ()  # (map, width) they were laid out for
        self._strip_top = 0  # content line of the strip's first row

    def on_mount(self) -> None:
        self.set_interval(self.DRAW_S, self.pull)

    def watch_info(self) -> None:
        self.pull()

    def pull(self) -> None:
        """Take the runtime's newest map; one still being read waits for the next tick."""
        state = published(self)
        cmap = state.cache_map if state is not None else None
        if cmap is self.cache_map:
            return
        now = time.monotonic()
        reading = cmap is not None and any(r.kind == "reading" for r in cmap.rows)
        if reading and now - self._drawn < self.DRAW_S:
            return
        self.cache_map, self._drawn = cmap, now
        self.refresh(layout=True)

    @property
    def pending(self) -> bool:
        """Whether a newer map than the one drawn is published (tests wait on it)."""
        state = published(self)
        return state is not None and state.cache_map is not self.cache_map

    def render(self) -> Text:
        info = self.info
        if info is None:
            return Text("no conversation yet", style="dim")
        width = max(self.content_size.width, 10)
        colour = context_level(info)
        filled = min(width, round(width * info.retained / max(info.window, 1)))
        text = Text()
        text.append("█" * filled, style=colour)
        text.append("░" * (width - filled), style="#3a3a3a")
        text.append(f"\nread      {info.read:>12,} tok\n")
        text.append(f"in cache  {info.retained:>12,} tok\n", style=colour)
        text.append(f"window    {info.window:>12,} tok")
        if info.read > info.retained:
            text.append(f"\n{info.read - info.retained:,} tokens evicted", style="dim")
        self._map_lines(text, width)
        return text

    def _map_lines(self, text: Text, width: int) -> None:
        cmap = self.cache_map
        if cmap is None or not cmap.rows:
            self._rows = []
            return
        if self._laid != (cmap, width):
            self._rows, self._laid = strip_map.layout(cmap, width), (cmap, width)
        sel = self.selected
        if sel is not None and (sel[0] >= len(self._rows) or sel[1] >= len(self._rows[sel[0]][1])):
            sel = self.selected = None
        text.append("\n\n")
        self._strip_top = str(text).count("\n")
        for line in strip_map.strip(self._rows, sel):
            text.append_text(line)
            text.append("\n")
        text.append_text(strip_map.legend())
        if sel is not None:
            row, cells = self._rows[sel[0]]
            text.append("\n")
            text.append_text(strip_map.describe(cmap, row, cells[sel[1]], width))
        else:
            text.append("\nclick a cell for its text and tier", style="dim")

    def on_click(self, event) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        got = strip_map.hit(self._rows, offset.y - self._strip_top, offset.x)
        if got is not None:
            self.selected = got
            self.refresh(layout=True)

    def action_move(self, rows: int, cells: int) -> None:
        if not self._rows:
            return
        r, c = self.selected or (0, 0)
        if self.selected is not None:
            r = max(0, min(len(self._rows) - 1, r + rows))
            c = max(0, min(len(self._rows[r][1]) - 1, c + cells))
        self.selected = (r, c)
        self.refresh(layout=True)
