"""Rate and time left of a long piece of work reported as `progress(done, total)`.

The rate is that of the recent reports (an exponential moving average of seconds per unit),
not the average since the start: a read resumed half way, a tier that fills and starts
spilling, or a machine that gets busy all change the cost per chunk, and an average since
the start lags them for the rest of an hour-long read. Cost that grows with position, as
attention over a cache that keeps every token does, is extrapolated: the seconds per unit
are fitted as a line in `done` over the recent reports (weighted, forgetting more slowly than
the average), and the time left adds the growth of that line (never less than the flat
estimate; a cost that grew and then levels off, as a bounded cache filling up, loses its
slope as the reports go on).
"""
from __future__ import annotations

import time
from typing import Callable


class Eta:
    def __init__(self, clock: Callable[[], float] = time.monotonic, weight: float = 0.2, trend: float = 0.05):
        """clock() -> seconds (monotonic); weight: how much the newest report moves the average
        cost; trend: the same for the line its growth is fitted by (slower: a slope needs a span)."""
        for name, w in (("weight", weight), ("trend", trend)):
            if not 0 < w <= 1:
                raise ValueError(f"{name} {w}: must be in (0, 1]")
        self.clock, self.weight, self.trend = clock, weight, trend
        self.rate: float | None = None  # units per second, recent
        self.left: float | None = None  # seconds to the end
        self._reset(None, 0, 0)

    def _reset(self, t: float | None, done: int, total: int) -> None:
        self._t, self._done, self._total = t, done, total
        self._per = self._at = None  # seconds per unit, moving average; the position it stands for
        self._fit = [0.0] * 5  # weighted sums of 1, p, s, p*p, p*s (s: seconds per unit at p)
        self._n = 0
        self.rate = self.left = None

    def update(self, done: int, total: int) -> tuple[float | None, float | None]:
        """A report: `done` of `total` units now. -> (units per second, seconds left); None
        until two reports of one piece of work are in (the first is where it starts, which
        for a resumed read is part way). Work that starts again (done goes back, another
        total) starts the estimate again."""
        now = self.clock()
        if self._t is None or done < self._done or total != self._total:
            self._reset(now, done, total)
            return None, None
        dn, dt = done - self._done, now - self._t
        if dn <= 0:
            return self.rate, self.left
        s = dt / dn
        p = (self._done + done) / 2  # where that cost was paid
        if self._per is None:
            self._per, self._at = s, p
        else:  # NOTE: both averaged alike: for a cost linear in p, _per is the line's value at _at
            self._per += self.weight * (s - self._per)
            self._at += self.weight * (p - self._at)
        f = self._fit  # the line's fit forgets more slowly than the level: a slope needs a span
        for i, x in enumerate((1.0, p, s, p * p, p * s)):
            f[i] = f[i] * (1 - self.trend) + x
        self._t, self._done, self._n = now, done, self._n + 1
        left = total - done
        n, sp, ss, spp, sps = f
        var = n * spp - sp * sp
        slope = max(0.0, (n * sps - sp * ss) / var) if self._n >= 3 and var > 0 else 0.0
        # the rest costs the recent seconds per unit, grown by `slope` from where they were paid
        self.left = left * (self._per + slope * ((done + total) / 2 - self._at))
        self.rate = 1 / self._per if self._per > 0 else None
        return self.rate, self.left


def seconds(s: float | None) -> str:
    """'–' (not known yet), '42 s', '17 min', '1 h 05 min'."""
    if s is None:
        return "–"
    s = max(0, int(round(s)))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
