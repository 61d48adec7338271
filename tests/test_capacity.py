"""The capacity rule (policies/capacity.py) against real caches: the tokens it says a layer
holds after every chunk of a read, after an answer and through a second read that starts
above the budget are what the live caches hold, exactly; `main.py plan`'s estimate, which
asks the same rule, says what they hold and what their buffers take."""
from __future__ import annotations

import pytest
import torch

from app.runtime import estimate
from app.runtime.describe import model_of
from app.runtime.engine import Runtime
from app.runtime.prefill import prefill
from policies import Chunk, capacity
from tiny import tiny_pair, tiny_policy_files

CHUNK, N, ANSWER, MORE = 32, 300, 8, 100
LOCRET = "locret:budget=64,stabilizers=8,local=10,heads={heads}"
OFFLOAD = "offload:channels_file={ch}"

# tokens held exactly as the rule says (every layer keeps its whole budget)
EXACT = ["full", "kivi:group=16", LOCRET, LOCRET + "+kivi:group=16", LOCRET.replace("local=10", "local=10,chunk=48"),
         "streaming:sinks=4,window=60", "snapkv:budget=64,window=8,local=10", "h2o:budget=64,recent=16,local=10",
         "offload", "streaming:sinks=4,window=60+" + OFFLOAD, LOCRET + "+" + OFFLOAD,
         "doublesparse:channels_file={ch}"]
# selectors that may keep less than the rule's count
BOUND = ["anchor:budget=64,local=16,sinks=4", "lighttransfer:sinks=4,window=60"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("files"))


def _rt(spec: str, files) -> Runtime:
    return Runtime.from_model(*tiny_pair(0), policy=spec.format(heads=files["heads"], ch=files["ch"]),
                              model_id="tiny", chunk_size=CHUNK)


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (n,), generator=g)
    ids[::13] = ord(".") + 4  # separators, so `anchor` has anchors
    return ids.tolist()


def _read(rt, n: int, seed: int) -> list[int]:
    """Read n tokens into rt's cache -> its length once each chunk is appended (before the
    selectors evict)."""
    seen = []
    prefill(rt.adapter, rt.cache, _ids(n, seed), CHUNK, on_chunk=lambda c, logits: seen.append(rt.cache.length))
    return seen


def _answer(rt, n: int) -> None:
    for t in _ids(n, 99):
        c = Chunk(torch.tensor([t]), rt.cache.next_position, "decode")
        rt.adapter.forward(c.input_ids, rt.cache, c)


def _turns(rt):
    """Two reads, each followed by an answer; per read -> (the rule's lengths, projected_length,
    the live lengths once each chunk was appended, after the read, after the answer)."""
    cache = rt.cache
    out = []
    for n, seed in ((N, 0), (MORE, 1)):
        want = capacity.lengths(cache.layers[0].selector, n, CHUNK, cache.length, ANSWER)
        projected = cache.projected_length(n, CHUNK, ANSWER)
        appended = _read(rt, n, seed)
        read = cache.length
        _answer(rt, ANSWER)
        out.append((want, projected, appended, read, cache.length))
    return out


@pytest.mark.parametrize("spec", EXACT)
def test_the_rule_is_what_the_cache_holds(spec, files):
    rt = _rt(spec, files)
    turns = _turns(rt)
    if rt.cache.evicts:  # the second read starts past the budget (the answer sits on top of it)
        assert turns[1][0][0] > rt.cache.layers[0].selector.budget
    for want, projected, appended, read, end in turns:
        chunks = want[1:len(want) - ANSWER]  # (appended, kept) per chunk
        assert appended == chunks[0::2]
        assert read == chunks[-1] and end == want[-1] == read + ANSWER
        assert projected == max(want) == max(want[0], *appended, end)
    assert all(layer.length == rt.cache.length for layer in rt.cache.layers)


@pytest.mark.parametrize("spec", BOUND)
def test_the_rule_bounds_what_a_sparing_selector_holds(spec, files):
    for want, projected, appended, read, end in _turns(_rt(spec, files)):
        chunks = want[1:len(want) - ANSWER]
        assert all(a <= b for a, b in zip(appended, chunks[0::2])) and len(appended) == len(chunks) // 2
        assert read <= chunks[-1] and end <= want[-1] and projected == max(want)


# spec -> whether the estimate's bytes are the live cache's, to the byte (else: its held tokens only)
PLAN = {"full": True, LOCRET: True, "streaming:sinks=4,window=60": True, "offload": True,
        "kivi:group=16": False, LOCRET + "+kivi:group=16": False, "streaming:sinks=4,window=60+" + OFFLOAD: False}


@pytest.mark.parametrize("spec", sorted(PLAN))
def test_plan_holds_what_the_cache_holds(spec, files):
    rt = _rt(spec, files)
    _read(rt, N, 0)
    _answer(rt, ANSWER)
    got = estimate.estimate(model_of(rt), rt.policy, N, CHUNK, ANSWER, "fp32", "cpu")
    assert got["held"] == rt.cache.length
    tiers = rt.cache.bytes_by_tier()
    if PLAN[spec]:
        assert (got["kv_gpu_end"], got["kv_host_end"]) == (tiers["gpu"], tiers["host"])
    if "+offload" in spec:  # the spill's host rows (keys, values, index) grow by the same rule, and
        # its row map (quote spans are on by default) with the token log's capacity
        rows = sum(l.spill.hk.nbytes + l.spill.hv.nbytes + l.spill.hpos.nbytes + l.spill.row_at.nbytes
                   for l in rt.cache.layers)
        assert got["kv_host_end"] == rows > 0


def test_growth_is_amortized_in_whole_blocks():
    """One token at a time: 256, then an eighth more each time it is full, in blocks of 256
    (288 -> 512, 576 -> 768, ..., 3744 -> 3840, 4320 -> 4352)."""
    caps = [capacity.reserved(range(1, n + 1), 256) for n in (1, 256, 257, 300, 3841, 4097)]
    assert caps == [256, 256, 512, 512, 4352, 4352]
    assert capacity.grown(1000, 900, 256) == 1000 and capacity.grown(1024, 1025, 256) == 1280
    assert capacity.grown(1024, 5000, 256) == 5120
