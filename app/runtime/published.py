"""The cache's state as the gauge and panels show it, published by the thread that changes
the cache (after every change; while reading, after a chunk where building it costs at most
its share of the read; now and then while decoding) and replaced whole: any thread reads the
last one without waiting for the model thread."""
from __future__ import annotations

import time
from typing import Callable

from .types import CacheState

EVERY_S = 0.1  # while decoding, publish at most this often
SHARE = 0.1  # ... and, reading or decoding, so that building states takes at most this share of
# the time: a state walks every layer and counts every token read (the cache map), 40-130 ms at
# a million tokens on the 2-core CPU; a decode step there takes ~50 ms, a chunk ~1.1 s (every
# chunk's state is published there), on a GPU a chunk of a small model a few ms


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

    def now_and_then(self, every: float = EVERY_S) -> None:
        """Publish where `every` seconds have passed since the last (EVERY_S while decoding; 0
        after a chunk read), and at least 1/SHARE times as long as that one took to build."""
        if self._clock() - self._at >= max(every, self._cost / SHARE):
            self.now()

    def chunk_read(self, last: bool) -> None:
        """After a prefill chunk: its state where it costs at most SHARE of the read so far;
        the read's last chunk's at once (what the read ends with is always shown)."""
        if last:
            self.now()
        else:
            self.now_and_then(every=0.0)
