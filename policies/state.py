"""A cache's state as tensors and metadata, and back: what cache files hold
(app/runtime/snapshot.py writes them to disk).

`state(cache)` gathers every slot part's `state` (the contract is in policies/slots.py),
what each slot's `link` shares between the layers (once per cache), the ffn part, and the
bookkeeping of every `LayerCache` (base, pos, scores, seen) and of the `KVCache`
(next_position, peak, shared score columns). `restore(cache, ...)` gives it back to a cache
just built from the same spec on the same model, after which that cache continues exactly
as the saved one would have (tests/test_snapshot.py compares the next logits bit for bit).

Tensor names: `layers.{i}.{slot}.{name}`, `layers.{i}.pos|scores`, `linked.{slot}.{name}`,
`ffn.{name}`. Metadata is JSON-able (ints, floats, strings, lists, dicts with str keys).
"""
from __future__ import annotations

import torch

from .full import FullStore

LAYER_SLOTS = ("selector", "store", "spill", "reader")


def state(cache) -> tuple[dict, dict]:
    """-> (tensors {name: Tensor}, possibly views; meta) of a `KVCache`."""
    tensors, meta = {}, {"next_position": cache.next_position, "peak_bytes": cache.peak_bytes,
                         "shared": cache._shared, "layers": [], "linked": {}}
    for i, layer in enumerate(cache.layers):
        lt, lm = _layer_state(layer)
        tensors.update({f"layers.{i}.{k}": v for k, v in lt.items()})
        meta["layers"].append(lm)
    for slot, parts in linked(cache).items():
        st, meta["linked"][slot] = parts[0].linked_state(parts)
        tensors.update({f"linked.{slot}.{k}": v for k, v in st.items()})
    if cache.ffn is not None:
        ft, meta["ffn"] = cache.ffn.state()
        tensors.update({f"ffn.{k}": v for k, v in ft.items()})
    return tensors, meta


@torch.inference_mode()  # NOTE: as KVCache.end_chunk: stores hold inference tensors
def restore(cache, tensors: dict, meta: dict) -> None:
    """Give `state` back to a `KVCache` just built from the same spec and model. Raises
    ValueError (or the torch error of a shape that does not fit) for another spec or model."""
    layers = meta["layers"]
    if len(layers) != len(cache.layers):
        raise ValueError(f"{len(layers)} layers were saved; this model has {len(cache.layers)}")
    for layer, lm in zip(cache.layers, layers):  # before the links: a swapped layer links nothing
        if lm["store_class"] != type(layer.store).__name__:
            if lm["store_class"] != FullStore.__name__:  # the one swap a layer makes (_to_full_precision)
                raise ValueError(f"layer {layer.layer}: a {lm['store_class']} was saved; this spec "
                                 f"builds a {type(layer.store).__name__}")
            layer.store = FullStore(layer.info)
    for slot, parts in linked(cache).items():
        parts[0].restore_linked(parts, under(tensors, f"linked.{slot}"), meta["linked"].get(slot, {}))
    for i, (layer, lm) in enumerate(zip(cache.layers, layers)):
        _layer_restore(layer, under(tensors, f"layers.{i}"), lm)
    if (cache.ffn is None) != ("ffn" not in meta):
        raise ValueError("the saved ffn slot does not match this spec's")
    if cache.ffn is not None:
        cache.ffn.restore(under(tensors, "ffn"), meta["ffn"])
    cache.next_position, cache.peak_bytes, cache._shared = meta["next_position"], meta["peak_bytes"], meta["shared"]


def linked(cache) -> dict:
    """{slot: that slot's part of every layer that has one, layer order}: what `link` gets."""
    out = {}
    for slot in LAYER_SLOTS:
        parts = [getattr(l, slot) for l in cache.layers if getattr(l, slot) is not None]
        if parts:
            out[slot] = parts
    return out


def under(tensors: dict, prefix: str) -> dict:
    """The entries named `prefix.rest`, as {rest: tensor}."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def _layer_state(layer) -> tuple[dict, dict]:
    tensors = {name: t for name, t in (("pos", layer.pos), ("scores", layer.scores)) if t is not None}
    meta = {"base": layer.base, "seen": layer.seen, "store_class": type(layer.store).__name__}
    for slot in LAYER_SLOTS:
        part = getattr(layer, slot)
        if part is not None:
            pt, meta[slot] = part.state()
            tensors.update({f"{slot}.{k}": v for k, v in pt.items()})
    return tensors, meta


def _layer_restore(layer, tensors: dict, meta: dict) -> None:
    for slot in LAYER_SLOTS:
        part = getattr(layer, slot)
        if (part is None) != (slot not in meta):
            raise ValueError(f"layer {layer.layer}: the saved {slot} slot does not match this spec's")
        if part is not None:
            part.restore(under(tensors, slot), meta[slot])
    dev = layer.info.device
    layer.base, layer.seen = int(meta["base"]), int(meta["seen"])
    layer.pos = tensors["pos"].to(dev) if "pos" in tensors else None
    layer.scores = tensors["scores"].to(dev) if "scores" in tensors else None
    n = layer.store.length
    for name in ("pos", "scores"):
        t = getattr(layer, name)
        if t is not None and t.shape != (layer.info.n_kv_heads, n):
            raise ValueError(f"layer {layer.layer}: saved {name} {tuple(t.shape)} for {n} stored tokens")
