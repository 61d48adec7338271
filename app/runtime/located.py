"""Where a character of the text the cache encodes (`Held.text`) sits among its tokens.

Exact at every read end (`Held.marks`); inside a read, by the tokenizer's offsets of that
read's text (each read was tokenized alone, so re-tokenizing it gives the same tokens). The
offsets of a read are computed once: kept while the record lasts, and carried into the index
of the record once it has grown (`index`: a question or an answer appended to a conversation
leaves the document read before it as it was, and a million-token document is not tokenized
again for each answer). The sources of an answer (evidence.py) and the cache map
(cache_map.py) locate documents through it.
"""
from __future__ import annotations

import bisect
import weakref
from array import array


class TokenIndex:
    def __init__(self, held, tok, prev: "TokenIndex | None" = None):
        """prev: an index of an earlier record; the offsets it computed for a read that spans
        the same characters and tokens with the same text are taken, not computed again."""
        self.text, self.tok = held.text, tok
        ends = [(0, 0)] + [(int(c), int(t)) for c, t in held.marks if c <= len(held.text)]
        if ends[-1][0] < len(held.text):
            ends.append((len(held.text), len(held.ids)))
        self.ends = ends
        self.chars = [c for c, _ in ends]
        self._starts: dict = {}
        if prev is not None and prev.tok is tok:
            for r, got in prev._starts.items():
                span = prev.ends[r:r + 2]
                if len(span) == 2 and self.ends[r:r + 2] == span and (
                        self.text is prev.text or self.text[span[0][0]:span[1][0]] == prev.text[span[0][0]:span[1][0]]):
                    self._starts[r] = got

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

    def starts(self, r: int) -> array | None:
        """Character offsets (within read r) where each of its tokens starts, or None."""
        if r not in self._starts:
            (c0, t0), (c1, t1) = self.ends[r], self.ends[r + 1]
            starts = None
            try:
                offs = self.tok(self.text[c0:c1], add_special_tokens=False,
                                return_offsets_mapping=True)["offset_mapping"]
                if len(offs) == t1 - t0:
                    starts = array("q", (s for s, _ in offs))  # (8 B a token: kept while the record lasts)
            except (NotImplementedError, KeyError, TypeError, ValueError):  # a slow tokenizer gives none
                starts = None
            self._starts[r] = starts
        return self._starts[r]


_LAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> its last index


def index(held, tok) -> TokenIndex:
    """The index of `held` now: the last one built with this tokenizer where the record has
    not changed, else a new one that carries that one's offsets (the constructor's `prev`)."""
    key = (len(held.text), len(held.ids), len(held.marks))
    try:
        last = _LAST.get(tok)
    except TypeError:  # a tokenizer that takes no weak reference: nothing kept
        return TokenIndex(held, tok)
    if last is not None and last[0] == key and last[1].text is held.text:
        return last[1]
    got = TokenIndex(held, tok, last[1] if last is not None else None)
    _LAST[tok] = (key, got)
    return got
