"""`train-heads --import`: an official Locret checkpoint, whose heads read the layer's
[Q, K, V], folded into heads over the hidden state the projections read (exact, biases
included)."""
from __future__ import annotations

import json
from pathlib import Path

from policies.locret import heads_from_official, model_key, read_official, save_heads

from .train import config_hash, runtime


def import_official(checkpoint, model, out_dir) -> dict:
    """Fold an official Locret checkpoint (heads over [Q,K,V]) into heads over the hidden
    state of `model` and write OUT/heads.safetensors + card.json."""
    rt = runtime(model)
    info = rt.adapter.info
    ckpt = read_official(checkpoint, info.n_layers)
    ws, bs = zip(*(rt.adapter.qkv_weights(i) for i in range(info.n_layers)))
    heads = heads_from_official(ckpt, list(ws), list(bs), info.n_kv_heads, rt.adapter.hidden_act)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = {"model": rt.model_id, "model_key": model_key(info), "config_hash": config_hash(rt.adapter.model),
            "source": str(checkpoint), "tensors_loaded": 2 * info.n_layers,
            "mapping": "fc1_hidden = fc1_qkv @ cat(Wq, Wk, Wv) (+ fc1_qkv @ cat(bq, bk, bv) as an fc1 bias)"}
    save_heads(heads, out / "heads.safetensors", model_key(info), [rt.model_id])
    (out / "card.json").write_text(json.dumps(card, indent=1))
    return card
