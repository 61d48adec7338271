"""Where a character of the text the cache encodes (`Held.text`) sits among its tokens.

Exact at every read end (`Held.marks`); inside a read, by the tokenizer's offsets of that
read's text (each read was tokenized alone, so re-tokenizing it gives the same tokens). The
offsets of a read are computed once and kept while the record lasts. The sources of an
answer (evidence.py) and the cache map (cache_map.py) locate documents through it.
"""
from __future__ import annotations

import bisect


class TokenIndex:
    def __init__(self, held, tok):
        self.text, self.tok = held.text, tok
        ends = [(0, 0)] + [(int(c), int(t)) for c, t in held.marks if c <= len(held.text)]
        if ends[-1][0] < len(held.text):
            ends.append((len(held.text), len(held.ids)))
        self.ends = ends
        self.chars = [c for c, _ in ends]
        self._starts: dict = {}

    def read_of(self, c: int) -> int:
        """The index of the read whose text holds character c."""
        return bisect.bisect_right(self.chars, c) - 1

    def exact(self, c: int) -> int | None:
        """The first token that starts at or after character c (a token that starts before c
        is before it); None where the read's tokens cannot be mapped (a tokenizer without
        offsets, or a read rendered otherwise than it was tokenized)."""
        r = self.read_of(c)
        c0, t0 = self.ends[r]
        if c == c0 or r + 1 >= len(self.ends):
            return t0
        starts = self.starts(r)
        return None if starts is None else t0 + bisect.bisect_left(starts, c - c0)

    def __call__(self, c: int) -> int:
        """As `exact`, else proportionally inside the read."""
        t = self.exact(c)
        if t is not None:
            return t
        r = self.read_of(c)
        (c0, t0), (c1, t1) = self.ends[r], self.ends[r + 1]
        return t0 + round((c - c0) * (t1 - t0) / max(c1 - c0, 1))

    def starts(self, r: int) -> list | None:
        """Character offsets (within read r) where each of its tokens starts, or None."""
        if r not in self._starts:
            (c0, t0), (c1, t1) = self.ends[r], self.ends[r + 1]
            starts = None
            try:
                offs = self.tok(self.text[c0:c1], add_special_tokens=False,
                                return_offsets_mapping=True)["offset_mapping"]
                if len(offs) == t1 - t0:
                    starts = [s for s, _ in offs]
            except (NotImplementedError, KeyError, TypeError, ValueError):  # a slow tokenizer gives none
                starts = None
            self._starts[r] = starts
        return self._starts[r]
