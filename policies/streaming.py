"""`streaming`: attention sinks + a recent window (StreamingLLM, arXiv 2309.17453).

After each prefill chunk every layer keeps, per KV head, the first `sinks` tokens of the
conversation and the newest `window` (budget = sinks + window); the final chunk of a
prefill is never evicted (see `policies.evict`). Kept tokens take compacted positions.
No scores: conversion from any cache is exact eviction, no re-read.
"""
from __future__ import annotations

from . import evict
from .registry import Opt, register


class StreamingSelector:
    evicts = True
    static_decode = True  # scores nothing

    def __init__(self, opts: dict, info):
        self.sinks, self.window = opts["sinks"], opts["window"]
        self.budget = self.sinks + self.window
        self.chunk = opts["chunk"] or None  # None: the runtime's --chunk-size
        self.local = 0
        self.heads = info.n_kv_heads

    def score(self, cache, chunk, k, v):
        return None

    def keep(self, cache, chunk):
        """-> indices [Hkv, budget (+ final chunk)] of sinks + newest, or None."""
        cap, _ = evict.cap_and_fixed(self.budget, chunk)
        n = cache.length
        if n <= cap:
            return None
        return evict.sinks_recent(n, self.sinks, cap, self.heads, cache.info.device)


@register("streaming", "selector", {
    "sinks": Opt(int, 4, "first tokens always kept (attention sinks)", min=0),
    "window": Opt(int, 1024, "newest tokens kept", min=1),
    "chunk": Opt(int, 0, "prefill chunk length (0: the runtime's --chunk-size)", min=0),
}, "attention sinks + recent window (StreamingLLM); memory fixed, forgets the middle")
def build(policy, info, layer):
    return StreamingSelector(policy.opts, info)
