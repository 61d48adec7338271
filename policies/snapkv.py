"""`snapkv`: the last queries of each chunk vote for the keys to keep (SnapKV, arXiv 2404.14469).

Each prefill chunk's last `window` queries attend over every stored key; their softmax
probabilities, summed over those queries and over the query heads of each KV group and
smoothed along the tokens by an average pool of width `kernel`, become every stored
token's score (re-voted each chunk, not accumulated). After the chunk the layer keeps,
per KV head, the newest `window` tokens plus the best-voted rest, `budget` in all (the
chunked-prefill semantics of `policies.evict`). Query-aware: the final chunk of a prefill
holds its last `local` tokens, so when the prompt ends with the question, the question's
tokens are the voters of the final eviction. Decode attends normally and scores 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import evict
from .registry import Opt, SpecError, register
from .slots import EvictingSelector


class SnapKVSelector(EvictingSelector):
    needs_scores = True  # no votes in a converted cache: re-read
    reads_attention = True

    def __init__(self, opts: dict, info):
        super().__init__(opts, info)
        self.window, self.kernel = opts["window"], opts["kernel"]

    def attend(self, cache, chunk, q, k, v, scale, extra):
        """q [Hq, T, D], k/v [Hkv, T, D] -> (out [Hq, T, D], new tokens' votes [Hkv, T])."""
        if chunk.phase == "decode":
            out = cache.store.attend(q, k, v, scale, extra)
            return out, torch.zeros(k.shape[0], k.shape[1], device=k.device)
        keys, vals, n_extra = evict.dense_keys(cache, k, v, extra)
        out = evict.attend_plain(q, keys, vals, scale)
        votes = evict.window_probs(q, keys, scale, self.window).sum(1)[:, n_extra:]  # [Hkv, L]
        if self.kernel > 1:
            votes = F.avg_pool1d(votes[:, None], self.kernel, 1, self.kernel // 2,
                                 count_include_pad=False)[:, 0]
        old = cache.length
        if old:
            cache.scores = votes[:, :old].contiguous()
        return out, votes[:, old:]

    def pick(self, cache, chunk, cap, fixed):
        """-> sorted indices [Hkv, cap]: the observation window and the best voted."""
        return evict.top(cache.scores, cap, self.window + fixed)


def _check(opts):
    if opts["window"] >= opts["budget"]:
        raise SpecError(f"policy `snapkv`: option `window` ({opts['window']}) must be below option "
                        f"`budget` ({opts['budget']}): the observation window is kept inside the budget")
    if opts["kernel"] % 2 == 0:
        raise SpecError(f"option `kernel` of policy `snapkv`: {opts['kernel']} must be odd (a centred pool)")


@register("snapkv", "selector", {
    "budget": Opt(int, 1024, "tokens kept per KV head after each chunk", min=1),
    "window": Opt(int, 32, "last queries of a chunk that vote (their tokens are kept)", min=1),
    "kernel": Opt(int, 7, "width of the pooling over votes (odd; 1: none)", min=1),
    "chunk": Opt(int, 0, "prefill chunk length (0: the runtime's --chunk-size)", min=0),
    "local": Opt(int, 100, "last tokens of a prefill read as the final, voting chunk", min=0),
}, "observation window: the last queries vote for the keys to keep (SnapKV), query-aware", _check)
def build(policy, info, layer):
    return SnapKVSelector(policy.opts, info)
