"""What retaining heads regress: per context token, layer and KV head, how much the
question/answer queries attend to it.

The label of context token t at layer i, KV head j is the max pre-softmax logit QKᵀ·scale
that the tail's queries (every question and answer, app/heads/data.py) pay it, at true
positions over the uncompressed context, max also over the query heads of that KV group
(REFERENCES §1). Labels and the heads' input (the post-input_layernorm hidden state) come
from one frozen forward per document.
"""
from __future__ import annotations

import torch

from policies import KVCache
from policies.base import Chunk

TARGETS = ("shared", "layer")


def features(adapter, ids, n_ctx):
    """ids [T], the context its first n_ctx -> (hidden [L, n_ctx, hidden] fp16, labels
    [L, Hkv, n_ctx] float32) from one forward."""
    with torch.inference_mode():
        h, lab = _features(adapter, ids, n_ctx)
    return h.clone(), lab.clone()  # NOTE: clones outside inference mode can enter autograd


def _features(adapter, ids, n_ctx):
    info = adapter.info
    cache = KVCache("full", info)
    chunk = Chunk(ids.to(info.device), 0)
    hidden = chunk.hidden
    adapter.forward(chunk.input_ids, cache, chunk, capture_hidden=True)
    pos = torch.arange(n_ctx, ids.shape[0], device=info.device)
    hs, labels = [], []
    for i in range(info.n_layers):
        x = hidden[i]
        q = adapter.query_states(i, x[n_ctx:], pos)  # [Hq, Tq, D] post-RoPE
        k = cache.layers[i].store.dense()[0][:, :n_ctx]  # [Hkv, n_ctx, D] post-RoPE, true positions
        scale = adapter.attn_scale(i)
        logits = q.float().reshape(info.n_kv_heads, -1, info.head_dim) @ k.float().transpose(1, 2) * scale
        labels.append(logits.amax(1))  # max over tail queries and the group's query heads
        hs.append(x[:n_ctx].to(torch.float16))
    return torch.stack(hs).cpu(), torch.stack(labels).cpu()


def targets(labels: torch.Tensor, mode: str = "shared") -> torch.Tensor:
    """Raw labels [L, Hkv, T] -> the regression targets [L, Hkv, T].

    "layer" is Locret's: each head regresses its own layer's max logit. "shared" z-scores
    each (layer, head) row over the document, then takes the max over all layers and heads:
    a token that any layer's question/answer queries single out is a target for every layer.
    Why: a needle must survive in most layers to be answered, but early layers' question
    queries barely tell it from prose, so per-layer labels teach those layers to drop it
    (BENCHMARKS.md measures how much of a needle each target puts in a layer's top 1/16).
    """
    if mode == "layer":
        return labels
    if mode != "shared":
        raise ValueError(f"label mode {mode!r} is not one of {', '.join(TARGETS)}")
    z = (labels - labels.mean(-1, keepdim=True)) / labels.std(-1, keepdim=True).clamp_min(1e-6)
    return z.amax((0, 1)).expand_as(labels)
