"""Decode with fixed shapes: a window of steps that a CUDA graph can capture and replay
(`app/runtime/decode.py` drives it).

When a window opens every layer's store has room for `room` more tokens. Step s (the
device tensor `StaticStep.step`, set before each replay) writes its K/V, and its score,
at index `start[layer] + s`, and attends over the fixed span `0 .. end[layer]` with the
not-yet-written tail masked off. Nothing else changes until `close_window` commits the
steps taken: lengths, conversation indices, scores, `next_position` -- the same state
`LayerCache.forward` leaves, one token at a time (tests/test_decode.py).

A cache qualifies when its stores have buffers to write into (`static_decode` on the
store: `FullStore`), no spill or reader acts per step, and its selector's decode score is
a pure function of the step's inputs (`static_decode` on the selector).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attend_window
from .kernels import triton_ok, window_attn

KERNEL: bool | None = None  # the Triton window kernel: None = on CUDA where Triton runs; tests force it


@dataclass
class StaticStep:
    step: torch.Tensor  # [1] int64 on the device: steps taken in this window
    start: list[int]  # per layer: the store's length when the window opened
    end: list[int]  # per layer: the span attention reads (start + room, rounded up)
    room: int  # steps this window holds
    scores: list  # per layer: [Hkv, room] float32 scores of the steps, or None


def reason(cache) -> str:
    """Why `cache` (a KVCache) cannot decode in fixed-shape windows ("" if it can)."""
    if cache.ffn is not None:
        return "`ffnskip` decides per token which layers run their FFN"
    for layer in cache.layers:
        if not getattr(layer.store, "static_decode", False):
            return f"store `{type(layer.store).__name__}` decodes its own way"
        if layer.spill is not None or layer.reader is not None:
            return "a spill or reader acts per decode step"
        if not getattr(layer.selector, "static_decode", False):
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
        layer.store._reserve(e)
        # NOTE: the masked tail still enters P @ V with weight 0, and 0 x NaN is NaN:
        # memory the allocator hands back may hold any bits, so clear it
        layer.store.k[:, s:e].zero_()
        layer.store.v[:, s:e].zero_()
        wants = layer.scores is not None or getattr(layer.selector, "needs_scores", False)
        scores.append(torch.zeros(cache.info.n_kv_heads, room, dtype=torch.float32, device=dev)
                      if wants else None)
    return StaticStep(torch.zeros(1, dtype=torch.long, device=dev), start, end, room, scores)


def forward(layer, q, k, v, scale, chunk):
    """One decode token of `layer` (a LayerCache) in chunk.static's window: q [Hq, 1, D],
    k/v [Hkv, 1, D] post-RoPE -> [Hq, 1, D]. Fixed shapes, no host sync, nothing committed."""
    st = chunk.static
    i, store = layer.layer, layer.store
    kernel = KERNEL if KERNEL is not None else (q.is_cuda and triton_ok(q.device))
    if kernel:
        window_attn.write_rows(store.k, store.v, k, v, st.step, st.start[i])
    else:
        at = st.step + st.start[i]
        store.k.index_copy_(1, at, k)
        store.v.index_copy_(1, at, v)
    s = layer.selector.score(layer, chunk, k, v)
    if s is not None:
        st.scores[i].index_copy_(1, st.step, s)
    n = st.end[i]
    if kernel:
        return window_attn.attend_window(q, store.k[:, :n], store.v[:, :n], scale, st.step, st.start[i])
    valid = torch.arange(n, device=q.device) <= st.step + st.start[i]
    return attend_window(q, store.k[:, :n], store.v[:, :n], scale, valid)


@torch.inference_mode()
def close_window(cache, st: StaticStep, n: int) -> None:
    """Commit the first n steps of window st to every layer (as `LayerCache.forward` would)."""
    if n:
        for layer, sc in zip(cache.layers, st.scores):
            layer.store.length += n
            if layer.pos is not None:
                new = torch.arange(layer.seen, layer.seen + n, device=layer.pos.device)
                layer.pos = torch.cat((layer.pos, new.expand(layer.pos.shape[0], -1)), 1)
            if sc is not None:
                sc = sc[:, :n].clone()
                layer.scores = sc if layer.scores is None else torch.cat((layer.scores, sc), 1)
            layer.seen += n
        cache.next_position += n
    cache.track_peak()
