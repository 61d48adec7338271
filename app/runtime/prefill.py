"""The one chunked-prefill loop: the runtime, every bench suite and the tests read tokens
into a cache through `prefill`.

Chunking bounds the attention scores of one forward to [chunk, retained] (not [T, T]), and
gives an evicting selector a point after every chunk to drop what it will not keep
(`KVCache.end_chunk`): reading 100K tokens into a 2K budget never holds more than budget +
chunk tokens.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from policies import Chunk, KVCache

from .types import Progress, Stopped


def chunk_plan(cache: KVCache, n: int, default_size: int) -> list[int]:
    """Lengths of the chunks that read n tokens into `cache`: the selector's own chunk
    size where it has one (else default_size), split by its plan (`Selector.plan`)."""
    sel = cache.layers[0].selector
    return sel.plan(n, sel.chunk or default_size)


def prefill(adapter, cache: KVCache, ids, size: int | None = None, *, plan: list[int] | None = None,
            final: bool = True, all_logits: bool = False, progress: Progress | None = None,
            stop: threading.Event | None = None,
            on_chunk: Callable[[Chunk, torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """Read ids [T] (a list or a tensor) into `cache` at its next position, chunk by chunk.

    plan: the chunks' lengths (default `chunk_plan(cache, T, size)`). final: whether the
    last chunk ends this read (selectors hold back their local window on it; False when
    more tokens follow at once). progress(done, total) after every chunk; a set `stop`
    raises `Stopped` before the next one (what was read stays in the cache: the caller
    decides whether to roll back). on_chunk(chunk, logits) after a chunk's forward,
    before the cache's selectors evict (tests look there).

    -> float32 logits [V] of the last token, [T, V] with all_logits; None for no ids.
    """
    x = torch.as_tensor(ids, dtype=torch.long, device=adapter.info.device)
    n = x.shape[0]
    if plan is None:
        plan = chunk_plan(cache, n, size) if n else []
    if sum(plan) != n:
        raise ValueError(f"chunk plan {plan} covers {sum(plan)} tokens, not {n}")
    cache.expect(n, plan[0] if plan else 0)
    done, out, last = 0, [], None
    for i, m in enumerate(plan):
        if stop is not None and stop.is_set():
            raise Stopped(f"stopped after {done:,} of {n:,} tokens")
        chunk = Chunk(x[done:done + m], cache.next_position, "prefill", final=final and i == len(plan) - 1)
        logits = adapter.forward(chunk.input_ids, cache, chunk, all_logits=all_logits)
        if on_chunk is not None:
            on_chunk(chunk, logits)
        cache.end_chunk(chunk)
        done += m
        if all_logits:
            out.append(logits)
        last = logits
        if progress is not None:
            progress(done, n)
    return torch.cat(out) if all_logits and out else last
