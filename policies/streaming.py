"""`streaming`: attention sinks + a recent window (StreamingLLM, arXiv 2309.17453).

After each prefill chunk every layer keeps, per KV head, the first `sinks` tokens of the
conversation and the newest `window` (budget = sinks + window); the final chunk of a
prefill is never evicted (see `policies.evict`). Kept tokens take compacted positions.
No scores: conversion from any cache is exact eviction, no re-read.
"""
from __future__ import annotations

from . import evict
from .registry import Opt, register
from .slots import EvictingSelector


class StreamingSelector(EvictingSelector):
    static_decode = True  # scores nothing

    def __init__(self, opts: dict, info):
        super().__init__(opts, info)
        self.sinks = opts["sinks"]
        self.budget = self.sinks + opts["window"]

    def pick(self, cache, chunk, cap, fixed):
        """-> indices [Hkv, cap] of the sinks and the newest tokens."""
        return evict.sinks_recent(cache.length, self.sinks, cap, self.info.n_kv_heads, self.info.device)


@register("streaming", "selector", {
    "sinks": Opt(int, 4, "first tokens always kept (attention sinks)", min=0),
    "window": Opt(int, 1024, "newest tokens kept", min=1),
    "chunk": Opt(int, 0, "prefill chunk length (0: the runtime's --chunk-size)", min=0),
}, "attention sinks + recent window (StreamingLLM); memory fixed, forgets the middle")
def build(policy, info, layer):
    return StreamingSelector(policy.opts, info)
