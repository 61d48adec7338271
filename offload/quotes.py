"""Quote following for `offload`'s recall: where the text just read or written repeats the
conversation verbatim, the span it repeats comes back whole, in every layer and head.

Why. Label scores pick tokens per layer and per head, each head its own. That finds a
needle, but a passage the answer quotes back is not a set of tokens a few heads want:
per-head recall brings back a fraction of such a passage, every head given the exact
passage copies it about as well as `full` (copy fidelity, BENCHMARKS.md, Offload). What
the label scores lack is *where in the text* the answer is reading; the token ids say it
exactly.

How. One `Quotes` per cache (shared by every layer's spill) keeps the conversation's
token ids by conversation index (host int64, 8 B a token: 1 MiB at 128K).
- At the end of a prefill: each `NGRAM`-token run of the question that also occurs before
  it marks a hit. The question is the prefill's last message; one longer than `QUESTION`
  tokens (a document and its question in one message) from its last paragraph break, else
  its last `QUESTION` tokens (a document's tail quotes the document, it asks nothing).
  Hits within `span` tokens of each other form a cluster; the largest clusters of two hits or more become
  spans (a question quoting a passage's first and last words gets both ends back).
- Each decode step: the longest suffix (`MIN_RUN`..`MAX_RUN` tokens, within the answer)
  that occurs before the question, in at most `MAX_ENDS` places, marks where the answer is
  reading; while the answer keeps copying, that point just advances (O(1) a step). Once
  it has kept matching for `CONFIRM` steps (a chance match breaks at once) and it is
  outside its span or near the span's end, a span opens around it (the question's
  other span stays) and the spills re-recall: about once per 7/8 of a span while an
  answer quotes, never while it does not.
- With `terms` (named facts): each two-token run of the question (no special token or line
  break in it: a role name and its line break are the chat template's, not words)
  that occurs at most `TERM_MAX` times in the text before it, outside earlier questions (prefills
  of at most `TALK` tokens) and answers, marks a hit weighted 1/occurrences; hits within `span` of each other form a
  cluster, and clusters weighing 1 or more (a rare word pair, or several) become spans after
  the quotes'. A question names the fact it asks about ("the secret city", "the pass key")
  in words that occur where the fact is stated and rarely elsewhere; the label scores of the
  question's queries rank such a fact's value tokens no better than chance on the default
  model (BENCHMARKS.md, the heads-free choice), the words find it.
A span covers [p - span/8, p + 7·span/8) around the point p: copying reads forward.
Spans take at most half the recall buffer; the other half keeps the label ranking (with the
spill's `rank=off`, the buffer holds the spans' rows only).
Only the host rows in a span come back (the kept tokens of it are in the store already).
"""
from __future__ import annotations

import weakref

import torch

NGRAM = 6  # a run of the question this long found earlier counts as a quote
MIN_RUN, MAX_RUN = 6, 16  # suffix lengths of the answer the decode step matches (longest wins)
MAX_ENDS = 16  # a run found in more places than this says nothing about where the answer reads
CONFIRM = 3  # steps a found point must keep matching before the spans move to it
QUESTION = 512  # a message longer than this is a document with its question at the end
UNKNOWN = -1  # token id of conversation indices read before the log existed
TERM_MAX = 2  # a question's word pair found more often than this names nothing in particular
TALK = 128  # a prefill this short is a question (talk, never a term hit later), a longer one a text
ASKED = 4  # text tokens after a special token / a paragraph break that make it the question's start


class Quotes:
    """Token log + current spans of one cache; a new `version` tells the spills to re-recall."""

    def __init__(self, span: int, recall: int, terms: bool = False, special=(), newline=(), paragraph=()):
        self.span = span
        self.terms = terms  # spans also from the question's rare word pairs (module docstring)
        self.special = torch.tensor(sorted(set(special)), dtype=torch.long)  # ids no term contains
        # ids whose text holds a line break / a paragraph break (two line breaks in a row: too)
        self.newline = torch.tensor(sorted(set(newline) | set(paragraph)), dtype=torch.long)
        self.paragraph = torch.tensor(sorted(set(paragraph)), dtype=torch.long)
        self._unpaired = torch.cat([self.special, self.newline])  # ids no term pair holds
        self.talk: list[tuple[int, int]] = []  # [a, b): earlier questions and answers (no term hits)
        self.max_spans = max(1, (recall // 2) // span)
        self.ids = torch.empty(0, dtype=torch.long)
        self.n = 0  # tokens logged (conversation indices 0..n-1)
        self.spans: list[tuple[int, int]] = []  # [a, b) conversation index ranges
        self.version = 0  # bumps when spans change
        self.point = None  # conversation index the answer's last token repeats, if any
        self._at = -1  # `seen` the current spans were computed for
        self._answer = 0  # conversation index where the current answer began
        self._from = 0  # conversation index where the last prefill began
        self._reading = False  # inside a prefill of several chunks
        self._turn = 0  # where the question's tokens begin (hits and reading points lie before)
        self._run = 0  # steps the point has kept matching since it was found

    # ---- the log ------------------------------------------------------------------------
    def observe(self, seen: int, ids: torch.Tensor, prefill: bool = True, final: bool = True) -> None:
        """Log a chunk's ids [T] starting at conversation index `seen` (once per chunk: the
        first layer logs it, the others find it logged)."""
        t = ids.shape[-1]
        if seen + t <= self.n:
            return
        if prefill and not self._reading:
            if self._answer < seen:  # decoded tokens since the last prefill: an answer
                self._talked(self._answer, seen)
            self._from = seen  # the first chunk of a prefill (the question's turn)
        self._reading = prefill and not final
        if seen > self.n:  # read before this log existed (a live conversion): unknown ids
            self._grow(seen)
            self.ids[self.n:seen] = UNKNOWN
            self.n = seen
        if seen < self.n:  # NOTE: conversation indices only grow within one cache
            raise ValueError(f"token log at {self.n} asked to log from {seen}")
        self._grow(seen + t)
        self.ids[seen:seen + t] = ids.reshape(-1).to("cpu", torch.long)
        self.n = seen + t

    def adopt(self, other: "Quotes") -> None:
        if other.n > self.n:
            self._grow(other.n)
            self.ids[: other.n] = other.ids[: other.n]
            self.n = other.n

    def fill(self, ids: list[int], seen: int) -> bool:
        """Take the ids of the whole conversation read so far (`seen` tokens) where this log
        lacks some (a cache converted from one that keeps no log). Only where the count
        agrees with what was read; -> whether it took them. What it takes is text, not an
        answer: the next prefill does not count it as talk."""
        if self.n >= seen or len(ids) != seen:
            return False
        self._grow(seen)
        self.ids[:seen] = torch.tensor(ids, dtype=torch.long)
        self.n = seen
        self._answer = max(self._answer, seen)
        return True

    def _grow(self, n: int) -> None:
        if n > self.ids.shape[0]:
            new = torch.empty(grown(self.ids.shape[0], n), dtype=torch.long)
            new[: self.n] = self.ids[: self.n]
            self.ids = new

    def nbytes_after(self, chunks: list[int]) -> int:
        """Bytes of the log once `chunks` more tokens are logged, chunk by chunk."""
        return capacity_after(chunks, self.ids.shape[0], self.n) * self.ids.element_size()

    def nbytes(self) -> int:
        return self.ids.nbytes

    _FIELDS = ("n", "version", "point", "_at", "_answer", "_from", "_reading", "_turn", "_run")

    def _talked(self, a: int, b: int) -> None:
        if self.talk and self.talk[-1][1] == a:
            self.talk[-1] = (self.talk[-1][0], b)
        else:
            self.talk.append((a, b))

    def state(self) -> tuple[dict, dict]:
        meta = {f: getattr(self, f) for f in self._FIELDS}
        meta.update(cap=self.ids.shape[0], spans=[list(s) for s in self.spans], talk=[list(t) for t in self.talk])
        return {"ids": self.ids[: self.n]}, meta

    def restore(self, tensors: dict, meta: dict) -> None:
        for f in self._FIELDS:
            setattr(self, f, meta[f])
        ids = tensors["ids"]
        if ids.shape != (self.n,):
            raise ValueError(f"quotes: saved token log of {tuple(ids.shape)} ids for n={self.n}")
        self.ids = torch.zeros(int(meta["cap"]), dtype=torch.long)
        self.ids[: self.n] = ids
        self.spans = [(int(a), int(b)) for a, b in meta["spans"]]
        self.talk = [(int(a), int(b)) for a, b in meta.get("talk", [])]  # (files from before terms: none)

    # ---- spans --------------------------------------------------------------------------
    def at_prefill_end(self) -> None:
        """The newest chunk was the last of a prefill: spans from what it quotes."""
        if self._at == self.n:
            return
        self._at, self.point, self._answer, self._run = self.n, None, self.n, 0
        # the question (a conversation re-read in one prefill, or a document read with its
        # question, is looked up in everything before it)
        self._turn = self._question()
        hits = _ngram_hits(self.ids[: self.n], self._turn, self.talk)
        # NOTE: a lone hit is mostly the chat template (". <|im_end|> ... assistant"), a quote
        # of NGRAM + 1 tokens or more hits twice
        firsts = self._clusters(hits.tolist(), [1.0] * hits.numel(), least=2)
        new = [self._around(p - NGRAM + 1) for p in firsts[: self.max_spans]]
        if self.terms:
            new += [s for s in self._term_spans() if s not in new][: self.max_spans - len(new)]
        if self.n - self._from <= TALK:  # a question, not a document: never a term hit later
            self._talked(self._from, self.n)
        self._set(new)

    def _term_spans(self) -> list[tuple[int, int]]:
        """Spans around the question's rare word pairs (module docstring), heaviest first."""
        ids = self.ids[: self.n]
        hits, weight = _pair_hits(ids, self._turn, self._unpaired, self.talk)
        return [self._around(p - 1) for p in self._clusters(hits.tolist(), weight.tolist(), least=1.0)]

    def _clusters(self, hits: list[int], weights: list[float], least: float) -> list[int]:
        """Sorted hits within `span` of each other form a cluster -> the first hit of each
        cluster weighing `least` or more, heaviest first, then latest."""
        groups: list[list] = []  # [first hit, last hit, weight]
        for p, w in zip(hits, weights):
            if groups and p - groups[-1][1] <= self.span:
                groups[-1][1], groups[-1][2] = p, groups[-1][2] + w
            else:
                groups.append([p, p, w])
        groups.sort(key=lambda g: (g[2], g[1]), reverse=True)
        return [g[0] for g in groups if g[2] >= least]

    def _question(self) -> int:
        """Where the question begins in the prefill just read: its last message (after the last
        special token with `ASKED` text tokens or more after it); a message longer than
        `QUESTION` (a document read with its question) from its last paragraph break with
        `ASKED` text tokens after it, else its last `QUESTION` tokens. Without the tokenizer's
        special and break ids: the prefill's last `QUESTION` tokens."""
        a, n = self._from, self.n
        if n - a < 2 or not self.paragraph.numel():
            return max(a, n - QUESTION)
        turn = self.ids[a:n]
        special = torch.isin(turn, self.special)
        nl = torch.isin(turn, self.newline)
        text = (~nl & ~special).long()
        after = text.flip(0).cumsum(0).flip(0) - text  # text tokens after each position
        at = torch.nonzero(special & (after >= ASKED))[:, 0]
        if at.numel():
            a += int(at[-1]) + 1
        if n - a <= QUESTION:
            return a
        brk = torch.isin(turn, self.paragraph)
        brk[1:] |= nl[1:] & nl[:-1]
        brk[: n - QUESTION - self._from] = False
        at = torch.nonzero(brk & (after >= ASKED))[:, 0]
        return self._from + int(at[-1]) + 1 if at.numel() else n - QUESTION

    def at_step(self) -> bool:
        """After the decode step that logged the newest token: follow the reading point.
        -> True where the spans moved (the spills re-recall)."""
        if self._at == self.n:
            return False
        self._at = self.n
        ids, n = self.ids, self.n
        if self.point is not None and self.point + 1 < n - 1 and ids[self.point + 1] == ids[n - 1]:
            self.point += 1  # still reading on
            self._run += 1
        else:
            self.point, self._run = None, 0
            ends = _suffix_hits(ids[:n], n - self._answer)  # runs within the answer only
            if ends is None:
                return False
            ends = ends[ends < self._turn].tolist()  # NOTE: the question itself is held, not recalled
            if not ends or len(ends) > MAX_ENDS:  # not found, or too common to say where
                return False
            inside = [p for p in ends if any(a <= p < b for a, b in self.spans)]
            self.point = inside[-1] if inside else ends[-1]  # the latest, within a span if one is
        if self._run < CONFIRM:  # NOTE: a chance match breaks at once; a copy goes on
            return False
        span = next(((a, b) for a, b in self.spans if a <= self.point < b), None)
        if span is None or self.point >= span[1] - self.span // 8:  # outside, or near the end: move
            rest = [s for s in self.spans if s != span]  # the other spans stay (the question's)
            self._set([self._around(self.point)] + rest[: self.max_spans - 1])
            return True
        return False

    def _around(self, p: int) -> tuple[int, int]:
        back = self.span // 8
        return max(0, p - back), p - back + self.span

    def _set(self, spans) -> None:
        if spans != self.spans:
            self.spans = spans
            self.version += 1


def grown(cap: int, n: int) -> int:
    """The log's capacity once it holds n ids: a quarter more at a time, 4096 at least."""
    return cap if n <= cap else max(n, cap * 5 // 4, 4096)


def capacity_after(chunks, cap: int = 0, n: int = 0) -> int:
    """The capacity of a log of `cap` holding `n` ids once `chunks` more are logged, chunk by chunk."""
    for t in chunks:
        n += t
        cap = grown(cap, n)
    return cap


_BREAKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def breaks(tok) -> dict[str, list[int]]:
    """A tokenizer's ids whose text holds a line break (`newline`) / two (`paragraph`),
    found once per tokenizer (a 49K vocabulary: 0.35 s on the 2-core CPU)."""
    try:
        return _BREAKS[tok]
    except (KeyError, TypeError):
        pass
    text = tok.batch_decode([[i] for i in range(len(tok))])
    out = {"newline": [i for i, t in enumerate(text) if "\n" in t],
           "paragraph": [i for i, t in enumerate(text) if "\n\n" in t]}
    try:
        _BREAKS[tok] = out
    except TypeError:  # NOTE: a tokenizer that takes no weak reference is decoded each time
        pass
    return out


def _ngram_hits(ids: torch.Tensor, start: int, talk=()) -> torch.Tensor:
    """Sorted conversation indices p < start, outside `talk` ranges, where ids[p-NGRAM+1..p]
    equals some NGRAM-run of ids[start:] (runs with an unknown id never match; a question
    that repeats an earlier question's or answer's words quotes nothing in the document).
    Runs are compared by a 64-bit hash: a false hit needs a collision (tests compare with
    brute force)."""
    if start < NGRAM or ids.shape[0] - start < NGRAM:
        return torch.empty(0, dtype=torch.long)
    h = _hashes(ids)  # h[j]: the run ending at j + NGRAM - 1
    before, after = h[: start - NGRAM + 1], h[start:]
    hit = torch.isin(before, after[after != _BAD]) & (before != _BAD)
    for lo, hi in talk:  # runs ending in [lo, hi)
        hit[max(0, lo - NGRAM + 1):max(0, min(hi, start) - NGRAM + 1)] = False
    return torch.nonzero(hit)[:, 0] + NGRAM - 1


_BAD = torch.iinfo(torch.long).min


def _pair_hits(ids: torch.Tensor, start: int, special: torch.Tensor, talk) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sorted indices p < start where ids[p-1..p] is a two-token run of ids[start:] found
    at most TERM_MAX times before start outside `talk` ranges, weights 1/occurrences [float]).
    Runs holding an unknown or a `special` id (the caller's: special ids and line breaks)
    never match."""
    if start < 2 or ids.shape[0] - start < 2:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    a, b = ids[:-1], ids[1:]
    h = a * 1_000_003 + b  # h[j]: the pair ending at j + 1
    bad = (a == UNKNOWN) | (b == UNKNOWN)
    if special.numel():
        bad |= torch.isin(a, special) | torch.isin(b, special)
    h = h.masked_fill(bad, _BAD)
    before, after = h[: start - 1].clone(), h[start:]
    for lo, hi in talk:  # earlier questions and answers name nothing in the document
        before[max(0, lo - 1):max(0, min(hi, start) - 1)] = _BAD
    hit = torch.isin(before, after[after != _BAD]) & (before != _BAD)
    where = torch.nonzero(hit)[:, 0]
    if where.numel() == 0:
        return where, torch.empty(0)
    _, inv, counts = torch.unique(before[where], return_inverse=True, return_counts=True)
    c = counts[inv]
    keep = c <= TERM_MAX
    return where[keep] + 1, 1.0 / c[keep].float()


def _hashes(ids: torch.Tensor) -> torch.Tensor:
    """Polynomial hash of every NGRAM-run (int64, wrapping); _BAD where a run holds UNKNOWN."""
    n = ids.shape[0] - NGRAM + 1
    h = torch.zeros(n, dtype=torch.long)
    bad = torch.zeros(n, dtype=torch.bool)
    for j in range(NGRAM):
        part = ids[j:j + n]
        h = h * 1_000_003 + part
        bad |= part == UNKNOWN
    h[bad] = _BAD
    return h


def _suffix_hits(ids: torch.Tensor, longest: int = MAX_RUN) -> torch.Tensor | None:
    """Indices p < n-1 (sorted) where the longest suffix of ids (MIN_RUN..min(MAX_RUN,
    longest) tokens) also ends at p; None where not even MIN_RUN tokens repeat. One pass over
    the log (where the last token recurs), then only those places are extended: a decode
    step costs O(log) once, not once per suffix length."""
    n = ids.shape[0]
    if n < MIN_RUN + 1 or longest < MIN_RUN or ids[-1] == UNKNOWN:
        return None
    cand = torch.nonzero(ids[:-1] == ids[-1])[:, 0]  # the last L tokens end at these, L = 1
    best = None
    for length in range(1, min(MAX_RUN, longest) + 1):
        if length > 1:
            tok = ids[n - length]
            if tok == UNKNOWN:
                break
            cand = cand[cand >= length - 1]
            cand = cand[ids[cand - (length - 1)] == tok]
        if cand.numel() == 0:
            break
        if length >= MIN_RUN:
            best = cand
    return best
