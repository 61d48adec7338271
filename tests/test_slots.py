"""The slot contract (policies/slots.py): every registered part is its slot's class, and
state shared by a cache's layers belongs to that cache (two caches on one model)."""
from __future__ import annotations

import pytest
import torch

from app.runtime.engine import Runtime
from app.runtime.prefill import prefill
from policies import REGISTRY, KVCache
from policies.slots import Ffn, Reader, Selector, Spill, Store
from tiny import tiny_pair, tiny_policy_files

SLOT_CLASS = {"selector": Selector, "store": Store, "spill": Spill, "reader": Reader, "ffn": Ffn}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("files"))


def _spec(name: str, files) -> str:
    """A spec that puts `name` in its registered slot (offload: behind a selector, a spill)."""
    return {"locret": f"locret:heads={files['heads']}",
            "offload": f"streaming:window=64+offload:channels_file={files['ch']}",
            "doublesparse": f"doublesparse:channels_file={files['ch']}", "kivi": "kivi:group=16"}.get(name, name)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_part_is_its_slot_class(name, files):
    rt = Runtime.from_model(*tiny_pair(0), policy=_spec(name, files), model_id="tiny")
    slot = REGISTRY[name].slot
    cache = rt.cache
    parts = [cache.ffn] if slot == "ffn" else [getattr(layer, slot) for layer in cache.layers]
    assert parts and all(isinstance(p, SLOT_CLASS[slot]) for p in parts), [type(p) for p in parts]
    for layer in cache.layers:  # and the slots it did not name hold the defaults' classes
        assert isinstance(layer.selector, Selector) and isinstance(layer.store, Store)


def _doc(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 260, (n,), generator=g).tolist()


@pytest.mark.parametrize("spec", ["offload", "lighttransfer:sinks=4,window=40,queries=8",
                                  "streaming:window=48+offload:channels_file={ch},recall=16"])
def test_two_caches_on_one_model_each_equal_a_cache_alone(spec, files):
    """Caches built on one model and read in turns (a bench baseline beside a runtime, a
    conversion's old and new cache) each give the logits the same cache gives alone."""
    spec = spec.format(ch=files["ch"])
    rt = Runtime.from_model(*tiny_pair(0), policy="full", model_id="tiny", chunk_size=32)
    ad = rt.adapter
    docs = [_doc(150, 1), _doc(170, 2)]
    alone = []
    for d in docs:
        c = KVCache(spec, ad.info)
        alone.append([prefill(ad, c, d[:96], 32), prefill(ad, c, d[96:], 32)])
    a, b = KVCache(spec, ad.info), KVCache(spec, ad.info)
    got = [[prefill(ad, a, docs[0][:96], 32)], [prefill(ad, b, docs[1][:96], 32)]]
    got[0].append(prefill(ad, a, docs[0][96:], 32))
    got[1].append(prefill(ad, b, docs[1][96:], 32))
    for want, have in zip(alone, got):
        for w, h in zip(want, have):
            torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-5)
    # per-cache state never sits on the model's shared resources
    assert not any(type(v).__name__ in ("Streamer", "LazyPlan") for v in ad.info.resources.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_offload_caches_stream_their_own_layers_on_cuda():
    """On CUDA each `offload` cache has its own streamer: the second cache's layers never
    replace the first's (each equals `full`)."""
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m.cuda(), t, policy="full", model_id="tiny", chunk_size=32)
    ad = rt.adapter
    doc0, doc1 = _doc(150, 1), _doc(170, 2)
    ref = [prefill(ad, KVCache("full", ad.info), d, 32) for d in (doc0, doc1)]
    a, b = KVCache("offload", ad.info), KVCache("offload", ad.info)
    assert a.layers[0].store.streamer is not b.layers[0].store.streamer
    la, lb = prefill(ad, a, doc0, 32), prefill(ad, b, doc1, 32)
    torch.testing.assert_close(la, ref[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lb, ref[1], rtol=2e-2, atol=2e-2)
