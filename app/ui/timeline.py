"""Memory over time, as the gauges draw it: a sparkline of one KV tier over the samples of a
`memory.Timeline`, the time axis cut into equal columns, and a row of markers where the policy
changed (▲) or a document was read (◆), so a switch shows as a step. Pure functions.
"""
from __future__ import annotations

import bisect

from rich.text import Text

BARS = "▁▂▃▄▅▆▇█"
POLICY, DOCUMENT = "▲", "◆"
MARK_STYLES = {POLICY: "bold #ffd75f", DOCUMENT: "bold #5fd7d7"}


def columns(samples: list, tier: str, width: int) -> tuple[list[int], list[str]]:
    """Per column of `width` over the samples' time span: the tier's bytes at its end (the
    last sample in it, else the one before: a step chart whose last column is now), and its
    marker ('' / POLICY / DOCUMENT)."""
    if not samples:
        return [], []
    t0, t1 = samples[0].t, samples[-1].t
    n = width if t1 > t0 else 1
    times = [s.t for s in samples]
    vals, marks = [], []
    for i in range(n):
        lo = t0 + (t1 - t0) * i / n
        hi = t0 + (t1 - t0) * (i + 1) / n
        a = bisect.bisect_left(times, lo)
        b = bisect.bisect_left(times, hi) if i < n - 1 else len(samples)
        vals.append(getattr(samples[max(b - 1, 0)], tier))
        mark = ""
        for j in range(a, b):
            if j == 0:
                continue
            if samples[j].policy != samples[j - 1].policy:
                mark = POLICY
            elif samples[j].documents > samples[j - 1].documents and not mark:
                mark = DOCUMENT
        marks.append(mark)
    return vals, marks


def sparkline(samples: list, tier: str, width: int, colour: str) -> tuple[Text, Text | None, int]:
    """(the sparkline, the marker row or None without markers, the peak bytes of all samples)."""
    vals, marks = columns(samples, tier, width)
    peak = max((getattr(s, tier) for s in samples), default=0)
    line = Text()
    for v in vals:
        line.append(" " if v == 0 else BARS[min(len(BARS) - 1, int(v * len(BARS) / max(peak, 1)))],
                    style=colour)
    if not any(marks):
        return line, None, peak
    row = Text()
    for m in marks:
        row.append(m or " ", style=MARK_STYLES.get(m, ""))
    return line, row, peak
