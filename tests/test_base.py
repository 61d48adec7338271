"""The layer cache machinery every policy stands on: eviction, re-rotation, buffers."""
import torch

from policies import ModelInfo, rope
from policies.base import FullStore, LayerCache, _complement
from policies.kivi import KiviStore
from policies.slots import Selector


def _info(h=2, d=16):
    return ModelInfo(n_layers=1, n_q_heads=4, n_kv_heads=h, head_dim=d, dtype=torch.float32,
                     device=torch.device("cpu"), inv_freq=1.0 / (10000 ** (torch.arange(0, d, 2) / d)), window=512)


def test_keep_gathers_rotates_and_gives_memory_back():
    info = _info()
    st = FullStore(info)
    k, v = torch.randn(2, 2000, 16), torch.randn(2, 2000, 16)
    st.append(k, v)
    assert st.k.shape[1] >= 2000
    idx = torch.sort(torch.randperm(2000)[:100]).values.expand(2, -1).contiguous()
    idx[1] = torch.sort(torch.randperm(2000)[:100]).values
    delta = torch.arange(100)[None] - idx  # compact to slots 0..99
    st.compact(idx, delta)
    assert st.length == 100 and st.k.shape[1] == 256  # shrunk: 2000-token buffer returned
    assert st.nbytes() == {"keys": 2 * 256 * 16 * 4, "values": 2 * 256 * 16 * 4}
    want_k = rope.rotate(k.gather(1, idx[..., None].expand(-1, -1, 16)), delta, info.inv_freq)
    torch.testing.assert_close(st.k[:, :100], want_k)
    torch.testing.assert_close(st.v[:, :100], v.gather(1, idx[..., None].expand(-1, -1, 16)))


def test_steady_eviction_keeps_its_buffer():
    st = FullStore(_info())
    st.append(torch.randn(2, 1536, 16), torch.randn(2, 1536, 16))
    buf = st.k
    idx = torch.arange(512, 1536).expand(2, -1)
    st.compact(idx, torch.zeros(2, 1024))
    assert st.k is buf and st.length == 1024


def test_rotation_composes_like_rope():
    info = _info()
    x = torch.randn(2, 5, 16)
    a, b = torch.randint(-50, 50, (2, 5)), torch.randint(-50, 50, (2, 5))
    torch.testing.assert_close(rope.rotate(rope.rotate(x, a, info.inv_freq), b, info.inv_freq),
                               rope.rotate(x, a + b, info.inv_freq), atol=1e-5, rtol=1e-5)
    # the relative property RoPE relies on: <R(p)q, R(p)k> does not depend on p
    q = torch.randn(2, 5, 16)
    p = torch.randint(0, 1000, (2, 5))
    dot = (rope.rotate(q, p, info.inv_freq) * rope.rotate(x, p, info.inv_freq)).sum(-1)
    torch.testing.assert_close(dot, (q * x).sum(-1), atol=1e-4, rtol=1e-4)


def test_complement():
    idx = torch.tensor([[0, 3, 4], [1, 2, 5]])
    assert _complement(idx, 6).tolist() == [[1, 2, 5], [0, 3, 4]]


class _Lazy(Selector):
    """A selector that asks for full precision once it evicts."""
    evicts, full_precision = True, True


def test_full_precision_selector_swaps_quantized_store_exactly():
    info = _info(d=16)
    ref, layer = FullStore(info), LayerCache(info, 0, _Lazy(), KiviStore(info, bits=2, group=16, residual=32))
    g = torch.Generator().manual_seed(0)
    for n in (70, 50):  # the first 64 keys get quantized (two G-aligned flushes of 32)
        k = torch.randn(info.n_kv_heads, n, info.head_dim, generator=g)
        v = torch.randn(info.n_kv_heads, n, info.head_dim, generator=g)
        layer.store.attend(torch.zeros(info.n_q_heads, n, info.head_dim), k, v, 1.0)
        layer.store.append(k, v)
        ref.append(k, v)
        layer.seen += n
    dk, dv = layer.store.dense()  # dequantized where quantized
    idx = torch.cat((torch.arange(4), torch.arange(80, 120))).expand(info.n_kv_heads, -1)
    layer.evict(idx, 0)
    assert isinstance(layer.store, FullStore) and layer.length == 44
    want = FullStore(info)
    want.load(dk, dv)
    want.compact(idx, torch.arange(44)[None, :] - idx)
    torch.testing.assert_close(layer.store.dense()[0], want.dense()[0], rtol=0, atol=0)
    torch.testing.assert_close(layer.store.dense()[1], want.dense()[1], rtol=0, atol=0)
    # tokens 70..119 were still at full precision (the chunk not yet laid out): bit-exact
    ref.compact(idx, torch.arange(44)[None, :] - idx)
    for got, exact in zip(layer.store.dense(), ref.dense()):
        torch.testing.assert_close(got[:, 4:], exact[:, 4:], rtol=0, atol=0)
    assert not torch.equal(layer.store.dense()[1][:, :4], ref.dense()[1][:, :4])  # sinks were 2-bit
