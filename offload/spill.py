"""`offload` behind an evicting selector: evicted tokens go to host memory, and the tokens a
question needs come back into a small recall buffer that attention also reads.

Per layer (batch 1):
- host: keys de-rotated to position 0 [Hkv, N, D], values [Hkv, N, D] and the
  conversation index of each token `hpos` [Hkv, N] (pinned, filled by non_blocking copies
  on CUDA; plain tensors on CPU — the same code). Keys and values are kept at the cache's
  precision (`kbits`/`vbits` 16, the default: `hk`, `hv`), or as KIVI codes at 2, 4 or 8
  bits (offload/rows.py `CodedRows`: keys per channel, values per token, kivi's own
  quantizers), dequantized only for the rows a recall brings back; with quote spans
  (`quote` >= 16), `row_at` [Hkv, C] int32, the host row of each conversation index (4 B per
  token read and KV head), so a recall finds the spans' rows (and with `rank=off` a window
  around them) without a pass over every host row;
- GPU: labels [Hkv, N, r], each evicted key's r calibrated channels, post-RoPE at the
  position it held when it was evicted (the frame it was last attended in, at distances
  like the ones a recalled token gets), int8 with a scale per row (labels.LabelCache),
  and the recall buffer [Hkv, k, D] x 2.

When recall runs. The final chunk of every prefill (the question, or a document's tail)
scores the host tokens with its own queries (each token's best score over those queries)
and fills the buffer; decode reads that buffer without any host scan, and re-recalls with
the current query every `every` decode steps if asked (0: never). Non-final prefill
chunks (reading a document) read no buffer, as the selector alone would.

Positions. Recalled tokens sit *right before the kept tokens*, in their original order:
at recall, the m recalled tokens get RoPE positions base-m .. base-1 (negative under
compacted positions: RoPE only sees distances). Kept tokens never move, so the store's
positions invariant (policies/base.py) holds untouched, and a recalled passage keeps its
internal order and spacing as long as it was evicted whole. When every evicted token
precedes every kept one (the case of a selector keeping the newest tokens) and the buffer
holds them all, each key sits at exactly its distance under `full`: recall with k >= host
tokens equals no eviction (tests/test_offload.py checks the logits). The buffer is
re-rotated (uniformly, exactly) if the frame moves under it (an eviction after the final
chunk).
"""
from __future__ import annotations

import torch

from policies import capacity, rope
from policies.evict import max_pool
from policies.slots import Spill

from . import labels
from .calibrate import find_channels
from .rows import make_rows, row_bytes, rows_bytes
from .quotes import Quotes, breaks
from .quotes import grown as quote_grown


def host_rows_bytes(info, kbits: int, vbits: int, cap: int) -> int:
    """Exact host bytes of one layer's spill rows (keys, values, conversation index) grown to
    `cap` rows, recall staging and the token log aside (`main.py plan`, the read's host check)."""
    h, d, dt = info.n_kv_heads, info.head_dim, info.dtype
    return rows_bytes("k", kbits, h, d, dt, cap) + rows_bytes("v", vbits, h, d, dt, cap) + cap * 8 * h


def pool_along_text(s: torch.Tensor, text_order: torch.Tensor, pool: int) -> torch.Tensor:
    """Scores s [H, n] of host rows -> each row's best within pool//2 of it in the text, not
    along host rows (those are in eviction order); text_order [H, n]: the rows sorted by
    conversation index (`hpos.argsort(1)`). pool 1: s."""
    if pool <= 1:
        return s
    text_order = text_order.to(s.device)
    return torch.empty_like(s).scatter_(1, text_order, max_pool(s.gather(1, text_order), pool))


QUOTE_MIN = 16  # shorter quote spans: no token log, no spans, no row map


def quote_span(recall: int, quote: int) -> int:
    """The quote span a spill uses: spans take at most half the buffer."""
    return min(quote, recall // 2)


def row_map_bytes(info, cap: int) -> int:
    """Bytes of one layer's `row_at` over `cap` conversation indices (int32 per KV head)."""
    return cap * 4 * info.n_kv_heads


def merged(spans, end: int) -> list[tuple[int, int]]:
    """[a, b) ranges -> the same positions as sorted disjoint ranges within [0, end)."""
    out: list[list[int]] = []
    for a, b in sorted((max(0, a), min(b, end)) for a, b in spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def near_spans(row_at: torch.Tensor, spans, k_max: int) -> torch.Tensor | None:
    """row_at [H, C] (host row of each conversation index, -1: none), spans [a, b) -> host
    rows [H, k]: each head's rows inside the spans, then its rows nearest a span (by
    distance in the text, then the earlier), k the most rows inside any head's spans (at
    most k_max); None where no head has a row inside. Reads the spans and windows around
    them that widen until every head has k rows: O(span + k) where the tokens near the
    spans are mostly on the host, never more than one pass over C."""
    c = row_at.shape[1]
    ranges = merged(spans, c)
    if not ranges or k_max <= 0:
        return None
    inside = torch.cat([row_at[:, a:b] for a, b in ranges], 1)
    k = min(k_max, int((inside >= 0).sum(1).max()))
    if k == 0:
        return None
    w = k
    while True:
        pos = torch.cat([torch.arange(a, b) for a, b in merged([(a - w, b + w) for a, b in ranges], c)])
        rows = row_at[:, pos]  # [H, P]
        have = int((rows >= 0).sum(1).min())
        if have >= k or w >= c:
            break
        w *= 2
    k = min(k, have)  # (every head holds as many host rows: short only if rows share an index)
    dist = None  # each position's distance to the nearest span (0: inside one)
    for a, b in ranges:
        d = (a - pos).clamp_(min=0) + (pos - (b - 1)).clamp_(min=0)
        dist = d if dist is None else torch.minimum(dist, d)
    key = (dist * c + pos).expand_as(rows).masked_fill(rows < 0, torch.iinfo(torch.long).max)
    pick = key.topk(k, dim=1, largest=False).indices
    return rows.gather(1, pick).long()


def quoted_first(ranked: torch.Tensor, row_at: torch.Tensor, spans) -> torch.Tensor:
    """ranked [H, k] host rows best first, row_at [H, C] (host row of each conversation index,
    -1: none), spans [a, b) -> host rows [H, k], ascending: each head's rows inside the spans,
    then its best-ranked rows not among them. Reads the spans and the ranking only: O(span +
    k), not O(host rows). (A head's rows inside the spans are at most k: spans take at most
    half the buffer.)"""
    k = ranked.shape[1]
    ranked = ranked.cpu()
    ranges = merged(spans, row_at.shape[1])
    if not ranges:
        return ranked.sort(dim=1).values
    inside = torch.cat([row_at[:, a:b] for a, b in ranges], 1).long()  # [H, S]
    out = []
    for h in range(ranked.shape[0]):
        ins = inside[h][inside[h] >= 0][:k]
        rest = ranked[h][~torch.isin(ranked[h], ins)][: k - ins.numel()]
        out.append(torch.cat((ins, rest)).sort().values)
    return torch.stack(out)


class OffloadSpill(Spill):
    """Host tier of one layer: receive() evicted tokens, recall() the best `n_recall` for a query."""

    BLOCK = 256

    def __init__(self, info, layer: int, recall: int, channels: int, every: int, channels_file: str = "",
                 pool: int = 1, quote: int = 0, terms: bool = False, rank: bool = True, kbits: int = 16,
                 vbits: int = 16):
        self.info, self.layer, self.n_recall, self.every, self.pool = info, layer, recall, every, pool
        self.quote = quote_span(recall, quote)
        self.terms = terms  # spans around the question's rare word pairs too (offload/quotes.py)
        # False: the buffer holds span rows only. Measured: label-ranked rows scattered over the
        # document, placed before the kept tokens, make a model under a recency keep set loop
        # on the question's words even with the asked passage recalled whole (BENCHMARKS.md)
        self.rank = rank
        self.quotes: Quotes | None = None  # shared by the cache's spills (link), if quote
        self._qv = -1  # quotes.version this layer's buffer was filled for
        self._owns_log = False  # reports the shared log's bytes
        self._ranked = None  # [Hkv, <=k] host rows by the last scoring, best first
        self._ranked_n = 0  # host rows when it was made
        self._qs = None  # [Hkv, Tq, r] group queries of the last scoring
        self._asking = False  # between a prefill's last-chunk recall and the first decode step
        self._text_order = None  # [Hkv, n] host rows in text order (pool > 1), until the host changes
        # [Hkv, r] label channels; rank=off ranks nothing: no channels, no labels (any model)
        self.ch = find_channels(info, channels, channels_file, "offload")[layer] if rank else None
        self.cuda = info.device.type == "cuda"
        h, d, dt = info.n_kv_heads, info.head_dim, info.dtype
        self.kbits, self.vbits = kbits, vbits
        self.n = 0  # host tokens per KV head
        # [Hkv, cap, D] keys at position 0 / values, at the cache's precision or as KIVI codes
        self.keys = make_rows("k", kbits, h, d, dt, info.device)
        self.vals = make_rows("v", vbits, h, d, dt, info.device)
        self.hpos = torch.empty(h, 0, dtype=torch.long)  # [Hkv, cap] conversation index
        # [Hkv, C] int32: the host row holding each conversation index, -1 where none (with
        # quote spans: a recall finds the spans' rows in O(span), not O(host rows); C is the
        # token log's capacity). None: not kept (no quote spans, or no host rows yet)
        self.row_at: torch.Tensor | None = None
        self.labels = labels.LabelCache(h, self.ch.shape[1], dt, info.device) if rank else None  # [Hkv, cap, r]
        self.buf_k = torch.empty(h, 0, d, dtype=dt, device=info.device)  # [Hkv, <=k, D]
        self.buf_v = torch.empty_like(self.buf_k)
        self.m = 0  # tokens in the buffer
        self.buf_base = 0  # layer.base the buffer was rotated for
        self.recalled = torch.empty(h, 0, dtype=torch.long)  # [Hkv, m] conversation indices
        self.steps = 0  # decode steps since the last prefill
        self.recalls = 0  # host scans so far (tests and benchmarks read it)
        self._copied = None  # CUDA event after the last device->host copy

    @staticmethod
    def link(parts: list["OffloadSpill"]) -> None:
        """Called once by the cache with every layer's spill: one token log and one set of
        quote spans for them all (offload/quotes.py)."""
        if parts[0].quote >= QUOTE_MIN:
            tok = parts[0].info.tokenizer
            words = {} if tok is None else dict(special=tok.all_special_ids, **breaks(tok))
            q = Quotes(parts[0].quote, parts[0].n_recall, parts[0].terms, **words)
            for sp in parts:
                sp.quotes = q
            parts[0]._owns_log = True

    @property
    def token_log(self) -> Quotes | None:
        return self.quotes

    @staticmethod
    def linked_state(parts: list["OffloadSpill"]) -> tuple[dict, dict]:
        q = parts[0].quotes
        return q.state() if q is not None else ({}, {})

    @staticmethod
    def restore_linked(parts: list["OffloadSpill"], tensors: dict, meta: dict) -> None:
        q = parts[0].quotes
        if (q is None) != (not meta):
            raise ValueError("offload: the saved quote log does not match this spec's `quote` option")
        if q is not None:
            q.restore(tensors, meta)

    # ---- host tier ----------------------------------------------------------------------
    @property
    def hk(self) -> torch.Tensor:
        """Host keys [Hkv, cap, D] at the cache's precision (kbits=16)."""
        return self.keys.t

    @property
    def hv(self) -> torch.Tensor:
        return self.vals.t

    def _reserve(self, n: int) -> None:
        cap = self.hpos.shape[1]
        if n <= cap:
            return
        cap = capacity.grown(cap, n, self.BLOCK)
        self.keys.grow(cap, self.n)
        self.vals.grow(cap, self.n)
        pos = torch.empty(self.hpos.shape[0], cap, dtype=torch.long)
        pos[:, : self.n] = self.hpos[:, : self.n]
        self.hpos = pos
        if self.labels is not None:
            self.labels.grow(cap, self.n)

    def _put(self, k0, v, lab, conv) -> None:
        """Append de-rotated keys k0 / values v [Hkv, e, D], labels [Hkv, e, r] (None with
        rank=off), conv [Hkv, e]."""
        e = k0.shape[1]
        if self._copied is not None:
            self._copied.synchronize()  # NOTE: _reserve may copy host rows still in flight
        self._reserve(self.n + e)
        end = self.n + e
        self.keys.write(self.n, k0)
        self.vals.write(self.n, v)
        self.hpos[:, self.n:end] = conv.cpu()
        if self.labels is not None:
            self.labels.write(self.n, lab)
        first, self.n = self.n, end
        if self._maps_rows():
            self._map_rows(first)
        self._text_order = None
        if self.cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _maps_rows(self) -> bool:
        return self.quotes is not None

    def _map_rows(self, first: int = 0, cap: int = 0) -> None:
        """Note host rows first..n-1 in `row_at` (all of them where it is not built), grown to
        the token log's capacity (or `cap`, a saved one)."""
        n, h = self.n, self.hpos.shape[0]
        if self.row_at is None:
            first = 0
            self.row_at = torch.empty(h, 0, dtype=torch.int32)
        conv = self.hpos[:, first:n]
        old = self.row_at.shape[1]
        size = max(self.quotes.ids.shape[0], quote_grown(old, max(cap, int(conv.max()) + 1 if conv.numel() else 0)))
        if size > old:
            grown = torch.full((h, size), -1, dtype=torch.int32)
            grown[:, :old] = self.row_at
            self.row_at = grown
        if conv.numel():
            rows = torch.arange(first, n, dtype=torch.int32).expand(h, -1)
            self.row_at.scatter_(1, conv, rows)

    def receive(self, layer, idx: torch.Tensor) -> None:
        """Receive the tokens at store indices idx [Hkv, e] before the store drops them."""
        if idx.shape[1] == 0:
            return
        k, v = layer.store.dense(idx)  # post-RoPE at positions base + idx
        pos = layer.base + idx
        k0 = rope.rotate(k, -pos, self.info.inv_freq)
        self._put(k0, v, labels.take(k, self.ch) if self.rank else None, layer.positions().gather(1, idx))
        if self._asking and (self._qs is not None or not self.rank):  # evicted by the question's own last chunk
            self._recall(layer, None, rescore=False)  # with the question's queries, before decoding

    def adopt(self, other: "OffloadSpill") -> None:
        """Take over another spill's host tokens (live conversion between stacks)."""
        n = other.n
        if other._copied is not None:
            other._copied.synchronize()
        k0 = other.keys.rows(n)
        if not self.rank:
            lab = None
        elif other.ch is not None and torch.equal(other.ch.cpu(), self.ch.cpu()):
            lab = other.labels[:, :n]
        else:  # other channels or none: labels from the position-0 keys (the eviction frame is gone)
            lab = labels.take(k0.to(self.info.device), self.ch)
        self._put(k0, other.vals.rows(n), lab, other.hpos[:, :n])
        if self.quotes is not None and other.quotes is not None:
            self.quotes.adopt(other.quotes)

    # ---- recall -------------------------------------------------------------------------
    def recall(self, layer, q: torch.Tensor, chunk):
        """q [Hq, T, D] of this chunk -> (k, v) [Hkv, m, D] in the frame, or None."""
        qt = self.quotes
        if qt is not None:
            qt.observe(layer.seen, chunk.input_ids, chunk.phase == "prefill", chunk.final)
        if chunk.phase != "decode":
            self.m, self._asking = 0, False
            if not chunk.final:
                return None
            self.steps = 0
            if qt is not None:
                qt.at_prefill_end()
            self._recall(layer, q)
            self._asking = True
        else:
            self.steps += 1
            self._asking = False
            if qt is not None:
                qt.at_step()
            every = bool(self.every and self.steps % self.every == 0)
            if every or (qt is not None and qt.version != self._qv):
                self._recall(layer, q, rescore=every)
        if self.m == 0:
            return None
        if layer.base != self.buf_base:  # the frame moved: every buffered key moves alike
            delta = torch.full((self.m,), layer.base - self.buf_base, device=self.buf_k.device)
            self.buf_k[:, : self.m] = rope.rotate(self.buf_k[:, : self.m], delta, self.info.inv_freq)
            self.buf_base = layer.base
        return self.buf_k[:, : self.m], self.buf_v[:, : self.m]

    def _recall(self, layer, q: torch.Tensor, rescore: bool = True) -> None:
        """Score every host token, copy the top k into the buffer, rotate them into place.
        rescore=False (the quote spans moved while decoding): rank with the queries of the
        last scoring (the question's), not this step's one query; only the spans change.
        Measured: the city needle is lost when one decode query re-ranks (BENCHMARKS.md,
        Offload)."""
        n = self.n
        if n == 0 or self.n_recall == 0:
            if rescore and q is not None and self.n_recall and self.rank:  # (the last chunk may evict: rank with these)
                self._qs = labels.group_queries(q, self.ch)
            self.m = 0
            return
        self.recalls += 1
        if self._copied is not None:
            self._copied.synchronize()
        if not self.rank:
            return self._recall_spans(layer)
        if rescore or self._qs is None:
            qs = labels.group_queries(q, self.ch)  # [Hkv, Tq, r]
            self._qs = qs  # quote moves and the last chunk's evictions re-rank with these
        else:
            qs = self._qs
        if rescore or self._ranked is None or self._ranked_n != n:
            s = self.labels.scores(qs, n)  # [Hkv, n]
            if self.pool > 1:
                if self._text_order is None:  # NOTE: host rows change only in _put
                    self._text_order = self.hpos[:, :n].argsort(1).to(s.device)
                s = pool_along_text(s, self._text_order, self.pool)
            self._ranked, self._ranked_n = s.topk(min(self.n_recall, n), dim=1).indices, n  # [Hkv, k] best first
        if self.quotes is None:
            idx = self._ranked.sort(dim=1).values.cpu()
        else:  # quoted spans first, in every head; the ranking fills the rest (row_at: built with the rows)
            self._qv = self.quotes.version
            idx = quoted_first(self._ranked, self.row_at, self.quotes.spans)  # [Hkv, m] host rows
        self._fill(layer, idx)

    def _recall_spans(self, layer) -> None:
        """rank=off: the host rows inside the quote spans, as many as the fullest head has
        (at most k); a head with fewer takes the rows nearest a span in the text (nearest
        first, then the earlier). Nothing quoted or named: nothing recalled. The rows are
        found through `row_at` (conversation index -> host row): the spans and a window
        around them are read, never every host row (a decode step that moves the spans costs
        the same at 16K tokens and at 1M)."""
        spans = []
        if self.quotes is not None:
            self._qv = self.quotes.version
            spans = self.quotes.spans
        got = None if self.row_at is None else near_spans(self.row_at, spans, self.n_recall)
        if got is None:
            self.m, self.recalled = 0, self.recalled[:, :0]
            return
        self._fill(layer, got)

    def _fill(self, layer, idx: torch.Tensor) -> None:
        """Copy host rows idx [Hkv, m] into the buffer in text order, rotated into place."""
        n = self.n
        conv = self.hpos[:, :n].gather(1, idx)
        order = conv.argsort(1)  # NOTE: host rows are in eviction order, not conversation order
        idx, conv = idx.gather(1, order), conv.gather(1, order)
        m = idx.shape[1]
        if self.buf_k.shape[1] < m:
            self.buf_k = self.buf_k.new_empty(self.buf_k.shape[0], m, self.buf_k.shape[2])
            self.buf_v = torch.empty_like(self.buf_k)
        self.keys.read(self.buf_k[:, :m], idx, n)  # only these rows are dequantized
        self.vals.read(self.buf_v[:, :m], idx, n)
        pos = torch.arange(layer.base - m, layer.base, device=self.buf_k.device)
        self.buf_k[:, :m] = rope.rotate(self.buf_k[:, :m], pos, self.info.inv_freq)
        self.m, self.buf_base, self.recalled = m, layer.base, conv

    # ---- cache files --------------------------------------------------------------------
    _COUNTS = ("n", "m", "buf_base", "steps", "recalls", "_ranked_n", "_qv")

    def state(self) -> tuple[dict, dict]:
        """Host rows, labels, the recall buffer (decode reads it without a new recall) and the
        last ranking (quote moves re-rank with it)."""
        if self._copied is not None:
            self._copied.synchronize()  # host rows still in flight
        n, m = self.n, self.m
        (tk, mk), (tv, mv) = self.keys.state(n), self.vals.state(n)
        t = {**tk, **tv, "hpos": self.hpos[:, :n],
             **(self.labels.state(n) if self.labels is not None else {}),
             "buf_k": self.buf_k[:, :m], "buf_v": self.buf_v[:, :m], "recalled": self.recalled}
        for name, x in (("ranked", self._ranked), ("qs", self._qs)):
            if x is not None:
                t[name] = x
        meta = {c: getattr(self, c) for c in self._COUNTS}
        meta.update(mk, **mv, cap=self.hpos.shape[1], buf_cap=self.buf_k.shape[1],
                    row_at_cap=self.row_at.shape[1] if self.row_at is not None else 0)
        return t, meta

    def restore(self, tensors: dict, meta: dict) -> None:
        for c in self._COUNTS:
            setattr(self, c, int(meta[c]))
        h, d, dev = self.buf_k.shape[0], self.buf_k.shape[2], self.info.device
        n, m, cap = self.n, self.m, int(meta["cap"])
        if tensors["buf_k"].shape != (h, m, d):
            raise ValueError(f"offload: saved recall buffer {tuple(tensors['buf_k'].shape)} does not fit "
                             f"m={m} [Hkv, T, D]")
        self.keys.restore(tensors, meta, n, cap)
        self.vals.restore(tensors, meta, n, cap)
        self.hpos = torch.zeros(h, cap, dtype=torch.long)
        self.hpos[:, :n] = tensors["hpos"]
        if self.labels is not None:
            self.labels.restore(tensors, n, cap)
        self.buf_k = self.buf_k.new_zeros(h, int(meta["buf_cap"]), d)
        self.buf_v = torch.zeros_like(self.buf_k)
        self.buf_k[:, :m], self.buf_v[:, :m] = tensors["buf_k"], tensors["buf_v"]
        self.recalled = tensors["recalled"].clone()
        self._ranked = tensors["ranked"].to(dev) if "ranked" in tensors else None
        self._qs = tensors["qs"].to(dev) if "qs" in tensors else None
        self._text_order, self._copied, self.row_at = None, None, None
        if self._maps_rows() and n:  # rebuilt from the rows, at the capacity it had (files before it: grown)
            self._map_rows(0, int(meta.get("row_at_cap", 0)))

    # ---- accounting ---------------------------------------------------------------------
    def host_after(self, evictions: list[int], chunks: list[int], kbits: int | None = None,
                   vbits: int | None = None) -> int:
        """Host bytes this layer's spill holds once `evictions` (tokens each eviction sends)
        have arrived and `chunks` more tokens were read: rows grown by the rule `_reserve`
        grows them by, at this spill's kbits/vbits or the ones given, and the token log
        where this layer reports it. Recall staging (CUDA) aside."""
        needs, n = [], self.n
        for e in evictions:
            n += e
            needs.append(n)
        cap = capacity.reserved(needs, self.BLOCK, self.hpos.shape[1])
        rows = host_rows_bytes(self.info, kbits or self.kbits, vbits or self.vbits, cap)
        log = self.quotes.nbytes_after(chunks) if self.quotes is not None else 0
        if self._maps_rows() and n:  # the row map grows with the log, to its capacity
            held = self.row_at.shape[1] if self.row_at is not None else 0
            rows += row_map_bytes(self.info, max(held, log // self.quotes.ids.element_size()))
        return rows + (log if self._owns_log else 0)

    def host_positions(self) -> torch.Tensor | None:
        return self.hpos[:, :self.n] if self.n else None

    def recalled_positions(self) -> torch.Tensor | None:
        return self.recalled if self.n and self.m and self.recalled.shape[-1] == self.m else None

    def token_bytes(self) -> float:
        """Host bytes one evicted token takes in this layer: its keys and values as stored
        (scales and zeros counted per token), its conversation index (int64 per KV head) and,
        where the row map is kept, its entry there (int32 per KV head: one per token read)."""
        h, d, dt = self.info.n_kv_heads, self.info.head_dim, self.info.dtype
        index = (8 + (4 if self._maps_rows() else 0)) * h
        return row_bytes("k", self.kbits, h, d, dt) + row_bytes("v", self.vbits, h, d, dt) + index

    def nbytes(self) -> dict:
        """Exact bytes by (tier, kind): host rows and staging; labels and the buffer in tier "gpu"
        (the compute device: on CPU it is host memory too, but it is what the budget bounds)."""
        host = {"keys": self.keys.nbytes(), "values": self.vals.nbytes(),
                "index": self.hpos.nbytes + (self.row_at.nbytes if self.row_at is not None else 0)}
        if self._owns_log:  # the cache's one token log
            host["index"] += self.quotes.nbytes()
        out = {("host", k): v for k, v in host.items()}
        if self.labels is not None:
            out[("gpu", "labels")] = self.labels.nbytes() + (self._qs.nbytes if self._qs is not None else 0)
        if self._ranked is not None:  # the last label ranking, kept for quote moves
            out[("gpu", "index")] = self._ranked.nbytes
        out[("gpu", "keys")] = self.buf_k.nbytes
        out[("gpu", "values")] = self.buf_v.nbytes
        return out
