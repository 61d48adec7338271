"""Specs have one canonical form (policies.registry.canonical_spec): the runtime shows it, and
a cache file written before it (bools spelled true/false) still opens under the same stack."""
from __future__ import annotations

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.runtime.engine import Runtime
from tiny import tiny_pair

SPEC = "streaming:window=64+offload:quote=16,terms=on,rank=off"
OLD = "streaming:window=64+offload:quote=16,terms=true,rank=false"  # how files spelled it before


def test_a_cache_file_with_the_old_spelling_opens(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"word{i % 37}" for i in range(300)))
    rt = Runtime.from_model(*tiny_pair(0), policy=OLD, model_id="tiny", chunk_size=32)
    assert rt.policy == SPEC  # shown canonical, whichever way it was written
    rt.load_document(str(doc))
    path = tmp_path / "conv.safetensors"
    rt.save_cache(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    assert meta["spec"] == SPEC
    save_file(load_file(str(path)), str(path), metadata={**meta, "spec": OLD})  # an older file
    again = Runtime.from_model(*tiny_pair(0), policy=SPEC, model_id="tiny", chunk_size=32)
    how = again.restore(rt.to_json(), cache_file=path)
    assert how.startswith("restored its cache"), how
    assert again.cache.seen == rt.cache.seen and again.policy == SPEC
