"""Behaviour of streaming, h2o, snapkv, anchor, lighttransfer and ffnskip beyond conformance."""
from __future__ import annotations

import json

import pytest
import torch

from app.runtime.engine import Runtime
from app.runtime.prefill import chunk_plan, prefill
from policies import Chunk, SpecError, parse_spec
from policies.anchor import WARNING, anchor_ids
from policies.ffnskip import calibrate, resolve_cold, save_calibration
from policies.base import FullStore
from policies.kivi import KiviStore
from policies.lighttransfer import LazyPlan
from tiny import tiny_pair


def _rt(spec, seed=0, model_id="tiny", chunk=32):
    m, t = tiny_pair(seed)
    return Runtime.from_model(m, t, policy=spec, model_id=model_id, chunk_size=chunk)


def _feed(rt, ids, final_last=True):
    """Prefill ids chunk by chunk as the runtime does; returns the chunks' lengths."""
    plan = chunk_plan(rt.cache, len(ids), rt.chunk_size)
    prefill(rt.adapter, rt.cache, ids, plan=plan, final=final_last)
    return plan


def _ids(n, seed=0):
    return torch.randint(4, 260, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_streaming_keeps_sinks_and_newest():
    rt = _rt("streaming:sinks=4,window=40")
    _feed(rt, _ids(200), final_last=False)
    for l in rt.cache.layers:
        want = list(range(4)) + list(range(160, 200))
        assert l.positions()[0].tolist() == want and l.positions()[1].tolist() == want
    assert rt.cache.next_position == 44  # compacted positions


def test_h2o_mass_is_attention_probability():
    """One chunk: every query spreads mass 1 per query head, so a KV head's scores sum to
    group * T; eviction keeps the recent window plus the highest-mass rest."""
    rt = _rt("h2o:budget=48,recent=8,local=0,chunk=64")
    ids = _ids(64)
    c = Chunk(torch.tensor(ids), 0, final=False)
    rt.adapter.forward(c.input_ids, rt.cache, c)
    g = rt.adapter.info.group
    for l in rt.cache.layers:
        torch.testing.assert_close(l.scores.sum(1), torch.full((l.scores.shape[0],), g * 64.0))
    before = [l.scores.clone() for l in rt.cache.layers]
    rt.cache.end_chunk(c)
    for l, s in zip(rt.cache.layers, before):
        kept = l.positions()
        assert kept.shape[1] == 48 and bool((kept[:, -8:] == torch.arange(56, 64)).all())
        rest = s[:, :56].topk(40, dim=1).indices.sort(1).values
        assert torch.equal(kept[:, :40], rest)


def test_snapkv_votes_come_from_the_last_queries():
    rt = _rt("snapkv:budget=48,window=8,kernel=1,local=0,chunk=64")
    c = Chunk(torch.tensor(_ids(64)), 0, final=False)
    rt.adapter.forward(c.input_ids, rt.cache, c)
    g = rt.adapter.info.group
    for l in rt.cache.layers:  # 8 voting queries x group heads, each a distribution
        torch.testing.assert_close(l.scores.sum(1), torch.full((l.scores.shape[0],), g * 8.0))
    # decode tokens score 0 and are re-voted by the next prefill chunk
    d = Chunk(torch.tensor([7]), rt.cache.next_position, "decode")
    rt.cache.end_chunk(c)
    rt.adapter.forward(d.input_ids, rt.cache, d)
    assert all(float(l.scores[:, -1].abs().sum()) == 0 for l in rt.cache.layers)


def test_snapkv_is_query_aware_final_chunk_votes():
    """The last `local` tokens (the question) form the final chunk: it is kept whole and its
    queries choose the rest."""
    rt = _rt("snapkv:budget=40,window=8,local=20", chunk=32)
    plan = _feed(rt, _ids(150))
    assert plan[-1] == 20
    for l in rt.cache.layers:
        assert l.length == 40 + 20
        assert bool((l.positions()[:, -20:] == torch.arange(130, 150)).all())


def test_anchor_separator_variant_and_budget():
    m, tok = tiny_pair(0)
    ids, anllm = anchor_ids(tok, "tiny")
    assert not anllm
    text_ids = [tok.convert_tokens_to_ids(c) for c in (".", ",", "?", "Ċ", ":")]
    assert set(text_ids) <= ids and tok.convert_tokens_to_ids("a") not in ids
    rt = _rt("anchor:budget=40,sinks=4,local=8")
    assert rt.cache.layers[0].selector.warning == WARNING and rt.policy_warnings() == [WARNING]
    assert _rt("snapkv:budget=40").policy_warnings() == []
    a = tok.convert_tokens_to_ids("a")
    seq = [t if t not in ids else a for t in _ids(200)]
    for p in range(5, 200, 5):
        seq[p] = tok.convert_tokens_to_ids(".")
    _feed(rt, seq, final_last=False)
    pos = rt.cache.layers[0].positions()[0].tolist()
    assert len(pos) == 40 and pos[:4] == [0, 1, 2, 3] and pos[-8:] == list(range(192, 200))
    assert pos[4:-8] == list(range(5, 192, 5))[-28:]  # over budget: the newest anchors stay
    assert all(torch.equal(l.positions()[0], l.positions()[1]) for l in rt.cache.layers)


def test_anchor_anllm_keeps_anchors_and_unfinished_sentence():
    rt = _rt("anchor:budget=64,sinks=2,local=0", model_id="pangjh3/AnLLM-EP-7B-PT")
    sel = rt.cache.layers[0].selector
    assert sel.anllm and sel.warning == "" and rt.policy_warnings() == []
    dot = rt.tok.convert_tokens_to_ids(".")
    assert set(sel.ids.tolist()) == {dot}
    seq = _ids(90)
    seq = [t if t != dot else dot + 1 for t in seq]
    for p in (20, 45, 70):
        seq[p] = dot
    _feed(rt, seq, final_last=False)
    assert rt.cache.layers[1].positions()[0].tolist() == [0, 1, 20, 45, 70] + list(range(71, 90))


def test_lazy_plan_bounded_heap():
    ratios = [0.3, 0.9, 0.5, 0.95, 0.1, 0.7]
    plan = LazyPlan(6, 0.5)
    full_now = []
    for i, r in enumerate(ratios):
        plan.offer(i, r)
        full_now.append(i + 1 - len(plan.lazy))
    assert plan.decided and plan.lazy == {1, 3, 5}  # the three highest ratios
    assert max(full_now) <= 3  # never more than n_full layers unknown-or-full
    assert full_now[-1] == 3


def test_lighttransfer_lazy_layers_stream_full_layers_keep_all():
    rt = _rt("lighttransfer:sinks=4,window=40,queries=8", chunk=64)
    _feed(rt, _ids(600), final_last=False)
    plan = rt.cache.layers[0].selector.shared
    assert plan.decided and len(plan.ratios) == 3 and len(plan.lazy) == 2
    for l in rt.cache.layers:
        assert l.length == (44 if l.layer in plan.lazy else 600)
        assert l.base + l.length == rt.cache.next_position == 600
    lazy = max(plan.lazy)  # decided early, so its buffer never grew past one block
    assert 2 * sum(rt.cache.layers[lazy].nbytes().values()) < sum(
        rt.cache.layers[min(set(range(3)) - plan.lazy)].nbytes().values())
    r = rt.ask("hello?", max_new_tokens=4)  # decoding over mixed layers works
    assert r.new_tokens >= 0


def test_lighttransfer_with_kivi_quantizes_only_full_layers():
    rt = _rt("lighttransfer:sinks=4,window=40+kivi:group=16,residual=32")
    _feed(rt, _ids(200), final_last=False)
    lazy = rt.cache.layers[0].selector.shared.lazy
    assert len(lazy) == 2
    for l in rt.cache.layers:
        kinds = {k for _, k in l.nbytes()}
        if l.layer in lazy:  # streaming layer: full precision, sinks + window
            assert isinstance(l.store, FullStore) and "codes" not in kinds and l.length == 44
        else:
            assert isinstance(l.store, KiviStore) and "codes" in kinds and l.length == 200
    r = rt.ask("hello?", max_new_tokens=3)
    assert r.new_tokens >= 0


def test_ffnskip_prefill_never_skips_and_warmup_is_dense():
    ref = _rt("full")
    rt = _rt("ffnskip:threshold=0,warmup=3,cold=1:0")
    ids = _ids(80)
    torch.testing.assert_close(rt.prefill(ids), ref.prefill(ids))
    assert rt.cache.ffn.ratio() == 0.0
    a = ref.ask("hi", max_new_tokens=8)
    b = rt.ask("hi", max_new_tokens=8)
    assert a.answer[:1] == b.answer[:1]
    # threshold 0: from the 4th decode forward on, layer 1 triggers and layer 2 is skipped;
    # every generated token is fed back (finish "length"), so there were new_tokens forwards
    dec = b.new_tokens
    assert b.finish == "length" and b.ffn_skip_ratio == pytest.approx(max(0, dec - 3) / (3 * dec))
    assert a.ffn_skip_ratio is None


def test_ffnskip_high_threshold_skips_nothing():
    ref, rt = _rt("full"), _rt("ffnskip:threshold=1,warmup=0,cold=1:1")
    assert ref.ask("hello", max_new_tokens=10).answer == rt.ask("hello", max_new_tokens=10).answer


def test_ffnskip_calibration_roundtrip(tmp_path):
    cos = torch.tensor([[0.5, 0.8, 0.99, 0.995, 0.7], [0.6, 0.9, 0.98, 0.99, 0.8]])
    assert calibrate(cos, 0.95) == (2, 1)
    f = tmp_path / "c.json"
    data = save_calibration(f, "tiny", cos, 0.95)
    assert json.loads(f.read_text())["first"] == data["first"] == 2
    info = _rt("full").adapter.info
    with pytest.raises(SpecError, match="5-layer|3-layer"):
        resolve_cold(str(f), info)
    assert resolve_cold("1:1", info)[:2] == (1, 1)
    with pytest.raises(SpecError, match="exceed"):
        resolve_cold("2:2", info)
    with pytest.raises(SpecError, match="first:last"):
        resolve_cold("4,4x", info)


def test_option_errors_name_the_option():
    for spec, word in [("h2o:budget=10,recent=10", "recent"), ("snapkv:kernel=4", "kernel"),
                       ("anchor:budget=10,local=20", "local"), ("lighttransfer:lazy=2", "lazy"),
                       ("streaming:window=0", "window")]:
        with pytest.raises(SpecError, match=word):
            parse_spec(spec)
