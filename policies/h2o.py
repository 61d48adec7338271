"""`h2o`: heavy hitters by accumulated attention mass (H2O, arXiv 2306.14048).

Every token's score is the attention probability it has received, summed over all
queries so far (prefill and decode) and over the query heads of its KV group
(`attend_with_mass`). After each prefill chunk a layer keeps, per KV head, the newest
`recent` tokens plus the highest-scored rest, `budget` in all (chunked-prefill semantics
of `policies.evict`, the same as `locret`). Attention runs over the store's dense K/V so
the probabilities exist: any store works (kivi is dequantized for it, at a cost); a
`reader` that reads a subset of tokens cannot be combined.
"""
from __future__ import annotations

from . import evict
from .attention import attend_with_mass
from .registry import Opt, SpecError, register
from .slots import EvictingSelector


class H2OSelector(EvictingSelector):
    needs_scores = True  # conversion from a cache without recorded mass re-reads
    reads_attention = True

    def __init__(self, opts: dict, info):
        super().__init__(opts, info)
        self.recent = opts["recent"]

    def attend(self, cache, chunk, q, k, v, scale, extra):
        """q [Hq, T, D], k/v [Hkv, T, D] -> (out [Hq, T, D], new tokens' mass [Hkv, T])."""
        keys, vals, n_extra = evict.dense_keys(cache, k, v, extra)
        out, mass = attend_with_mass(q, keys, vals, scale)  # mass [Hkv, L]
        mass = mass[:, n_extra:]
        old = cache.length
        if old and cache.scores is not None:
            cache.scores += mass[:, :old]
        return out, mass[:, old:]

    def pick(self, cache, chunk, cap, fixed):
        """-> sorted indices [Hkv, cap]: the newest `recent` and the heavy hitters."""
        return evict.top(cache.scores, cap, self.recent + fixed)


def _check(opts):
    if opts["recent"] >= opts["budget"]:
        raise SpecError(f"policy `h2o`: option `recent` ({opts['recent']}) must be below option "
                        f"`budget` ({opts['budget']}): the recent window counts inside the budget")


@register("h2o", "selector", {
    "budget": Opt(int, 1024, "tokens kept per KV head after each chunk", min=1),
    "recent": Opt(int, 256, "newest tokens always kept (inside the budget)", min=0),
    "chunk": Opt(int, 0, "prefill chunk length (0: the runtime's --chunk-size)", min=0),
    "local": Opt(int, 100, "last tokens of a prefill read without eviction", min=0),
}, "heavy hitters: keep the tokens with the most accumulated attention (H2O); fixed memory", _check)
def build(policy, info, layer):
    return H2OSelector(policy.opts, info)
