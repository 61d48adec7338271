"""The row map: a recall finds the quote spans' host rows through a map from conversation
index to host row (offload/spill.py `row_at`; `near_spans` under rank=off, `quoted_first`
under rank=on), never by a pass over every host row. Checked against the passes they
replace (brute force over every row)."""
from __future__ import annotations

import pytest
import torch

from app.runtime.adapter import Adapter
from offload import labels
from offload.spill import OffloadSpill, merged, near_spans, quoted_first
from test_offload import KeepNewest, cache_with, calibrate_tiny, run_chunks
from tiny import tiny_llama


def _brute(hpos: torch.Tensor, spans, k_max: int):
    """The selection by a pass over every host row: distance to the nearest span, the rows
    inside first, then the nearest (ties: the earlier position) -> (rows [H, k] as sets, k)."""
    dist = None
    for a, b in spans:
        d = (a - hpos).clamp(min=0) + (hpos - (b - 1)).clamp(min=0)
        dist = d if dist is None else torch.minimum(dist, d)
    inside = dist == 0
    if not inside.any():
        return None, 0
    k = min(k_max, int(inside.sum(1).max()))
    out = []
    for h in range(hpos.shape[0]):
        order = sorted(range(hpos.shape[1]), key=lambda r: (int(dist[h, r]), int(hpos[h, r])))
        out.append(set(order[:k]))
    return out, k


def _host(seed: int, heads: int = 3, seen: int = 3000, held: int = 200):
    """Per head: every conversation index but `held` of them on the host, in a shuffled
    (eviction) order -> (hpos [H, n], row_at [H, C])."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(heads):
        perm = torch.randperm(seen, generator=g)
        rows.append(perm[held:])  # the held ones are the first `held` of the permutation
    hpos = torch.stack(rows)
    row_at = torch.full((heads, seen + 100), -1, dtype=torch.int32)
    row_at.scatter_(1, hpos, torch.arange(hpos.shape[1], dtype=torch.int32).expand(heads, -1))
    return hpos, row_at


@pytest.mark.parametrize("seed", range(8))
def test_near_spans_equals_the_pass_over_every_host_row(seed):
    g = torch.Generator().manual_seed(100 + seed)
    hpos, row_at = _host(seed, held=[5, 200, 2000, 2900][seed % 4])
    spans = []
    for _ in range(1 + seed % 4):  # overlapping, at the ends, past the end
        a = int(torch.randint(-50, 3050, (1,), generator=g))
        spans.append((a, a + int(torch.randint(8, 300, (1,), generator=g))))
    for k_max in (16, 64, 512):
        want, k = _brute(hpos, spans, k_max)
        got = near_spans(row_at, spans, k_max)
        if want is None:
            assert got is None
            continue
        assert got.shape == (3, k)
        assert [set(r.tolist()) for r in got] == want


def test_near_spans_widens_its_window_until_every_head_has_k_rows():
    """A head whose tokens around the span are all held (not on the host) takes rows from far
    away: the window doubles until it has them."""
    heads, seen = 2, 5000
    hpos = torch.stack([torch.arange(seen), torch.cat((torch.arange(0, 1000), torch.arange(3000, seen),
                                                       torch.arange(1000, 1000 + 2000)))])
    on_host = hpos[1] < 1000  # head 1: 1000..4999 on the host but 1000..2999 held: drop them
    hpos = torch.stack([hpos[0][:3000], torch.cat((hpos[1][on_host], torch.arange(3000, 5000)))])
    row_at = torch.full((heads, seen), -1, dtype=torch.int32)
    row_at.scatter_(1, hpos, torch.arange(3000, dtype=torch.int32).expand(heads, -1))
    spans = [(1900, 1964)]
    got = near_spans(row_at, spans, 64)
    want, k = _brute(hpos, spans, 64)
    assert k == 64 and [set(r.tolist()) for r in got] == want
    assert set(hpos[1, got[1]].tolist()) == set(range(936, 1000))  # 901..964 away; 3000 is 1036 away


def test_merged_ranges():
    assert merged([(5, 9), (0, 3), (2, 4), (8, 12), (-5, 1), (20, 30)], 25) == [(0, 4), (5, 12), (20, 25)]
    assert merged([(30, 40), (7, 7)], 25) == []


def test_the_spill_keeps_its_row_map_through_growth_and_a_reopen():
    """Every host row is found at its conversation index after the rows and the log grow, and
    a restored spill rebuilds the same map at the same capacity (the bytes it reports too)."""
    ad = Adapter(tiny_llama(0), None)
    doc = torch.randint(3, 250, (6000,), generator=torch.Generator().manual_seed(1))
    opts = {"recall": 64, "quote": 32, "terms": True, "rank": False}
    cache = cache_with(ad, KeepNewest(40), opts)
    run_chunks(ad, cache, doc, [512 * i for i in range(1, 12)] + [6000])
    for layer in cache.layers:
        sp = layer.spill
        at, hpos = sp.row_at, sp.hpos[:, :sp.n]
        assert at.shape[1] == sp.quotes.ids.shape[0] >= 6000  # the log's capacity
        assert torch.equal(at.gather(1, hpos).long(), torch.arange(sp.n).expand_as(hpos))
        assert int((at >= 0).sum()) == hpos.numel()
    t, meta = cache.layers[2].spill.state()
    fresh = cache_with(ad, KeepNewest(40), opts).layers[2].spill
    fresh.restore(t, meta)
    assert torch.equal(fresh.row_at, cache.layers[2].spill.row_at)
    assert fresh.nbytes() == cache.layers[2].spill.nbytes()
    older = {k: v for k, v in meta.items() if k != "row_at_cap"}  # a file from before the map
    fresh = cache_with(ad, KeepNewest(40), opts).layers[2].spill
    fresh.restore(t, older)
    hpos = fresh.hpos[:, :fresh.n]
    assert torch.equal(fresh.row_at.gather(1, hpos).long(), torch.arange(fresh.n).expand_as(hpos))


def _masked(ranked: torch.Tensor, hpos: torch.Tensor, spans) -> torch.Tensor:
    """rank=on's selection by a pass over every host row (the code quoted_first replaced): rows
    inside a span first (a mask over every row), then the ranking, as one top-k."""
    inside = torch.zeros(hpos.shape, dtype=torch.bool)
    for a, b in spans:
        inside |= (hpos >= a) & (hpos < b)
    k = ranked.shape[1]
    rank = torch.full(hpos.shape, -1.0)
    rank.scatter_(1, ranked, torch.arange(k, 0, -1, dtype=rank.dtype).expand(hpos.shape[0], -1))
    return labels.top(rank.masked_fill(inside, float("inf")), k)


@pytest.mark.parametrize("seed", range(8))
def test_quoted_first_equals_the_mask_over_every_host_row(seed):
    """rank=on: each head's rows inside the spans, then its best-ranked others, k in all: the
    same rows as the mask over every host row, reading only the spans and the ranking."""
    g = torch.Generator().manual_seed(200 + seed)
    hpos, row_at = _host(seed, held=[5, 200, 2000, 2900][seed % 4])
    n = hpos.shape[1]
    for k in (16, 64, min(512, n)):
        k = min(k, n)
        spans = []
        for _ in range(1 + seed % 3):  # overlapping, at the ends, past the end: at most k/2 in all
            a = int(torch.randint(-20, 3050, (1,), generator=g))
            spans.append((a, a + max(1, k // 6)))
        ranked = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(3)])  # best first
        got = quoted_first(ranked, row_at, spans)
        assert got.shape == (3, k)
        assert torch.equal(got, _masked(ranked, hpos, spans)), (seed, k, spans)
    assert torch.equal(quoted_first(ranked, row_at, []), ranked.sort(1).values)


def test_rank_on_keeps_the_row_map_with_quote_spans_and_none_without(tmp_path):
    ad = Adapter(tiny_llama(0), None)
    ch = calibrate_tiny(tmp_path / "ch.safetensors")
    cache = cache_with(ad, KeepNewest(40), {"recall": 64, "quote": 32, "channels_file": ch})
    run_chunks(ad, cache, torch.arange(3, 203), [100, 200])
    for layer in cache.layers:
        sp = layer.spill
        assert isinstance(sp, OffloadSpill) and sp.rank
        hpos = sp.hpos[:, :sp.n]
        assert torch.equal(sp.row_at.gather(1, hpos).long(), torch.arange(sp.n).expand_as(hpos))
    cache = cache_with(ad, KeepNewest(40), {"recall": 64, "quote": 0, "channels_file": ch})
    run_chunks(ad, cache, torch.arange(3, 203), [100, 200])
    assert all(layer.spill.row_at is None and layer.spill.quotes is None for layer in cache.layers)
