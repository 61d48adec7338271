"""Recall precision per question: when a question names one of several similar facts, did
`offload`'s recall bring back that fact's tokens, at which rank, and how many of the
recalled fact tokens were the asked one's.

Read right after the question's prefill, before the first decode step (`Runtime.ask`'s
`progress` with done == total: the final chunk read, recalled and evicted after): each
layer's `OffloadSpill` then holds the question's recall. (`on_token` is no such point: a
first token with no text of its own, half a UTF-8 character or a special token, is decoded
before it is called.)

Positions. A spill's `hpos` holds conversation indices: index i is the i-th token the cache
ever read, and `Runtime.held.ids[i]` is that token (the runtime appends every prefilled id and
every decoded one that reached the cache, and cuts both back together); `fact_spans` finds
each value in `held.ids`, so its positions are directly comparable with `hpos`, `recalled` and
the kept tokens' `LayerCache.positions()`.

Per (layer, KV head), with A the asked fact's value tokens and F the tokens of every fact's
value (asked or other):
- *kept*: no token of A is on the host but some is in the kept cache (attention reads it
  with no recall);
- *on host*: some token of A is on the host; then
  - recalled share = |A on the host ∩ recalled| / |A on the host|;
  - rank = the best 0-based rank of a token of A in the head's ranking of every host row
    the question's recall scored (the label scores of `_recall`, pooled along the text as it
    pools them): the number of host rows scoring strictly higher (ties rank alike: pooled
    scores tie by design), so rank < k (the spill's `recall`) means that token is in the
    ranking's top k up to ties at its edge. With quote spans on, the spans
    take part of the buffer and only the ranking's top k - (span tokens) are recalled;
    where the spill kept no queries only the top k is known and a rank past it is
    "unknown, >= k";
  - *late*: every token of A on the host arrived after the question's last ranking: nothing
    ranked it (no rank) and it is not recalled. (A question's final chunk evicts older
    tokens after its recall; the spill ranks those too before the first decode step, so
    this counts only what something else evicted later);
  - precision = |recalled ∩ A| / |recalled ∩ F| where the head recalled any token of F
    (where no other fact exists, one fact or one key's values, it is 1 wherever defined).

Per question (`recall_precision`): `heads` measured, `heads_kept`, `heads_on_host`,
`heads_late` (of those on host), `k`; `asked_recalled` the mean recalled share over the
heads on host; `asked_rank_median` the median rank over the heads on host that have one
(None where that median is past the known top k); `precision` the mean over the heads on
host that recalled any fact token (`precision_heads` of them). Means are None over no heads.
"""
from __future__ import annotations

import bisect
import re
import statistics
from dataclasses import dataclass

import torch

from offload.spill import OffloadSpill, pool_along_text


@dataclass
class Head:
    """One (layer, KV head)'s view of the asked fact."""

    layer: int
    head: int
    kept: int  # tokens of A in the kept cache
    host: int  # tokens of A on the host
    recalled: int  # of those, recalled
    rank: float | None  # best rank of A; inf: past the known top k; None: A not scored (late or not on host)
    facts: int  # recalled tokens of any fact's value (the asked fact's among them: `recalled`)


def has_offload(cache) -> bool:
    return any(isinstance(layer.spill, OffloadSpill) for layer in cache.layers)


def _pieces(tok, ids: list[int]) -> list[str]:
    """The text of each token in context (a token's piece is what it adds after the one before:
    tokenizers that drop a word's leading space when decoded alone keep it so)."""
    if not ids:
        return []
    one = tok.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    two = tok.batch_decode([list(p) for p in zip(ids, ids[1:])], clean_up_tokenization_spaces=False)
    return one[:1] + [ab[len(a):] if ab.startswith(a) else b for a, ab, b in zip(one, two, one[1:])]


def fact_spans(rt, facts, end: int | None = None) -> dict[str, set[int]]:
    """Conversation positions of each fact's value tokens: facts have `.name` and `.value`
    (a digit string, found as a whole digit run in the first `end` tokens, exactly once);
    facts of one name (a multi-value key) share one set. -> {name: positions}."""
    if len(rt.held.ids) != rt.cache.seen:
        raise ValueError(f"recall precision: the runtime holds {len(rt.held.ids):,} token ids but its cache read "
                         f"{rt.cache.seen:,} tokens (read outside the conversation?): positions would not match")
    pieces = _pieces(rt.tok, rt.held.ids[:end])
    starts, at = [], 0
    for p in pieces:
        starts.append(at)
        at += len(p)
    text = "".join(pieces)
    out: dict[str, set[int]] = {}
    for f in facts:
        found = [m.start() for m in re.finditer(rf"(?<!\d){re.escape(f.value)}(?!\d)", text)]
        if len(found) != 1:
            raise ValueError(f"recall precision: the value {f.value} of {f.name} occurs {len(found)} times in the "
                             f"first {len(pieces):,} tokens of the conversation; it must occur once")
        a = found[0]
        first, last = bisect.bisect_right(starts, a) - 1, bisect.bisect_left(starts, a + len(f.value))
        out.setdefault(f.name, set()).update(range(first, last))
    return out


def pooled(s: torch.Tensor, conv: torch.Tensor, pool: int) -> torch.Tensor:
    """Scores s [H, n] of host rows at conversation indices conv [H, n], pooled along the text
    as `OffloadSpill._recall` ranks them (pool 1: s)."""
    return pool_along_text(s, conv.argsort(1), pool)


def question_scores(sp: OffloadSpill) -> torch.Tensor | None:
    """[Hkv, n0] float32 (CPU): the scores the last scoring ranked the first n0 host rows by
    (n0: the host as that recall saw it); None where the spill kept no queries."""
    n0 = sp._ranked_n if sp._ranked is not None else 0
    if sp._qs is None or n0 == 0:
        return None
    return pooled(sp.labels.scores(sp._qs, n0), sp.hpos[:, :n0], sp.pool).cpu()


def span_shares(conv: torch.Tensor, got: torch.Tensor, span: set[int]) -> list[float | None]:
    """Per head, the share of span's tokens among conv [H, n] (conversation indices on the
    host) that are in got [H, m] (conversation indices chosen); None where none is on the host."""
    want = torch.tensor(sorted(span), dtype=torch.long)
    out = []
    for c, g in zip(conv.cpu(), got.cpu()):
        on = c[torch.isin(c, want)]
        out.append(float(torch.isin(on, g).sum()) / len(on) if len(on) else None)
    return out


@torch.inference_mode()
def heads(rt, asked: set[int], others: list[set[int]]) -> list[Head]:
    """A Head per (layer, KV head) of every layer whose spill is an OffloadSpill."""
    a = torch.tensor(sorted(asked), dtype=torch.long)
    f = torch.tensor(sorted(asked.union(*others)), dtype=torch.long)
    out = []
    for i, layer in enumerate(rt.cache.layers):
        sp = layer.spill
        if not isinstance(sp, OffloadSpill):
            continue
        n0 = sp._ranked_n if sp._ranked is not None else 0
        conv = sp.hpos[:, :sp.n]  # [Hkv, n] conversation index of each host row
        on = torch.isin(conv, a)
        kept = torch.isin(layer.positions().cpu(), a).sum(1)  # [Hkv]
        rec = sp.recalled.cpu() if sp.m else torch.empty(conv.shape[0], 0, dtype=torch.long)  # [Hkv, m]
        rec_a, rec_f = torch.isin(rec, a).sum(1), torch.isin(rec, f).sum(1)
        s = question_scores(sp)
        for h in range(conv.shape[0]):
            rank = None
            scored = on[h, :n0]
            if scored.any():
                if s is not None:
                    rank = float((s[h] > s[h, scored].max()).sum())
                else:  # only the top k is known
                    top = torch.isin(sp.hpos[h].gather(0, sp._ranked[h].cpu()), a).nonzero()
                    rank = float(top[0, 0]) if len(top) else float("inf")
            # NOTE: recalled rows are host rows, so recalled ∩ A = (A on the host) ∩ recalled
            out.append(Head(i, h, int(kept[h]), int(on[h].sum()), int(rec_a[h]), rank, int(rec_f[h])))
    return out


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def summarize(hs: list[Head], k: int) -> dict:
    """The per-question numbers of the module docstring from per-head ones."""
    host = [h for h in hs if h.host]
    ranks = [h.rank for h in host if h.rank is not None]
    med = statistics.median(ranks) if ranks else None
    prec = [h.recalled / h.facts for h in host if h.facts]
    return {"heads": len(hs), "heads_kept": sum(1 for h in hs if h.kept and not h.host),
            "heads_on_host": len(host), "heads_late": len(host) - len(ranks), "k": k,
            "asked_recalled": _mean([h.recalled / h.host for h in host]),
            "asked_rank_median": None if med is None or med == float("inf") else med,
            "precision": _mean(prec), "precision_heads": len(prec)}


def recall_precision(rt, asked: set[int], others: list[set[int]]) -> dict:
    """The asked fact's recall now, from every layer's spill (module docstring): asked and
    others are conversation positions of the asked fact's and the other facts' value tokens."""
    k = next(layer.spill.n_recall for layer in rt.cache.layers if isinstance(layer.spill, OffloadSpill))
    return summarize(heads(rt, asked, others), k)


def average(per_question: list[dict]) -> dict:
    """A bench row's numbers from its questions': the means of asked_recalled, precision,
    heads_on_host and heads_kept; asked_rank the median of the questions' medians (a mean of
    ranks would be one far rank). None where no question has the number."""
    def col(key):
        return [q[key] for q in per_question if q.get(key) is not None]
    ranks = col("asked_rank_median")
    return {"asked_recalled": _mean(col("asked_recalled")),
            "asked_rank": statistics.median(ranks) if ranks else None,
            "precision": _mean(col("precision")), "heads_on_host": _mean(col("heads_on_host")),
            "heads_kept": _mean(col("heads_kept"))}
