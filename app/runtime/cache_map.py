"""Where every token the conversation read sits now: on the device at full precision,
on the device quantized, recalled for the last question, on the host, or evicted.

Two pure steps, run on the model thread at every published state (`memory.cache_state`):

- `segments(held, messages, tok, seen)`: token ranges covering [0, seen) — one per
  document (its `<document>` block in the text the cache encodes), the chat around them
  (system prompt, template, questions, answers) and the tokens being read right now;
- `build(cache, segments)`: per token, how many (layer, KV head) pairs hold it in each tier,
  from the cache's bookkeeping only (the positions each layer keeps, a quantized store's
  count of quantized tokens, the host tier's id log, the recall buffer's indices): no K/V
  tensor is read. Cost O(layers x KV heads x kept), a few passes over the [4, seen] counts
  (a host tier holding all its layer evicted is the complement of what it keeps).

The `CacheMap` is immutable: any thread reads it, cut into cells (`cells`) or exact spans.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import located
from .session import document_block

# counts rows, in this order; a token no pair holds is "evicted"
DEVICE, QUANT, RECALLED, HOST = range(4)
TIERS = ("device", "device-quantized", "recalled", "host")
EVICTED = "evicted"


@dataclass(frozen=True)
class Segment:
    label: str  # the document's name, "chat", or "reading"
    kind: str  # "document", "chat" or "reading" (past the last read end: being read now)
    start: int  # token positions in the conversation, [start, end)
    end: int


@dataclass(frozen=True)
class Span:
    """A stretch of one row's tokens. tier: where the pairs that hold it keep it (the device
    first: `tier_of`); kept_share: the share of (layer, KV head) pairs holding it there;
    shares: every tier's share, `evicted` included (they sum to 1)."""

    document: str
    start: int
    end: int
    tier: str
    kept_share: float
    shares: dict

    def to_json(self) -> dict:
        return {"document": self.document, "start": self.start, "end": self.end, "tier": self.tier,
                "kept_share": round(self.kept_share, 4), "shares": {k: round(v, 4) for k, v in self.shares.items()}}


@dataclass(frozen=True)
class Row:
    label: str
    kind: str
    ranges: tuple  # ((start, end), ...) in order: a chat row is cut by the documents inside it

    @property
    def tokens(self) -> int:
        return sum(b - a for a, b in self.ranges)


def tier_of(shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """shares [4, n] (TIERS order) -> (tier index [n], 0..3 or 4 = evicted; kept share [n]).
    On the device wins where any pair holds it there (quantized where most of those pairs
    quantize it), then recalled, then host."""
    on_dev = shares[DEVICE] + shares[QUANT]
    tier = np.where(on_dev > 0, np.where(shares[DEVICE] >= shares[QUANT], DEVICE, QUANT),
                    np.where(shares[RECALLED] > 0, RECALLED, np.where(shares[HOST] > 0, HOST, 4)))
    kept = np.choose(tier, [on_dev, on_dev, shares[RECALLED], shares[HOST], np.zeros_like(on_dev)])
    return tier, kept


class CacheMap:
    """counts [4, seen] int32: per token, the (layer, KV head) pairs holding it in each tier
    (TIERS order); `pairs` = layers x KV heads. text(start, end) decodes the conversation's
    tokens (None: unknown; tokens past `texted` are being read and have none yet)."""

    def __init__(self, segments: list[Segment], counts: np.ndarray, pairs: int,
                 text: Callable[[int, int], str] | None = None, texted: int = 0):
        self.segments, self.counts, self.pairs = tuple(segments), counts, max(pairs, 1)
        self._text, self.texted = text, texted
        # NOTE: a row per document segment (two documents of one name are two rows); one chat row
        self.rows: tuple[Row, ...] = tuple(self._rows())

    def _rows(self):
        chat: list = []
        for s in self.segments:
            if s.kind == "chat":
                chat.append((s.start, s.end))
            else:
                yield Row(s.label, s.kind, ((s.start, s.end),))
        if chat:
            yield Row("chat", "chat", tuple(chat))

    @property
    def seen(self) -> int:
        return self.counts.shape[1]

    @property
    def documents(self) -> int:
        return sum(r.kind == "document" for r in self.rows)

    def shares(self, a: int, b: int) -> np.ndarray:
        """Mean shares [4] of tokens a..b-1."""
        return self.counts[:, a:b].sum(1) / (self.pairs * max(b - a, 1))

    def _span(self, label: str, a: int, b: int, sh: np.ndarray) -> Span:
        tier, kept = tier_of(sh[:, None])
        t = int(tier[0])
        shares = {name: float(sh[i]) for i, name in enumerate(TIERS)}
        shares[EVICTED] = max(0.0, 1.0 - sum(shares.values()))
        return Span(label, a, b, TIERS[t] if t < 4 else EVICTED, float(kept[0]), shares)

    def spans(self) -> list[Span]:
        """Exact spans, by start: runs of tokens every pair holds alike, cut at row changes."""
        out = []
        for seg in self.segments:
            a, b = seg.start, seg.end
            if b <= a:
                continue
            c = self.counts[:, a:b]
            cuts = [a, *(a + 1 + np.flatnonzero(np.any(c[:, 1:] != c[:, :-1], axis=0))).tolist(), b]
            for s, e in zip(cuts, cuts[1:]):
                out.append(self._span(seg.label, s, e, self.counts[:, s] / self.pairs))
        return sorted(out, key=lambda s: s.start)

    def cells(self, row: Row, n: int) -> list[Span]:
        """The row's tokens cut into at most n cells of (nearly) equal token counts, mean
        shares each; a cell of a chat row may hold several ranges (start..end spans them)."""
        pos = np.concatenate([np.arange(a, b) for a, b in row.ranges]) if row.ranges else np.zeros(0, int)
        if len(pos) == 0:
            return []
        n = max(1, min(n, len(pos)))
        cuts = np.linspace(0, len(pos), n + 1).round().astype(int)
        sums = np.add.reduceat(self.counts[:, pos], cuts[:-1], axis=1)  # [4, n]
        sizes = np.diff(cuts)
        sh = sums / (self.pairs * sizes)
        return [self._span(row.label, int(pos[i]), int(pos[j - 1]) + 1, sh[:, k])
                for k, (i, j) in enumerate(zip(cuts[:-1], cuts[1:]))]

    def text(self, row: Row, start: int, end: int) -> str:
        """The text of the row's tokens in [start, end) ('' where unknown)."""
        if self._text is None:
            return ""
        parts = []
        for a, b in row.ranges:
            a, b = max(a, start), min(b, end, self.texted)
            if a < b:
                parts.append(self._text(a, b))
        return "".join(parts)

    def to_json(self) -> list[dict]:
        return [s.to_json() for s in self.spans()]


# ---- segments -------------------------------------------------------------------------------
_memo: dict = {}  # id(held) -> (key, segments of what the record holds, text function)


def segments(held, messages: list, tok, seen: int) -> list[Segment]:
    """Token ranges covering [0, seen): each document's block, the chat between them, and
    the tokens past the record's last read end ("reading"; "chat" while an answer is being
    written). Located in the text the cache encodes (`held.text`); a read's characters are
    mapped to its tokens by the tokenizer's offsets (linearly where it gives none)."""
    return _record(held, messages, tok)[0] + _tail(held, seen)


def text_of(held, messages: list, tok) -> Callable[[int, int], str]:
    return _record(held, messages, tok)[1]


def _tail(held, seen: int) -> list[Segment]:
    n = len(held.ids)
    if seen <= n:
        return []
    writing = held.answer_start is not None and held.answer_start == len(held.text)
    return [Segment("chat", "chat", n, seen) if writing else Segment("reading", "reading", n, seen)]


def _record(held, messages: list, tok):
    """(segments, text function) of what the record holds, memoized until it changes (so a
    long read pays once, at its end, and not at every chunk)."""
    docs = tuple((m.get("name", "document"), len(m.get("content", ""))) for m in messages
                 if m.get("role") == "document")
    key = (id(held.text), len(held.text), len(held.ids), len(held.marks), docs)
    got = _memo.get(id(held))
    if got is not None and got[0] == key:
        return got[1], got[2]
    segs = _locate(held, [m for m in messages if m.get("role") == "document"], tok)
    ids = tuple(held.ids)

    def text(a: int, b: int) -> str:
        return tok.decode(list(ids[a:b]), skip_special_tokens=False) if tok is not None else ""
    if len(_memo) > 8:
        _memo.clear()
    _memo[id(held)] = (key, segs, text)
    return segs, text


def _locate(held, docs: list, tok) -> list[Segment]:
    text, n = held.text, len(held.ids)
    to_token = located.index(held, tok)
    out, cur_c, cur_t = [], 0, 0
    for m in docs:
        block = document_block(m.get("name", "document"), m.get("content", ""))
        at = text.find(block, cur_c)
        if at < 0:
            continue  # not in what the cache holds (yet): its tokens are chat or being read
        a, b = to_token(at), to_token(at + len(block))
        a, b = max(a, cur_t), min(max(b, a), n)
        if a > cur_t:
            out.append(Segment("chat", "chat", cur_t, a))
        if b > a:
            out.append(Segment(m.get("name", "document"), "document", a, b))
        cur_c, cur_t = at + len(block), b
    if n > cur_t:
        out.append(Segment("chat", "chat", cur_t, n))
    return out


# ---- the cache's bookkeeping ------------------------------------------------------------------
def build(cache, segs: list[Segment], text: Callable[[int, int], str] | None = None, texted: int = 0) -> CacheMap:
    """Count, per token read, the (layer, KV head) pairs holding it in each tier. Reads
    positions, quantized counts, the host id log and the recall indices; never K/V."""
    import torch
    seen = cache.seen
    info = cache.info
    heads = info.n_kv_heads
    diff = np.zeros((4, seen + 1), np.int32)  # contiguous ranges (layers that never evicted, host tiers)
    dev: dict = {}  # device -> [4, seen] accumulator (layers with their own positions)

    def add(tier: int, pos, sign: int = 1) -> None:
        if pos.numel() == 0:
            return
        acc = dev.get(pos.device)
        if acc is None:
            acc = dev[pos.device] = torch.zeros(4, seen, dtype=torch.int32, device=pos.device)
        flat = pos.reshape(-1)  # NOTE: O(positions), not O(seen): a read publishes a map per chunk
        acc[tier].index_add_(0, flat, torch.full(flat.shape, sign, dtype=torch.int32, device=flat.device))

    def add_range(tier: int, a: int, b: int) -> None:
        if b > a:
            diff[tier, a] += heads
            diff[tier, b] -= heads

    for layer in cache.layers:
        n, q = layer.length, layer.store.quantized()
        on_host = layer.store.tier == "host"
        if layer.pos is None:  # stored tokens are seen-n .. seen-1 in every head
            a = layer.seen - n
            if on_host:
                add_range(HOST, a, layer.seen)
            else:
                add_range(QUANT, a, a + q)
                add_range(DEVICE, a + q, layer.seen)
        elif on_host:
            add(HOST, layer.pos)
        else:
            add(QUANT, layer.pos[:, :q])
            add(DEVICE, layer.pos[:, q:])
        host, recalled = (None, None) if layer.spill is None else (layer.spill.host_positions(),
                                                                    layer.spill.recalled_positions())
        if host is not None and host.shape[-1] + n == layer.seen:  # every token read held or on the host:
            add_range(HOST, 0, layer.seen)  # the host holds all but the held ones (O(kept), not O(read))
            add(HOST, layer.positions(), -1)
        elif host is not None:
            add(HOST, host)
        if recalled is not None:  # NOTE: recalled rows are host rows too: counted once, as recalled
            add(RECALLED, recalled)
            add(HOST, recalled, -1)
    counts = np.cumsum(diff[:, :seen], axis=1, dtype=np.int32)
    for acc in dev.values():
        counts += acc.cpu().numpy()
    return CacheMap(segs, counts, len(cache.layers) * heads, text, texted)
