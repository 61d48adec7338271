"""`lighttransfer`: the laziest layers become streaming layers (LightTransfer, arXiv 2410.13846).

Lazy ratio of a layer: the attention mass that the last `queries` queries of a prefill
chunk put on the first `sinks` tokens plus the newest `window` keys, averaged over those
queries and every query head. A layer with a high ratio barely reads the middle.

When. A streaming layer keeps sinks + window, so laziness only matters once a layer holds
more than that: the decision is taken once per conversation, in the first prefill chunk
that starts with more than `sinks + window` tokens cached (or a final chunk that ends past
it), and stands for the rest of the conversation (the evicted middle cannot come back).
Until then every layer keeps everything, which also makes a window >= the context exactly
`full`.

Bounded priority queue. During that chunk's forward the layers' ratios arrive in layer
order. A heap holds the `n - round(lazy * n)` least lazy layers seen so far; a layer that
does not get in, or is pushed out, is known to be lazy at once and is truncated to
sinks + window at the end of the chunk (the earliest point the positions invariant allows
an eviction). So at most half the layers (lazy=0.5) ever grow with the context.

Positions: a lazy layer's kept tokens are right-aligned to the frame by `KVCache.end_chunk`
(the window keeps its true positions, the sinks sit just before it); full layers keep theirs.
Stores. A lazy layer asks for full precision (`full_precision`): at its first truncation
`LayerCache` swaps a quantized store for a `FullStore`, so `lighttransfer+kivi` quantizes
the non-lazy layers only (2 bits would save little on sinks + window and cost quality
where the layer reads the most). NOTE: tokens a lazy layer had quantized before the
verdict (its first ~window tokens) stay dequantized; those after it are exact. Per-layer
bytes are `KVCache.layers[i].nbytes()`.
"""
from __future__ import annotations

import heapq

import torch

from . import evict
from .registry import Opt, register
from .slots import Selector


class LazyPlan:
    """Shared by one cache's layers: ratios, the bounded heap of full layers, the verdict."""

    def __init__(self, n_layers: int, lazy: float):
        self.n_layers = n_layers
        self.n_full = n_layers - round(lazy * n_layers)
        self.heap: list[tuple[float, int]] = []  # (-ratio, layer): top = laziest full layer
        self.ratios: dict[int, float] = {}
        self.lazy: set[int] = set()
        self.decided = False

    def offer(self, layer: int, ratio: float) -> None:
        """Layer `layer` measured `ratio`; marks whoever is now known to be lazy."""
        if layer == 0:  # a new pass (a stopped forward leaves a partial one behind)
            self.heap, self.ratios, self.lazy = [], {}, set()
        self.ratios[layer] = ratio
        if len(self.heap) < self.n_full:
            heapq.heappush(self.heap, (-ratio, layer))
        elif self.heap and ratio < -self.heap[0][0]:
            self.lazy.add(heapq.heapreplace(self.heap, (-ratio, layer))[1])
        else:
            self.lazy.add(layer)
        if layer == self.n_layers - 1:
            self.decided = True


class LightTransferSelector(Selector):
    evicts = True
    reads_attention = True  # measures laziness from the attention probabilities

    def __init__(self, opts: dict, info, layer: int):
        self.sinks, self.window, self.queries = opts["sinks"], opts["window"], opts["queries"]
        self.lazy_share = opts["lazy"]
        self.chunk = opts["chunk"] or None
        self.layer = layer
        self.shared: LazyPlan | None = None  # one per cache, set by link()
        self.heads = info.n_kv_heads

    @staticmethod
    def link(parts: list["LightTransferSelector"]) -> None:
        plan = LazyPlan(len(parts), parts[0].lazy_share)
        for part in parts:
            part.shared = plan

    @staticmethod
    def linked_state(parts: list["LightTransferSelector"]) -> tuple[dict, dict]:
        plan = parts[0].shared
        return {}, {"heap": plan.heap, "ratios": [[i, r] for i, r in plan.ratios.items()],
                    "lazy": sorted(plan.lazy), "decided": plan.decided}

    @staticmethod
    def restore_linked(parts: list["LightTransferSelector"], tensors: dict, meta: dict) -> None:
        plan = parts[0].shared
        plan.heap = [(float(r), int(i)) for r, i in meta["heap"]]  # already a heap: saved in heap order
        plan.ratios = {int(i): float(r) for i, r in meta["ratios"]}
        plan.lazy, plan.decided = {int(i) for i in meta["lazy"]}, bool(meta["decided"])

    @property
    def lazy(self) -> bool:
        return self.layer in self.shared.lazy

    @property
    def full_precision(self) -> bool:
        return self.lazy

    def _measuring(self, cache, chunk) -> bool:
        if self.shared.decided or chunk.phase == "decode":
            return False
        span = self.sinks + self.window
        return cache.length > span or (chunk.final and cache.length + chunk.n > span)

    def attend(self, cache, chunk, q, k, v, scale, extra):
        """q [Hq, T, D], k/v [Hkv, T, D] -> (out [Hq, T, D], None); measures the lazy ratio."""
        if not self._measuring(cache, chunk):
            return cache.store.attend(q, k, v, scale, extra), None
        keys, vals, _ = evict.dense_keys(cache, k, v, extra)
        out = evict.attend_plain(q, keys, vals, scale)
        probs = evict.window_probs(q, keys, scale, self.queries)  # [Hkv, g*w, L]
        n = keys.shape[1]
        near = torch.zeros(n, dtype=probs.dtype, device=probs.device)
        near[: self.sinks] = 1  # NOTE: recalled (offloaded) keys sit in front; they count as sinks' neighbours
        near[max(0, n - self.window):] = 1
        self.shared.offer(self.layer, float((probs @ near).mean()))
        return out, None

    def select(self, cache, chunk):
        """Lazy layer: indices [Hkv, sinks + window (+ final chunk)]; full layer: None."""
        if not self.lazy:
            return None
        cap, _ = evict.cap_and_fixed(self.sinks + self.window, chunk)
        n = cache.length
        if n <= cap:
            return None
        return evict.sinks_recent(n, self.sinks, cap, self.heads, cache.info.device)


@register("lighttransfer", "selector", {
    "lazy": Opt(float, 0.5, "fraction of layers that become streaming layers", min=0.0, max=1.0),
    "sinks": Opt(int, 4, "first tokens a lazy layer keeps", min=0),
    "window": Opt(int, 1024, "newest tokens a lazy layer keeps", min=1),
    "queries": Opt(int, 32, "last queries of a prefill chunk that measure laziness", min=1),
    "chunk": Opt(int, 0, "prefill chunk length (0: the runtime's --chunk-size)", min=0),
}, "the laziest layers keep sinks + window only (LightTransfer); about half the layers' memory")
def build(policy, info, layer):
    return LightTransferSelector(policy.opts, info, layer)
