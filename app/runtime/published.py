"""The cache's state as the gauge and panels show it, published by the thread that changes
the cache (after every prefill chunk, now and then while decoding, after every change) and
replaced whole: any thread reads the last one without waiting for the model thread."""
from __future__ import annotations

import time
from typing import Callable

from .types import CacheState

EVERY_S = 0.1  # while decoding, publish at most this often
SHARE = 0.1  # ... and so that building states takes at most this share of a decode's time:
# a state walks every layer and counts every token read (the cache map), 40-130 ms at a
# million tokens on the 2-core CPU; a decode step there takes ~50 ms


class Published:
    def __init__(self, build: Callable[[CacheState | None], CacheState | None],
                 clock: Callable[[], float] = time.monotonic):
        """build(last state) -> the state now, or None to keep the last (a cache mid-replacement)."""
        self._build, self._clock = build, clock
        t0 = clock()
        self.state: CacheState = build(None)
        self._at = clock()  # when the last build ended
        self._cost = self._at - t0  # seconds it took

    def now(self) -> None:
        t0 = self._clock()
        state = self._build(self.state)
        self._at = self._clock()
        self._cost = self._at - t0
        if state is not None:
            self.state = state

    def now_and_then(self) -> None:
        """While decoding: publish where EVERY_S has passed since the last, and at least
        1/SHARE times as long as that one took to build."""
        if self._clock() - self._at >= max(EVERY_S, self._cost / SHARE):
            self.now()
