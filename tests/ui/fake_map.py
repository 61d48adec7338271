"""What the fake runtime publishes of its cache: a `CacheMap` of what it read, by a fixed rule
per policy (so snapshots are stable), and a `Timeline` on a counting clock (one tick a sample).

Rule, for 4 layers x 2 KV heads: `full` keeps every token on the device; a selector with a
budget, once the text passes it, keeps the first 4 tokens and the newest budget/2 in every
pair and the rest in stretches of 192 tokens each kept by 0..8 pairs; `kivi` quantizes all
but the newest 128; `offload` behind a selector keeps what the others evict on the host,
and a question recalls 64 tokens a third of the way into the first document; `offload`
alone keeps everything on the host.
"""
from __future__ import annotations

import itertools

import numpy as np

from app.runtime.cache_map import DEVICE, HOST, QUANT, RECALLED, CacheMap, Segment
from app.runtime.memory import Timeline
from policies.registry import parse_spec

PAIRS = 8
CHARS = 4  # characters per fake token


class FakeCache:
    def __init__(self):
        self.timeline = Timeline(clock=itertools.count().__next__)
        self.clear()

    def clear(self) -> None:
        self.pieces: list = []  # [(label, kind, start, end, text)] read to the end
        self.recalled: tuple | None = None  # (start, end) the last question brought back

    def read(self, label: str, kind: str, start: int, text: str, tokens: int) -> None:
        self.pieces.append((label, kind, start, start + tokens, text))

    def recall(self, policy: str) -> None:
        """After a question: a stretch of the first document comes back, where offload spills."""
        docs = [p for p in self.pieces if p[1] == "document"]
        self.recalled = None
        if docs and _spill(policy):
            a = docs[0][2] + (docs[0][3] - docs[0][2]) // 3
            self.recalled = (a, min(a + 64, docs[0][3]))

    def segments(self, read: int) -> list[Segment]:
        out, end = [], 0
        for label, kind, a, b, _ in self.pieces:
            if a >= read:
                break
            out.append(Segment(label, kind, a, min(b, read)))
            end = min(b, read)
        if read > end:
            out.append(Segment("reading", "reading", end, read))
        return out

    def text(self, a: int, b: int) -> str:
        parts = []
        for _, _, s, e, text in self.pieces:
            lo, hi = max(a, s), min(b, e)
            if lo < hi:
                parts.append(text[(lo - s) * CHARS:(hi - s) * CHARS])
        return "".join(parts)

    def map(self, read: int, policy: str) -> CacheMap:
        texted = max((p[3] for p in self.pieces), default=0)
        return CacheMap(self.segments(read), counts(read, policy, self.recalled), PAIRS, self.text, min(texted, read))


def _spill(policy: str) -> bool:
    slots = parse_spec(policy)
    return "spill" in slots and slots["spill"].name == "offload"


def counts(read: int, policy: str, recalled: tuple | None) -> np.ndarray:
    slots = parse_spec(policy)
    c = np.zeros((4, read), np.int32)
    if "store" in slots and slots["store"].name == "offload":
        c[HOST] = PAIRS
        return c
    budget = slots["selector"].opts.get("budget") if "selector" in slots else None
    i = np.arange(read)
    kept = np.full(read, PAIRS, np.int32)
    if budget and read > budget:
        kept = ((i // 192) * 5 + 3) % (PAIRS + 1)
        kept[:4] = PAIRS
        kept[read - budget // 2:] = PAIRS
    if "store" in slots and slots["store"].name == "kivi":
        old = i < read - 128
        c[QUANT], c[DEVICE] = np.where(old, kept, 0), np.where(old, 0, kept)
    else:
        c[DEVICE] = kept
    if _spill(policy):
        c[HOST] = PAIRS - kept
        if recalled is not None:
            a, b = recalled
            c[RECALLED, a:b], c[HOST, a:b] = c[HOST, a:b], 0
    return c
