"""`offload`: spill with recall behind an evicting selector, and the host store alone.

Also holds the helpers test_doublesparse.py imports: a tiny model calibrated on random
tokens, and test-only evicting selectors swapped into a built cache (never registered).
"""
from __future__ import annotations

import pytest
import torch

from app.outlier_channels import collect
from app.runtime.adapter import Adapter
from app.runtime.prefill import prefill
from offload import labels
from offload.calibrate import model_key, save
from offload.spill import OffloadSpill
from policies import Chunk, KVCache, ModelInfo, Policy, REGISTRY, SpecError, parse_spec, rope
from policies.base import FullStore, KeepAll, LayerCache
from policies.slots import Selector
from tiny import tiny_llama


# ---- helpers (also used by test_doublesparse.py) -------------------------------------------

class KeepNewest(Selector):
    """Evicts all but the newest `budget` tokens after each non-final chunk."""

    evicts = True

    def __init__(self, budget: int):
        self.budget = budget

    def select(self, cache, chunk):
        n = cache.length
        if chunk.final or n <= self.budget:
            return None
        return torch.arange(n - self.budget, n).expand(cache.info.n_kv_heads, -1)


class KeepRandom(KeepNewest):
    """Keeps a random sorted `budget` tokens per head (evicted tokens interleave kept ones)."""

    def __init__(self, budget: int, seed: int = 0):
        super().__init__(budget)
        self.gen = torch.Generator().manual_seed(seed)

    def select(self, cache, chunk):
        n = cache.length
        if chunk.final or n <= self.budget:
            return None
        return torch.stack([torch.randperm(n, generator=self.gen)[: self.budget].sort().values
                            for _ in range(cache.info.n_kv_heads)])


def calibrate_tiny(path, seed: int = 0) -> str:
    """Calibrate tiny_llama(seed) on random tokens into `path`; -> str(path)."""
    ad = Adapter(tiny_llama(seed), None)
    gen = torch.Generator().manual_seed(seed)
    stats = collect(ad, [torch.randint(3, 256, (64,), generator=gen) for _ in range(4)])
    save(path, stats.mean(), 4, model_key(ad.info), ["tiny"], 256, "random tokens (test)")
    return str(path)


def cache_with(ad, selector=None, spill=None, reader=None) -> KVCache:
    """A KVCache with offload as spill (opts) and/or doublesparse as reader (opts), and a
    test selector swapped into every layer."""
    slots = {"selector": Policy("full", "selector", {})}
    for name, slot, given in (("offload", "spill", spill), ("doublesparse", "reader", reader)):
        if given is not None:
            slots[slot] = Policy(name, slot, {k: o.default for k, o in REGISTRY[name].options.items()} | given)
    cache = KVCache(slots, ad.info)
    if selector is not None:
        for layer in cache.layers:
            layer.selector = selector
    return cache


def run_chunks(ad, cache, ids, cuts, decode=()):
    """Prefill ids in chunks ending at `cuts` (the last final), then feed `decode` ids one
    at a time. -> logits [prefill T + len(decode), V]."""
    out = []
    if cuts:
        plan = [e - s for s, e in zip([0, *cuts], cuts)]
        out.append(prefill(ad, cache, ids[:cuts[-1]], plan=plan, all_logits=True))
    for t in decode:
        c = Chunk(torch.tensor([int(t)]), cache.next_position, "decode")
        out.append(ad.forward(c.input_ids, cache, c, all_logits=True))
    return torch.cat(out)


@pytest.fixture(scope="module")
def chfile(tmp_path_factory):
    return calibrate_tiny(tmp_path_factory.mktemp("ch") / "tiny.safetensors")


def _ids(n=90, seed=0):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))


# ---- spill: conformance, positions, recall quality ----------------------------------------

@pytest.mark.parametrize("every", [0, 2])
def test_recall_of_every_host_token_equals_no_eviction(chfile, every):
    ids, dec = _ids(), _ids(6, 1)
    ad = Adapter(tiny_llama(0), None)
    want = run_chunks(ad, ad.new_cache("full"), ids, [60, 90], dec)
    cache = cache_with(ad, KeepNewest(30), {"recall": 64, "every": every, "channels_file": chfile})
    got = run_chunks(ad, cache, ids, [60, 90], dec)
    assert cache.layers[0].spill.n == 30 and cache.length == 30 + 30 + 6
    assert cache.layers[0].spill.m == 30
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # and the check can fail: without the spill the same eviction changes the logits
    bare = run_chunks(ad, cache_with(ad, KeepNewest(30)), ids, [60, 90], dec)
    assert (bare[60:] - want[60:]).abs().max() > 1e-2


def test_recall_runs_only_before_answering_unless_asked(chfile):
    ids, dec = _ids(), _ids(7, 2)
    ad = Adapter(tiny_llama(0), None)
    for every, scans in ((0, 1), (3, 1 + 2)):
        cache = cache_with(ad, KeepNewest(30), {"recall": 8, "every": every, "channels_file": chfile})
        run_chunks(ad, cache, ids, [30, 60, 90], dec)
        assert all(l.spill.recalls == scans for l in cache.layers)  # none at the non-final chunks


def test_recalled_tokens_sit_right_before_the_kept_ones_in_original_order(chfile):
    ids = _ids(100, 3)
    ad = Adapter(tiny_llama(0), None)
    full = ad.new_cache("full")
    run_chunks(ad, full, ids, [100])
    cache = cache_with(ad, KeepRandom(40), {"recall": 12, "channels_file": chfile})
    run_chunks(ad, cache, ids, [70, 100])
    lay = cache.layers[0]  # layer 0's keys depend only on token and position: comparable
    sp = lay.spill
    assert sp.m == 12
    conv = sp.recalled  # [Hkv, 12] conversation indices
    assert (conv[:, 1:] > conv[:, :-1]).all()
    kept = set(lay.positions()[0].tolist())
    assert not kept & set(conv[0].tolist())  # recalled tokens are evicted ones only
    orig = full.layers[0].store.k[:, :100]  # post-RoPE at their true positions
    want = orig.gather(1, conv[..., None].expand(-1, -1, orig.shape[2]))
    slots = torch.arange(lay.base - 12, lay.base)  # right before the kept tokens
    want = rope.rotate(want, slots[None] - conv, ad.info.inv_freq)
    torch.testing.assert_close(sp.buf_k[:, :12], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sp.buf_v[:, :12], full.layers[0].store.v.gather(
        1, conv[..., None].expand(-1, -1, orig.shape[2])), atol=0, rtol=0)


def _unit_layer(path, recall=4):
    """One LayerCache on a ModelInfo like tiny_llama's, with the offload spill."""
    ad = Adapter(tiny_llama(0), None)
    info = ad.info
    sp = OffloadSpill(info, 1, recall, 4, 0, path)
    return info, LayerCache(info, 1, KeepNewest(8), FullStore(info), sp)


def test_recall_brings_back_the_planted_token(chfile):
    info, layer = _unit_layer(chfile)
    g = torch.Generator().manual_seed(5)
    h, d = info.n_kv_heads, info.head_dim
    q = torch.randn(info.n_q_heads, 1, d, generator=g)
    k, v = torch.randn(h, 120, d, generator=g), torch.randn(h, 120, d, generator=g)
    qs = q.reshape(h, -1, d).sum(1)  # the group's summed query [Hkv, D]
    k[:, 37] = 4 * qs / qs.norm(dim=-1, keepdim=True) * k[:, :1].norm(dim=-1)  # aligned, same norm
    layer.forward(q.expand(-1, 120, -1), k, v, d ** -0.5, Chunk(torch.zeros(120), 0, final=False))
    layer.evict(KeepNewest(8).select(layer, Chunk(torch.zeros(1), 0, final=False)), 0)
    assert layer.spill.n == 112
    out = layer.spill.recall(layer, q, Chunk(torch.zeros(1), 8, final=True))
    assert out is not None and out[0].shape == (h, 4, d)
    assert (layer.spill.recalled == 37).any(1).all(), layer.spill.recalled
    s = labels.scores(q, layer.spill.labels[:, :112], layer.spill.ch)
    assert (s.argmax(1) == 37).all()


def test_pooled_recall_brings_back_the_span_in_text_order_not_host_order(chfile):
    """pool=5: the planted token's four text neighbours come back with it, although the
    host holds them in eviction order (37's neighbours were evicted in a later step)."""
    info = Adapter(tiny_llama(0), None).info
    layer = LayerCache(info, 1, KeepNewest(8), FullStore(info), OffloadSpill(info, 1, 5, 4, 0, chfile, pool=5))
    g = torch.Generator().manual_seed(5)
    h, d = info.n_kv_heads, info.head_dim
    q = torch.randn(info.n_q_heads, 1, d, generator=g)
    k, v = torch.randn(h, 120, d, generator=g), torch.randn(h, 120, d, generator=g)
    qs = q.reshape(h, -1, d).sum(1)
    k[:, 37] = 4 * qs / qs.norm(dim=-1, keepdim=True) * k[:, :1].norm(dim=-1)
    layer.forward(q.expand(-1, 120, -1), k, v, d ** -0.5, Chunk(torch.zeros(120), 0, final=False))
    first = torch.cat((torch.arange(36, 39), torch.arange(112, 120))).expand(h, -1)  # 36..38 stay a while
    layer.evict(first.contiguous(), 0)
    layer.evict(torch.arange(3, 11).expand(h, -1).contiguous(), 0)  # now 36..38 go too
    rows = layer.spill.hpos[:, : layer.spill.n]
    assert not bool((rows[:, 1:] >= rows[:, :-1]).all())  # host rows are not in text order
    layer.spill.recall(layer, q, Chunk(torch.zeros(1), 8, final=True))
    assert layer.spill.recalled.tolist() == [[35, 36, 37, 38, 39]] * h


def test_spill_bytes_are_exact_by_tier_and_kind(chfile):
    ad = Adapter(tiny_llama(0), None)
    info = ad.info
    cache = cache_with(ad, KeepNewest(30), {"recall": 20, "channels_file": chfile})
    run_chunks(ad, cache, _ids(), [60, 90])
    by = cache.nbytes()
    L, h, d, r = info.n_layers, info.n_kv_heads, info.head_dim, 16  # r: the default channels
    host_cap, store_cap = 256, 256
    assert by[("host", "keys")] == by[("host", "values")] == L * h * host_cap * d * 4
    assert by[("host", "index")] == L * h * host_cap * 8
    # int8 codes + an fp16 scale per row, and the last chunk's (30 tokens) group queries in fp32,
    # kept to rank what that chunk evicts after its recall
    assert by[("gpu", "labels")] == L * h * host_cap * (r + 2) + L * h * 30 * r * 4
    assert by[("gpu", "keys")] == by[("gpu", "values")] == L * h * (store_cap + 20) * d * 4
    assert by[("gpu", "index")] == L * h * (60 + 20) * 8  # conversation index of the 60 stored tokens + ranking
    assert set(by) == {("host", "keys"), ("host", "values"), ("host", "index"), ("gpu", "labels"),
                       ("gpu", "keys"), ("gpu", "values"), ("gpu", "index")}


# ---- offload alone: the host store ---------------------------------------------------------

def test_offload_alone_is_a_host_store_equal_to_full():
    ids, dec = _ids(80, 4), _ids(5, 5)
    ad = Adapter(tiny_llama(0), None)
    want = run_chunks(ad, ad.new_cache("full"), ids, [33, 80], dec)
    cache = ad.new_cache("offload")
    assert cache.slots["store"].name == "offload" and cache.spec == "offload"
    got = run_chunks(ad, cache, ids, [33, 80], dec)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    by = cache.nbytes()
    cap = cache.layers[0].store.k.shape[1]
    assert by[("host", "keys")] == by[("host", "values")] == ad.info.n_layers * 2 * cap * 16 * 4
    assert cache.bytes_by_tier()["gpu"] == 0
    assert cache.truncate(80)  # nothing evicted: turns can be undone


def test_host_store_pins_the_projected_length_once(monkeypatch):
    """A prefill tells the cache its length first (KVCache.expect): the host store takes it,
    with room for an answer, in one allocation (growing by an eighth re-pins and re-copies
    ~9x the final size)."""
    from app.runtime.engine import Runtime
    from offload.host import HostStore
    from tiny import tiny_pair
    grows = []
    real = HostStore.reserve
    monkeypatch.setattr(HostStore, "reserve", lambda self, n: grows.append(n) or real(self, n))
    rt = Runtime.from_model(*tiny_pair(0), policy="offload", model_id="tiny", chunk_size=16)
    rt.prefill(_ids(300, 1))
    store = rt.cache.layers[0].store
    # 300 + an answer's 1,024 tokens, rounded up to a block of 256, once
    assert store.length == 300 and store.k.shape[1] == 1536
    n_layers = rt.adapter.info.n_layers
    assert grows[:n_layers] == [1324] * n_layers and all(n <= 1324 for n in grows)
    assert rt.cache.projected_length(100, 16) == 400


def test_copy_rows_per_head_equals_slice_copy():
    from offload.host import copy_rows
    src, dst = torch.randn(3, 40, 8), torch.zeros(3, 50, 8)
    copy_rows(dst[:, 5:25], src[:, 10:30])
    assert torch.equal(dst[:, 5:25], src[:, 10:30]) and not dst[:, :5].any() and not dst[:, 25:].any()


def test_live_conversion_to_offload_keeps_decoding_the_same():
    from app.runtime.convert import convert
    ids, dec = _ids(70, 6), _ids(4, 7)
    ad = Adapter(tiny_llama(0), None)
    want = run_chunks(ad, ad.new_cache("full"), ids, [70], dec)
    old = ad.new_cache("full")
    run_chunks(ad, old, ids, [70])
    new, lossy, _ = convert(old, ad.info, "offload")
    assert not lossy and new.bytes_by_tier()["host"] > 0
    got = run_chunks(ad, new, ids[:0], [], dec)
    torch.testing.assert_close(got, want[70:], atol=2e-5, rtol=1e-5)


# ---- the slot rule and refusals ------------------------------------------------------------

@pytest.mark.parametrize("spec,slots", [
    ("offload", {"store": "offload"}),
    ("full+offload", {"selector": "full", "store": "offload"}),
    ("offload+doublesparse", {"store": "offload", "reader": "doublesparse"}),
])
def test_offload_slot_depends_on_the_selector(spec, slots):
    assert {k: v.name for k, v in parse_spec(spec).items()} == slots


@pytest.mark.parametrize("spec,needle", [
    ("offload+kivi", "`offload` and `kivi` both decide the cache's store"),
    ("offload:recall=64", "option `recall` of policy `offload` applies only behind an evicting selector"),
    ("offload:every=4", "option `every`"),
    ("offload+offload", "both decide"),
    ("offload:recall=0", "below the minimum 1"),
])
def test_refusals(spec, needle):
    with pytest.raises(SpecError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        parse_spec(spec)


def test_no_channels_for_the_model_is_a_clear_error(tmp_path):
    ad = Adapter(tiny_llama(0), None)
    with pytest.raises(SpecError, match="needs calibrated outlier channels.*python main.py calibrate"):
        OffloadSpill(ad.info, 0, 8, 4, 0)
    other = calibrate_tiny(tmp_path / "other.safetensors", seed=1)
    wide = Adapter(tiny_llama(0, num_hidden_layers=4), None)
    with pytest.raises(SpecError, match="was calibrated for model key"):
        OffloadSpill(wide.info, 0, 8, 4, 0, other)
    with pytest.raises(SpecError, match="does not exist"):
        OffloadSpill(ad.info, 0, 8, 4, 0, str(tmp_path / "missing.safetensors"))


def test_host_bytes_counts_the_pinned_block_torch_rounds_to(monkeypatch):
    """Where torch's pinned cache rounds blocks up to a power of two (torch < 2.13 refuses the
    setting that stops it), the accounting says what is really pinned."""
    from offload import host

    class Pinned:
        def __init__(self, n):
            self.n = n

        def untyped_storage(self):
            return self

        def nbytes(self):
            return self.n

        def is_pinned(self):
            return True

    monkeypatch.setattr(host, "_EXACT_PINNED", False)
    assert host.host_bytes(Pinned(258 << 20)) == 512 << 20
    assert host.host_bytes(Pinned(512 << 20)) == 512 << 20
    assert host.host_bytes(Pinned(1000)) == 1000  # small blocks: as they are
    assert host.host_bytes(torch.empty(300, 1024, 8)) == 300 * 1024 * 8 * 4  # not pinned: exact
    monkeypatch.setattr(host, "_EXACT_PINNED", True)
    assert host.host_bytes(Pinned(258 << 20)) == 258 << 20


def test_tokens_evicted_by_the_questions_last_chunk_are_ranked_before_the_answer(tmp_path):
    """The last chunk of a read recalls with its queries, then evicts; what it evicts goes to the
    host after that recall. Those tokens are ranked with the same queries before the first
    decode step (they were invisible to the whole answer), and the buffer is the top k of
    every host token."""
    from app.runtime.engine import Runtime
    from tiny import tiny_pair, tiny_policy_files
    files = tiny_policy_files(tmp_path)
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=32)
    rt.set_policy(f"locret:budget=48,stabilizers=8,local=16,heads={files['heads']}"
                  f"+offload:recall=24,channels_file={files['ch']}")
    gen = torch.Generator().manual_seed(3)
    rt.prefill(torch.randint(4, 260, (300,), generator=gen))  # a document: its last chunk stays
    before = [layer.spill.recalls for layer in rt.cache.layers]
    rt.prefill(torch.randint(4, 260, (10,), generator=gen))  # a question, one chunk: the document's tail goes
    late = -sum(before)
    for layer in rt.cache.layers:
        sp = layer.spill
        assert sp._ranked_n == sp.n, "every host token was ranked for the question"
        s = sp.labels.scores(sp._qs, sp.n)
        want = sp.hpos[:, :sp.n].gather(1, s.topk(min(sp.n_recall, sp.n), 1).indices.cpu()).sort(1).values
        assert torch.equal(sp.recalled, want)
        late += sp.recalls
    assert late > len(rt.cache.layers), "the question's chunk evicted after its recall (this case tests that)"
