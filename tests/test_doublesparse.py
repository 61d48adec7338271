"""`doublesparse`: sparse decode guided by the label cache; prefill and first layers dense."""
from __future__ import annotations

import pytest
import torch

from app.runtime.adapter import Adapter
from offload import labels
from policies import SpecError, parse_spec
from policies.attention import attend
from test_offload import KeepNewest, _ids, cache_with, calibrate_tiny, run_chunks
from tiny import tiny_llama


@pytest.fixture(scope="module")
def chfile(tmp_path_factory):
    return calibrate_tiny(tmp_path_factory.mktemp("ds") / "tiny.safetensors")


def test_keep_one_equals_full(chfile):
    ids, dec = _ids(70, 8), _ids(6, 9)
    ad = Adapter(tiny_llama(0), None)
    want = run_chunks(ad, ad.new_cache("full"), ids, [40, 70], dec)
    cache = cache_with(ad, reader={"keep": 1.0, "dense_layers": 0, "channels_file": chfile})
    got = run_chunks(ad, cache, ids, [40, 70], dec)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_sparse_decode_reads_the_top_labelled_tokens(chfile):
    ids, dec = _ids(120, 10), _ids(5, 11)
    ad = Adapter(tiny_llama(0), None)
    cache = cache_with(ad, reader={"keep": 0.25, "dense_layers": 1, "channels_file": chfile})
    layer = cache.layers[2]
    seen = {}
    orig = layer.reader.attend

    def spy(lay, q, k, v, scale, extra=None):
        if q.shape[1] == 1:  # compute the expected sparse output before the reader runs
            r = lay.reader
            n = lay.length
            b = r.reads(n)
            lab = labels.decode(*labels.encode(labels.take(lay.store.dense()[0], r.ch)))  # as stored
            s = labels.scores(q, lab, r.ch)
            idx = s.topk(b - 1, dim=1).indices.sort(1).values
            ks, vs = lay.store.dense(idx)
            seen["want"] = attend(q, torch.cat((ks, k), 1), torch.cat((vs, v), 1), scale)
            seen["dense"] = attend(q, torch.cat((lay.store.dense()[0], k), 1),
                                   torch.cat((lay.store.dense()[1], v), 1), scale)
        out = orig(lay, q, k, v, scale, extra)
        seen["got"] = out
        return out
    layer.reader.attend = spy
    full = run_chunks(ad, ad.new_cache("full"), ids, [120], dec)
    got = run_chunks(ad, cache, ids, [120], dec)
    torch.testing.assert_close(seen["got"], seen["want"], atol=1e-5, rtol=1e-5)
    assert (seen["got"] - seen["dense"]).abs().max() > 1e-4  # it really read a subset
    assert cache.layers[0].reader.sparse_steps == 0 and layer.reader.sparse_steps == 5
    torch.testing.assert_close(got[:120], full[:120], atol=2e-5, rtol=1e-5)  # prefill is dense
    assert layer.reader.n == layer.length == 125


def test_labels_follow_eviction(chfile):
    ad = Adapter(tiny_llama(0), None)
    cache = cache_with(ad, KeepNewest(30), reader={"dense_layers": 0, "channels_file": chfile})
    run_chunks(ad, cache, _ids(90, 12), [60, 90], _ids(3, 13))
    for lay in cache.layers:
        r = lay.reader
        assert r.n == lay.length == 63
        exact = labels.take(lay.store.dense()[0], r.ch)
        assert torch.equal(r.labels[:, : r.n], labels.decode(*labels.encode(exact)))
        step = exact.abs().amax(-1, keepdim=True) / 127  # int8 rows: within half a step
        assert ((r.labels[:, : r.n] - exact).abs() <= step * 0.501 + 1e-6).all()


def test_label_bytes_are_exact(chfile):
    ad = Adapter(tiny_llama(0), None)
    cache = cache_with(ad, reader={"dense_layers": 2, "channels_file": chfile})
    run_chunks(ad, cache, _ids(50, 14), [50])
    by = cache.nbytes()
    info = ad.info
    # layers 0-1 are dense (no labels); layer 2 holds one block of 256 tokens x 16 channels,
    # int8 codes and one fp16 scale per row
    assert by[("gpu", "labels")] == 1 * info.n_kv_heads * 256 * (16 + 2)
    assert by[("gpu", "keys")] == info.n_layers * info.n_kv_heads * 256 * info.head_dim * 4


@pytest.mark.parametrize("spec,needle", [
    ("doublesparse:keep=0", "must be above 0"),
    ("doublesparse:keep=2", "above the maximum 1"),
    ("doublesparse:channels=0", "below the minimum 1"),
    ("doublesparse+doublesparse", "both decide the cache's reader"),
])
def test_refusals(spec, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec(spec)


def test_needs_channels_for_the_model():
    ad = Adapter(tiny_llama(0), None)
    with pytest.raises(SpecError, match="policy `doublesparse` needs calibrated outlier channels"):
        ad.new_cache("doublesparse")
    ad.new_cache("doublesparse:dense_layers=3")  # every layer dense: no channels needed
