"""Locret: retaining-head selector, eviction, compacted positions, heads files, training."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.runtime.engine import Runtime
from app.runtime.prefill import chunk_plan, prefill
from policies import Chunk, KVCache, SpecError, parse_spec
from policies.locret import fold_qkv, load_heads
from tiny import random_heads, tiny_pair


def _runtime(spec="full", seed=0, **over):
    m, t = tiny_pair(seed, **over)
    return Runtime.from_model(m, t, policy=spec, model_id="tiny", chunk_size=16)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 260, (n,), generator=g).tolist()


def test_budget_covering_context_equals_full(tmp_path):
    ref = _runtime("full")
    f = random_heads(ref.adapter.info, tmp_path / "heads.safetensors")
    rt = _runtime(f"locret:budget=4096,stabilizers=8,local=10,heads={f}")
    ids = _ids(300)
    a, b = ref.prefill(ids), rt.prefill(ids)
    assert rt.cache.length == 300 and rt.cache.seen == 300
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    ra = ref.ask("what is it?", max_new_tokens=12)
    rb = rt.ask("what is it?", max_new_tokens=12)
    assert ra.answer == rb.answer


def test_plan_holds_back_local():
    rt = _runtime("full")
    from policies.locret import LocretSelector
    sel = LocretSelector.__new__(LocretSelector)
    sel.local = 10
    assert sel.plan(105, 32) == [32, 32, 31, 10]
    assert sel.plan(7, 32) == [7]
    sel.local = 0
    assert sel.plan(70, 32) == [32, 32, 6]
    assert rt is not None


@pytest.mark.parametrize("share", ["off", "on"])
def test_eviction_keeps_budget_top_scores_and_stabilizers(tmp_path, share):
    """share=off: each head keeps its own best; share=on: the scores of a chunk's tokens
    become their mean over every layer and head first, so every layer keeps the same."""
    rt = _runtime("full")
    f = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    rt = _runtime(f"locret:budget=32,stabilizers=8,local=10,chunk=16,share={share},pool=3,heads={f}")
    cache = rt.cache
    plan = chunk_plan(cache, 150, rt.chunk_size)
    assert plan[-1] == 10 and sum(plan) == 150
    at = {}  # what the chunk being read left before its eviction

    def before_eviction(chunk, _logits):
        n = chunk.n
        if share == "on":
            from policies.locret import _pool
            new = _pool(torch.stack([l.scores[:, -n:] for l in cache.layers]).mean((0, 1))[None], 3)[0]
            cache._share_scores(cache.layers[0].selector)  # end_chunk's own call is then a no-op
            for l in cache.layers:
                torch.testing.assert_close(l.scores[:, -n:], new.expand(l.scores.shape[0], -1))
        at["before"] = [(l.positions().clone(), l.scores.clone()) for l in cache.layers]
        at["final"] = chunk.final

    def after_eviction(done, _total):
        if share == "on":
            assert all(torch.equal(l.positions(), cache.layers[0].positions().expand_as(l.positions()))
                       for l in cache.layers), "every layer and head keeps the same tokens"
        for l, (pos0, sc0) in zip(cache.layers, at["before"]):
            kept = l.positions()
            if at["final"]:
                assert l.length == min(done, 32 + 10)
                assert all(set(range(done - 10, done)) <= set(row.tolist()) for row in kept)
                continue
            assert l.length == min(done, 32), "every head keeps exactly `budget`"
            assert kept.shape == (cache.info.n_kv_heads, l.length)
            for h in range(kept.shape[0]):
                row = set(kept[h].tolist())
                assert set(range(max(0, done - 8), done)) <= row, "a stabilizer was evicted"
                # the others are the best-scored among the non-stabilizers
                assert set(range(min(4, done))) <= row, "an attention sink was evicted"
                cand = {p: s for s, p in zip(sc0[h].tolist(), pos0[h].tolist()) if 4 <= p < done - 8}
                kept_s = [cand[p] for p in row if p in cand]
                lost_s = [s for p, s in cand.items() if p not in row]
                assert len(kept_s) == l.length - min(8, done) - 4
                assert not lost_s or min(kept_s) >= max(lost_s)
            assert torch.equal(kept, kept.sort(1).values), "kept tokens stay in order"
        assert cache.next_position == cache.length
    prefill(rt.adapter, cache, _ids(150), plan=plan, on_chunk=before_eviction, progress=after_eviction)


def test_pool_takes_the_window_max_and_refuses_even_windows(tmp_path):
    from policies.locret import _pool
    s = torch.tensor([[0.0, 0, 5, 0, 0, 0, 1], [3, 0, 0, 0, 0, 0, 0]])
    assert _pool(s, 3).tolist() == [[0, 5, 5, 5, 0, 1, 1], [3, 3, 0, 0, 0, 0, 0]]
    assert _pool(s, 5).tolist() == [[5, 5, 5, 5, 5, 1, 1], [3, 3, 3, 0, 0, 0, 0]]
    assert torch.equal(_pool(s, 1), s)
    # back: the window reaches at most `back` tokens back and the rest ahead, so the tokens
    # before a peak (a value's name) inherit its score; back >= k//2 is the centred window
    assert _pool(s, 5, 0).tolist() == [[5, 5, 5, 1, 1, 1, 1], [3, 0, 0, 0, 0, 0, 0]]
    assert _pool(s, 5, 1).tolist() == [[5, 5, 5, 5, 1, 1, 1], [3, 3, 0, 0, 0, 0, 0]]
    assert torch.equal(_pool(s, 5, 2), _pool(s, 5)) and torch.equal(_pool(s, 5, 63), _pool(s, 5))
    assert torch.equal(_pool(s, 1, 0), s)
    rt = _runtime("full")
    f = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    with pytest.raises(SpecError, match="option `pool` .4. must be odd"):
        _runtime(f"locret:pool=4,heads={f}")
    # pooling keeps a span: the neighbours of the best-scored token survive with it
    rt = _runtime(f"locret:budget=16,stabilizers=2,local=4,chunk=16,pool=5,back=1,share=off,heads={f}")
    rt.prefill(_ids(80))
    sel = rt.cache.layers[0].selector
    assert sel.pool == 5 and sel.back == 1 and not sel.share_scores


def test_compacted_keys_are_rope_at_new_slots(tmp_path):
    """Layer 0's keys depend only on the token: after eviction, stored key j must be the
    token's pre-RoPE key rotated (by the model's own rotary) to position base + j."""
    rt = _runtime("full")
    f = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    rt = _runtime(f"locret:budget=24,stabilizers=4,local=0,chunk=16,heads={f}")
    ids = _ids(100, seed=3)
    rt.prefill(ids)
    model = rt.adapter.model
    layer, info = rt.cache.layers[0], rt.adapter.info
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(ids)))
        k_pre = model.model.layers[0].self_attn.k_proj(h).view(len(ids), info.n_kv_heads, -1).transpose(0, 1)
        slots = torch.arange(layer.base, layer.base + layer.length)
        cos, sin = model.model.rotary_emb(h[None], slots[None])
        from transformers.models.llama.modeling_llama import rotate_half
        pos = layer.positions()
        for hd in range(info.n_kv_heads):
            k = k_pre[hd, pos[hd]]  # [b, D] the kept tokens' pre-RoPE keys
            want = k * cos[0] + rotate_half(k) * sin[0]
            torch.testing.assert_close(layer.store.k[hd, : layer.length], want, rtol=1e-4, atol=1e-4)
    assert layer.length < 100 and rt.cache.next_position == layer.base + layer.length


def test_logits_equal_reference_over_kept_tokens_at_compacted_positions(tmp_path):
    """One layer, one KV head: the kept set is one list of tokens, and a fresh full cache
    reading only those tokens at positions 0..n-1 must give the same next logits."""
    over = dict(num_hidden_layers=1, num_key_value_heads=1)
    base = _runtime("full", **over)
    f = random_heads(base.adapter.info, tmp_path / "heads.safetensors")
    rt = _runtime(f"locret:budget=20,stabilizers=4,local=0,chunk=16,heads={f}", **over)
    ids = _ids(90, seed=5)
    rt.prefill(ids)
    kept = rt.cache.layers[0].positions()[0].tolist()
    assert len(kept) < 90
    ref = KVCache("full", base.adapter.info)
    base.adapter.forward(torch.tensor([ids[i] for i in kept]), ref, Chunk(torch.tensor([0]), 0))
    new = torch.tensor(_ids(5, seed=6))
    a = base.adapter.forward(new, ref, Chunk(new, ref.next_position), all_logits=True)
    b = rt.adapter.forward(new, rt.cache, Chunk(new, rt.cache.next_position), all_logits=True)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_many_turns_stay_bounded(tmp_path):
    rt = _runtime("full")
    f = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    rt = _runtime(f"locret:budget=48,stabilizers=8,local=16,chunk=32,heads={f}")
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rt.load_document(str(doc))
    lengths = []
    for t in range(25):
        rt.ask(f"question number {t}, what happened?", max_new_tokens=6)
        lengths.append(rt.cache.length)
    assert rt.cache.seen > 5 * max(lengths)
    assert max(lengths) <= 48 + 16 + 6
    assert max(lengths[-10:]) <= max(lengths[:10]) + 6


def test_convert_from_full_reprefills_and_locret_shrinks_in_place(tmp_path):
    rt = _runtime("full")
    f = random_heads(rt.adapter.info, tmp_path / "heads.safetensors")
    doc = tmp_path / "doc.txt"
    doc.write_text("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 6)
    rt.load_document(str(doc))
    res = rt.set_policy(f"locret:budget=128,stabilizers=8,local=10,heads={f}")
    assert res.reprefilled  # full recorded no scores
    res = rt.set_policy(f"locret:budget=64,stabilizers=8,local=10,heads={f}")
    assert not res.reprefilled and rt.cache.length == 64
    assert rt.ask("and?", max_new_tokens=3).new_tokens >= 1


def test_refusals(tmp_path):
    with pytest.raises(SpecError, match="train-heads"):
        _runtime("locret:budget=64,stabilizers=8")  # no heads ship for the tiny model: never random heads
    other = _runtime("full", num_key_value_heads=4)
    f = random_heads(other.adapter.info, tmp_path / "heads.safetensors")
    with pytest.raises(SpecError, match="key"):
        _runtime(f"locret:budget=64,stabilizers=8,heads={f}")
    with pytest.raises(SpecError, match="does not exist"):
        _runtime(f"locret:budget=64,stabilizers=8,heads={tmp_path / 'nope'}")
    with pytest.raises(SpecError, match="stabilizers"):
        parse_spec("locret:budget=64,stabilizers=64")
    pkl = tmp_path / "official.bin"
    torch.save({}, pkl)
    with pytest.raises(SpecError, match="--import"):
        _runtime(f"locret:budget=64,stabilizers=8,heads={pkl}")


def _official(rt, path, d_r=8, drop=None, wrong=False):
    info = rt.adapter.info
    dq = (info.n_q_heads + 2 * info.n_kv_heads) * info.head_dim + (1 if wrong else 0)
    sd = {"model.embed_tokens.weight": torch.randn(3, 3)}  # other tensors are ignored
    for i in range(info.n_layers):
        sd[f"model.layers.{i}.self_attn.fc1.weight"] = torch.randn(d_r, dq).bfloat16()
        sd[f"model.layers.{i}.self_attn.fc2.weight"] = torch.randn(info.n_kv_heads, d_r).bfloat16()
    if drop:
        del sd[drop]
    torch.save(sd, path)
    return sd


def test_official_checkpoint_folds_exactly(tmp_path):
    from app.heads.official import import_official
    rt = _runtime("full")
    sd = _official(rt, tmp_path / "locret.bin")
    card = import_official(tmp_path / "locret.bin", rt, tmp_path / "out")
    assert card["tensors_loaded"] == 2 * rt.adapter.info.n_layers
    heads = load_heads(tmp_path / "out" / "heads.safetensors", rt.adapter.info)
    x = torch.randn(7, rt.adapter.info.hidden_size)
    for i, layer in enumerate(rt.adapter.layers):
        a = layer.self_attn
        with torch.no_grad():
            qkv = torch.cat((a.q_proj(x), a.k_proj(x), a.v_proj(x)), -1)
            want = F.silu(qkv @ sd[f"model.layers.{i}.self_attn.fc1.weight"].float().t()) \
                @ sd[f"model.layers.{i}.self_attn.fc2.weight"].float().t()
            torch.testing.assert_close(heads.layer(i, x), want, rtol=1e-3, atol=1e-3)
    rt2 = _runtime(f"locret:budget=64,stabilizers=8,heads={tmp_path / 'out'}")
    assert rt2.cache.layers[0].selector.heads is rt2.cache.layers[-1].selector.heads  # loaded once


def test_official_checkpoint_refuses_partial_or_foreign(tmp_path):
    from app.heads.official import import_official
    rt = _runtime("full")
    _official(rt, tmp_path / "part.bin", drop="model.layers.1.self_attn.fc2.weight")
    with pytest.raises(SpecError, match="found 5 .* expected 6"):
        import_official(tmp_path / "part.bin", rt, tmp_path / "o1")
    _official(rt, tmp_path / "wide.bin", wrong=True)
    with pytest.raises(SpecError, match="another model"):
        import_official(tmp_path / "wide.bin", rt, tmp_path / "o2")


def test_fold_with_qkv_bias_is_exact():
    torch.manual_seed(0)
    fc1, w, b, x = torch.randn(5, 12), torch.randn(12, 8), torch.randn(12), torch.randn(3, 8)
    w1, b1 = fold_qkv(fc1, w, b)
    torch.testing.assert_close(x @ w1.t() + b1, (x @ w.t() + b) @ fc1.t(), rtol=1e-4, atol=1e-4)


def test_training_lowers_held_out_loss_and_resumes(tmp_path):
    from app.heads.train import train_heads
    rt = _runtime("full")
    calls = []
    card = train_heads(rt, tmp_path, steps=40, docs=4, val_docs=2, doc_tokens=200, d_r=16, lr=3e-3,
                       warmup=4, progress=lambda *a: calls.append(a))
    v = card["validation"]
    assert v["after"]["loss"] < 0.6 * v["before"]["loss"]
    assert len(v["after"]["top10_overlap_per_layer"]) == rt.adapter.info.n_layers
    assert ("steps", 40, 40) in calls and ("features", 6, 6) in calls and ("documents", 6, 6) in calls
    heads = load_heads(tmp_path / "heads.safetensors", rt.adapter.info)
    assert heads.meta()["d_r"] == 16
    # a second run with the same folder resumes from the checkpoint: no steps left to train
    calls.clear()
    train_heads(rt, tmp_path, steps=40, docs=4, val_docs=2, doc_tokens=200, d_r=16, progress=lambda *a: calls.append(a))
    assert not [c for c in calls if c[0] == "steps"]


@pytest.mark.real_model
def test_shipped_heads_answer_passkey_at_3k(fresh_smol):
    from app.bench.locret import trial
    res = trial(fresh_smol, "locret:budget=512,stabilizers=128", 3200, depth=0.4, seed=1, max_new=14)
    assert "policies/heads" in fresh_smol.cache.layers[0].selector.source
    assert fresh_smol.cache.length <= 512 + 100 + 14
    fresh_smol.reset_cache("full")
    assert res["correct"], res["answer"]


def test_oracle_scorer_keeps_the_needle_through_eviction():
    """The bench's oracle keeps the needle's tokens in every layer and head at any length:
    what separates the eviction machinery from the scorer (tiny model, random heads file)."""
    from app.bench import locret as bench
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    model, tok = tiny_pair(21)
    rt = Runtime.from_model(model, tok, chunk_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        heads = bench._random_heads(rt.adapter.info, tmp)
        spec = f"locret:budget=96,stabilizers=16,local=16,heads={heads}"
        res = bench.trial(rt, spec, 600, depth=0.5, seed=3, scorer="oracle", max_new=2)
        ids, key = bench.passkey_prompt(rt, 600, 0.5, 3)
        needle = tok(" " + bench.NEEDLE.format(key=key) + " ", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
        for layer in rt.cache.layers:
            kept = layer.positions()
            for h in range(kept.shape[0]):
                assert set(range(at, at + len(needle))) <= set(kept[h].tolist())
        assert res["tokens"] == len(ids) and rt.cache.length <= 96 + 16 + 2


def test_pool_replay_gives_back_the_live_selection(tmp_path):
    """scripts/pool_replay.py (the offline sweep behind BENCHMARKS.md's pooling windows):
    replaying the recorded scores with the live window gives back exactly the tokens the
    cache holds, centred or leaning ahead (`back`), and `back` changes what is held."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("pool_replay", Path(__file__).parents[1] / "scripts" / "pool_replay.py")
    pr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pr)
    f = random_heads(_runtime("full").adapter.info, tmp_path / "heads.safetensors")
    held = {}
    for pool, back in ((5, 2), (5, 0), (7, 1)):
        rt = _runtime(f"locret:budget=24,stabilizers=4,local=0,chunk=16,pool={pool},back={back},heads={f}")
        with pr.recording(rt) as (start, stop):
            start()
            rt.prefill(_ids(150))
            rec = stop("test", [])
        assert len(rec["ids"]) == 150 and rec["raw"].shape == (150,)
        held[pool, back] = set(rec["held"])
        assert pr.replay(rec, pool, back, budget=24, stabilizers=4) == held[pool, back]
        assert pr.replay(rec, 1, budget=24, stabilizers=4) != held[pool, back]
    assert held[5, 0] != held[5, 2]
