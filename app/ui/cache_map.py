"""The cache map as the Context panel draws it: one strip per document and one for the chat,
each cell a stretch of the conversation coloured by where its tokens sit, shaded by the share
of (layer, KV head) pairs that keep it there. Pure functions of a `CacheMap`
(app/runtime/cache_map.py), so they are tested without a screen; `panels.ContextMeter` draws.
"""
from __future__ import annotations

from rich.color import Color, blend_rgb
from rich.style import Style
from rich.text import Text

TIER_STYLES = {"device": "#d75f5f", "device-quantized": "#d7af5f", "recalled": "#5fd7d7", "host": "#8787d7",
               "evicted": "#4e4e4e"}
TIER_NAMES = {"device": "fp", "device-quantized": "quant", "recalled": "recall", "host": "host",
              "evicted": "evicted"}
BARS = "▁▂▃▄▅▆▇█"
_BACK = Color.parse("#1c1c1c").get_truecolor()
LABEL = 10  # characters of a row's name before its cells


def _dim(colour: str, amount: float) -> Color:
    return Color.from_triplet(blend_rgb(_BACK, Color.parse(colour).get_truecolor(), amount))


def cell_look(cell) -> tuple[str, Style]:
    """A cell as a bar: its height the share of (layer, KV head) pairs that keep the stretch in
    its tier (that tier's colour), over the colour of where most of the rest is (dimmed; dark
    where the rest is evicted). A stretch no pair keeps is a dot."""
    if cell.tier == "evicted":
        return "·", Style(color=TIER_STYLES["evicted"])
    k = max(0.0, min(1.0, cell.kept_share))
    char = "█" if k >= 0.97 else BARS[min(len(BARS) - 1, int(k * len(BARS)))]
    rest = {t: s for t, s in cell.shares.items()
            if t != cell.tier and not {t, cell.tier} <= {"device", "device-quantized"}}
    under = max(rest, key=rest.get) if rest and max(rest.values()) > 0 else "evicted"
    back = None if under == "evicted" else _dim(TIER_STYLES[under], 0.55)
    return char, Style(color=Color.parse(TIER_STYLES[cell.tier]), bgcolor=back)


def row_label(row) -> str:
    name = "reading…" if row.kind == "reading" else row.label
    return name if len(name) <= LABEL else name[: LABEL - 1] + "…"


def layout(cmap, width: int) -> list[tuple]:
    """[(row, cells)] for a strip `width` characters wide (its name, a space, then the cells)."""
    n = max(1, width - LABEL - 1)
    return [(row, cmap.cells(row, n)) for row in cmap.rows]


def strip(rows: list[tuple], selected: tuple | None) -> list[Text]:
    """One line per row; `selected` (row index, cell index) is drawn as a cursor."""
    out = []
    for r, (row, cells) in enumerate(rows):
        line = Text()
        line.append(f"{row_label(row):<{LABEL}} ", style="dim" if row.kind == "chat" else "")
        for c, cell in enumerate(cells):
            char, style = cell_look(cell)
            if selected == (r, c):
                line.append("┃", Style(color="white", bold=True, bgcolor=TIER_STYLES[cell.tier]))
            else:
                line.append(char, style)
        out.append(line)
    return out


def legend() -> Text:
    """■ fp ■ quant ■ recall ■ host · evicted (fp and quant: on the device)."""
    text = Text()
    for tier, colour in TIER_STYLES.items():
        text.append("· " if tier == "evicted" else "■ ", style=colour)
        text.append(TIER_NAMES[tier] + " ", style="dim")
    return text.rstrip() or text


def describe(cmap, row, cell, width: int) -> Text:
    """Two to three lines about a selected cell: which tokens, where they sit, their text."""
    text = Text()
    text.append(f"{row_label(row)} tok {cell.start:,}–{cell.end - 1:,}", style="bold")
    text.append(f"  {cell.tier}", style=TIER_STYLES[cell.tier])
    if cell.tier != "evicted":
        text.append(f" {cell.kept_share:.0%}")
    others = [f"{t} {s:.0%}" for t, s in cell.shares.items() if s >= 0.005 and t != cell.tier]
    if others:
        text.append("\n" + " · ".join(others), style="dim")
    words = " ".join(cmap.text(row, cell.start, cell.end).split())
    if not words:
        words = "(being read)" if row.kind == "reading" else ""
    if words:
        room = max(10, 2 * width - 2)
        words = words if len(words) <= room else words[: room - 1] + "…"
        text.append(f"\n“{words}”", style="italic")
    return text


def hit(rows: list[tuple], line: int, x: int) -> tuple | None:
    """(row index, cell index) under strip line `line`, column x, or None."""
    if not 0 <= line < len(rows):
        return None
    c = x - LABEL - 1
    cells = rows[line][1]
    return (line, c) if 0 <= c < len(cells) else None
