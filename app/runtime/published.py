"""The cache's state as the gauge and panels show it, published by the thread that changes
the cache (after every prefill chunk, now and then while decoding, after every change) and
replaced whole: any thread reads the last one without waiting for the model thread."""
from __future__ import annotations

import time
from typing import Callable

from .types import CacheState

EVERY_S = 0.1  # while decoding, publish at most this often (building a state walks every layer)


class Published:
    def __init__(self, build: Callable[[CacheState | None], CacheState | None]):
        """build(last state) -> the state now, or None to keep the last (a cache mid-replacement)."""
        self._build = build
        self.state: CacheState = build(None)
        self._at = 0.0

    def now(self) -> None:
        state = self._build(self.state)
        if state is not None:
            self.state, self._at = state, time.monotonic()

    def now_and_then(self) -> None:
        if time.monotonic() - self._at >= EVERY_S:
            self.now()
