"""One registry-parametrized conformance test over every registered policy.

For each policy: (1) with a budget >= the context and lossless storage it equals `full`
(prefill logits and greedy answers); (2) its bytes by (tier, kind) equal a count made by
hand from its buffers' shapes; (3) an evicting selector keeps exactly its budget per KV
head (`anchor`: at most); (4) it can be switched to live from `full` (in place, or by a
clean re-read).
"""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from app.runtime.engine import Runtime
from app.runtime.prefill import chunk_plan, prefill
from policies import REGISTRY, SpecError
from policies.base import FullStore
from policies.kivi import KiviStore
from tiny import random_heads, tiny_pair

NAMES = sorted(REGISTRY)
CHUNK = 32
N = 200  # context tokens; the tiny model's window is 512

# name -> spec that keeps everything losslessly (budgets >= the context).
LOSSLESS = {
    "full": "full", "streaming": "streaming:window=4096", "h2o": "h2o:budget=4096",
    "snapkv": "snapkv:budget=4096", "anchor": "anchor:budget=4096,local=4000",
    "lighttransfer": "lighttransfer:window=4096", "ffnskip": "ffnskip:cold=3:0,threshold=0",
    "kivi": "kivi:group=16,residual=512", "locret": "locret:budget=4096,stabilizers=8,local=10,heads={heads}",
}
# name -> (spec with a small budget, tokens kept per KV head after a non-final chunk, exact?)
SMALL = {
    "streaming": ("streaming:sinks=4,window=60", 64, True),
    "h2o": ("h2o:budget=64,recent=16,local=0", 64, True),
    "snapkv": ("snapkv:budget=64,window=8,local=0", 64, True),
    "anchor": ("anchor:budget=64,local=16,sinks=4", 64, False),
    "locret": ("locret:budget=64,stabilizers=8,local=0,heads={heads}", 64, True),
    "lighttransfer": ("lighttransfer:sinks=4,window=60", 64, True),
}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Random retaining heads for the tiny model (locret ships none for it)."""
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=CHUNK)
    info = rt.adapter.info
    return str(random_heads(info, tmp_path_factory.mktemp("heads") / "heads.safetensors", seed=5))


def _spec(table, name, heads):
    if name not in table:
        return None
    entry = table[name]
    spec = entry if isinstance(entry, str) else entry[0]
    return spec.format(heads=heads)


def _rt(spec, seed=0):
    m, t = tiny_pair(seed)
    try:
        return Runtime.from_model(m, t, policy=spec, model_id="tiny", chunk_size=CHUNK)
    except SpecError as e:
        if "ship" not in str(e):
            raise
        pytest.skip(f"`{spec}` needs shipped files the tiny model has none of: {e}")


def _ids(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (n,), generator=g)
    ids[::17] = ord(".") + 4  # some separators, so `anchor` has anchors
    return ids.tolist()


def _hand_count(cache) -> Counter:
    """Bytes by (tier, kind) from the buffers' shapes, independently of `nbytes()`."""
    out = Counter()
    for l in cache.layers:
        s = l.store
        if l.spill is not None or l.reader is not None:
            return None  # their own bytes: counted in their own tests
        if isinstance(s, FullStore):
            per = s.k.shape[0] * s.k.shape[1] * s.k.shape[2] * s.k.element_size()
            assert s.k.shape[1] >= s.length and s.k.shape[1] % FullStore.BLOCK == 0
            out[(s.tier, "keys")] += per
            out[(s.tier, "values")] += per
        elif isinstance(s, KiviStore):
            sz = lambda t: t.numel() * t.element_size()  # noqa: E731
            out[("gpu", "codes")] += sz(s.kc) + sz(s.vc)
            out[("gpu", "scales")] += sz(s.ks) + sz(s.vs)
            out[("gpu", "zeros")] += sz(s.kz) + sz(s.vz)
            out[("gpu", "residual")] += sz(s.kr) + sz(s.vr) + (
                sum(sz(t) for t in s.pending) if s.pending is not None else 0)
        else:
            return None
        if l.pos is not None:
            assert l.pos.shape == (cache.info.n_kv_heads, l.length)
            out[(s.tier, "index")] += l.pos.numel() * 8
        if l.scores is not None:
            assert l.scores.shape == (cache.info.n_kv_heads, l.length)
            out[(s.tier, "scores")] += l.scores.numel() * 4
    return +out


@pytest.mark.parametrize("name", NAMES)
def test_lossless_equals_full(name, heads):
    spec = _spec(LOSSLESS, name, heads) or name
    ref, rt = _rt("full"), _rt(spec)
    ids = _ids()
    a, b = ref.prefill(ids), rt.prefill(ids)
    assert rt.cache.length == rt.cache.seen == N
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    ra, rb = ref.ask("what is it?", max_new_tokens=8), rt.ask("what is it?", max_new_tokens=8)
    assert ra.answer == rb.answer and ra.new_tokens == rb.new_tokens


@pytest.mark.parametrize("name", NAMES)
def test_nbytes_exact(name, heads):
    spec = _spec(SMALL, name, heads) or _spec(LOSSLESS, name, heads) or name
    rt = _rt(spec)
    rt.prefill(_ids())
    rt.ask("and then?", max_new_tokens=5)
    want = _hand_count(rt.cache)
    if want is None:
        pytest.skip(f"`{name}` uses a store this test cannot count by hand")
    assert +rt.cache.nbytes() == want
    assert rt.cache.peak_bytes >= sum(want.values()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_eviction_keeps_budget(name, heads):
    if name not in SMALL:
        entry = REGISTRY[name]
        assert entry.slot != "selector" or name == "full", f"add `{name}` to SMALL"
        pytest.skip(f"`{name}` does not evict")
    spec, budget, exact = SMALL[name]
    rt = _rt(spec.format(heads=heads))
    ids = _ids()
    plan = chunk_plan(rt.cache, len(ids), rt.chunk_size)
    assert len(plan) > 3
    ends = list(itertools.accumulate(plan))

    def check(done, total):  # after each chunk, its eviction done
        i = ends.index(done)
        n, final = plan[i], done == total
        cap = budget + (n if final else 0)
        for l in rt.cache.layers:
            lazy = getattr(l.selector, "lazy", True)
            if exact and lazy:
                assert l.length == min(done, cap), (name, i, l.layer)
            elif lazy:
                assert l.length <= min(done, cap)
            else:
                assert l.length == done  # a full (non-lazy) lighttransfer layer
            p = l.positions()
            assert p.shape == (rt.cache.info.n_kv_heads, l.length)
            assert bool((p[:, 1:] > p[:, :-1]).all())  # order kept, no duplicates
            assert l.base + l.length == rt.cache.next_position  # the positions invariant
    prefill(rt.adapter, rt.cache, ids, plan=plan, progress=check)
    if name == "lighttransfer":
        assert len(rt.cache.layers[0].selector.shared.lazy) == 2  # round(0.5 * 3 layers)


@pytest.mark.parametrize("name", NAMES)
def test_live_conversion_from_full(name, heads):
    spec = _spec(SMALL, name, heads) or _spec(LOSSLESS, name, heads) or name
    _rt(spec)  # skips a policy that needs shipped files
    rt = _rt("full")
    rt.ask("x" * 200 + " what is it?", max_new_tokens=6)
    seen = rt.cache.seen
    res = rt.set_policy(spec)
    assert rt.policy == rt.cache.spec
    if res.reprefilled:
        assert rt.cache.seen > 0 and "re-read" in res.message
    else:
        assert rt.cache.seen == seen
    if name in SMALL:
        budget = SMALL[name][1]
        assert all(l.length <= budget + CHUNK for l in rt.cache.layers
                   if getattr(l.selector, "lazy", True))
    r = rt.ask("and?", max_new_tokens=4)
    assert r.new_tokens >= 0 and rt.cache.seen > seen
