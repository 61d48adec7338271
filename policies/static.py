"""Decode with fixed shapes: a window of steps that a CUDA graph can capture and replay
(`app/runtime/decode.py` drives it).

When a window opens every layer's store has room for `room` more tokens. Step s (the
device tensor `StaticStep.step`, set before each replay) writes its K/V, and its score,
at index `start[layer] + s`, and attends over the fixed span `0 .. end[layer]` with the
not-yet-written tail masked off. Nothing else changes until `close_window` commits the
steps taken: lengths, conversation indices, scores, `next_position` -- the same state
`LayerCache.forward` leaves, one token at a time (tests/test_decode.py).

A cache qualifies when its stores have buffers to write into (`Store.static_decode`:
`FullStore`), no spill or reader acts per step, and its selector's decode score is a pure
function of the step's inputs (`Selector.static_decode`). Only the store touches its
buffers: `open_window`, `write_step`, `window`, and `commit`, the same commit an eager
chunk ends with; `LayerCache.advance` does the rest of the bookkeeping for both paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attend_window
from .kernels import window_attn


@dataclass
class StaticStep:
    step: torch.Tensor  # [1] int64 on the device: steps taken in this window
    start: list[int]  # per layer: the store's length when the window opened
    end: list[int]  # per layer: the span attention reads (start + room, rounded up)
    room: int  # steps this window holds
    scores: list  # per layer: [Hkv, room] float32 scores of the steps, or None
    kernel: bool = False  # the Triton window kernel (ModelInfo.kernels.window)


def reason(cache) -> str:
    """Why `cache` (a KVCache) cannot decode in fixed-shape windows ("" if it can)."""
    if cache.ffn is not None:
        return "`ffnskip` decides per token which layers run their FFN"
    for layer in cache.layers:
        if not layer.store.static_decode:
            return f"store `{type(layer.store).__name__}` decodes its own way"
        if layer.spill is not None or layer.reader is not None:
            return "a spill or reader acts per decode step"
        if not layer.selector.static_decode:
            return f"selector `{type(layer.selector).__name__}` updates state per decode step"
    return ""


@torch.inference_mode()
def open_window(cache, room: int) -> StaticStep:
    """Make room for `room` decode tokens in every layer; -> the window's StaticStep."""
    dev = cache.info.device
    start = [l.length for l in cache.layers]
    end = [-(-(s + room) // 64) * 64 for s in start]  # aligned spans
    scores = []
    for layer, s, e in zip(cache.layers, start, end):
        layer.store.open_window(s, e)
        wants = layer.scores is not None or layer.selector.needs_scores
        scores.append(torch.zeros(cache.info.n_kv_heads, room, dtype=torch.float32, device=dev)
                      if wants else None)
    return StaticStep(torch.zeros(1, dtype=torch.long, device=dev), start, end, room, scores,
                      cache.info.kernels.on("window", dev))


def forward(layer, q, k, v, scale, chunk):
    """One decode token of `layer` (a LayerCache) in chunk.static's window: q [Hq, 1, D],
    k/v [Hkv, 1, D] post-RoPE -> [Hq, 1, D]. Fixed shapes, no host sync, nothing committed."""
    st = chunk.static
    i = layer.layer
    layer.store.write_step(k, v, st.step, st.start[i], st.kernel)
    s = layer.selector.score(layer, chunk, k, v)
    if s is not None:
        st.scores[i].index_copy_(1, st.step, s)
    keys, vals = layer.store.window(st.end[i])
    if st.kernel:
        return window_attn.attend_window(q, keys, vals, scale, st.step, st.start[i])
    valid = torch.arange(keys.shape[1], device=q.device) <= st.step + st.start[i]
    return attend_window(q, keys, vals, scale, valid)


@torch.inference_mode()
def close_window(cache, st: StaticStep, n: int) -> None:
    """Commit the first n steps of window st to every layer (as `LayerCache.forward` would)."""
    if n:
        for layer, sc in zip(cache.layers, st.scores):
            layer.store.commit(n)
            layer.advance(n, None if sc is None else sc[:, :n].clone())
        cache.next_position += n
    cache.track_peak()
