"""`anchor`: keep the tokens that carry their sentence (AnLLM arXiv 2402.07616; SepLLM).

AnLLM checkpoints (model id containing "anllm") were fine-tuned to compress each
sentence into its anchor: `<AC>` where the tokenizer has it (AnLLM-AC), else "."
(AnLLM-EP). After each prefill chunk a layer keeps the first `sinks` tokens, the
anchors, and the unfinished sentence (every token after the last anchor).

Other models get the training-free separator variant (SepLLM): the first `sinks` tokens,
every separator token (. , ? ! ; : newline, in every form the tokenizer has: space-
prefixed, doubled newlines, ".\\n") and the newest `local` tokens. Exact retrieval from
the middle of a document suffers: `warning` says so for the UI.

Selection is by token, so every KV head keeps the same indices. Memory bound: at most
`budget` tokens stay (plus the final chunk of a prefill, never evicted, as in `locret`);
when sinks + anchors + the recent part exceed it, the *oldest* anchors go first.
"""
from __future__ import annotations

import torch

from . import evict
from .registry import Opt, SpecError, register
from .slots import EvictingSelector

SEPARATORS = (".", ",", "?", "!", ";", ":", "\n")
WARNING = "non-AnLLM models lose exact-retrieval quality under `anchor`"


def anchor_ids(tokenizer, model_id: str = "") -> tuple[frozenset, bool]:
    """-> (token ids that anchor a sentence, whether the model is an AnLLM checkpoint)."""
    if tokenizer is None:
        return frozenset(), False
    if "anllm" in (model_id or "").lower():
        ac = tokenizer.convert_tokens_to_ids("<AC>")
        if isinstance(ac, int) and ac != tokenizer.unk_token_id:
            return frozenset([ac]), True
        return _forms(tokenizer, (".",)), True
    return _forms(tokenizer, SEPARATORS), False


def _forms(tokenizer, seps) -> frozenset:
    """Every id whose text, spaces stripped, is a separator optionally followed by newlines."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    out = set()
    for i, text in enumerate(texts):
        core = text.strip(" \t")
        if core and core[0] in seps and core[1:].strip("\n") == "":
            out.add(i)
    return frozenset(out)


class AnchorSelector(EvictingSelector):
    needs_scores = True  # anchor flags ride in cache.scores; a converted cache has none
    static_decode = True  # a token's flag depends on its id only

    def __init__(self, opts: dict, info):
        super().__init__(opts, info)
        self.sinks = opts["sinks"]
        key = ("anchor-ids", info.model_id)
        if key not in info.resources:
            info.resources[key] = anchor_ids(info.tokenizer, info.model_id)
        ids, self.anllm = info.resources[key]
        self.ids = torch.tensor(sorted(ids), dtype=torch.long, device=info.device)
        self.warning = "" if self.anllm else WARNING

    def score(self, cache, chunk, k, v):
        """-> [Hkv, T] float32: 1 for an anchor token, 0 otherwise."""
        flag = torch.isin(chunk.input_ids, self.ids).float()
        return flag.expand(k.shape[0], -1).contiguous()

    def plan(self, n: int, size: int) -> list[int]:
        """`local` is the recent part kept after every chunk here, not a held-back chunk."""
        return evict.plan(n, size, 0) if n else []

    def select(self, cache, chunk):
        """-> indices [Hkv, b] (same for every head), b <= budget (+ final chunk), or None.
        Separators are dropped even under the budget: it is a cap, not a target."""
        cap, fixed = evict.cap_and_fixed(self.budget, chunk)
        n = cache.length
        is_anchor = cache.scores[0] > 0  # [n]
        dev = is_anchor.device
        if self.anllm:  # the unfinished sentence: everything after the last anchor
            where = is_anchor.nonzero()[:, 0]
            tail = n - (int(where[-1]) + 1 if where.numel() else 0)
        else:
            tail = self.local
        tail = min(n, max(tail, fixed))
        keep = torch.zeros(n, dtype=torch.bool, device=dev)
        keep[: self.sinks] = True
        keep[n - tail:] = True
        room = cap - int(keep.sum())
        mid = (is_anchor & ~keep).nonzero()[:, 0]
        if room < mid.numel():  # over budget: the newest anchors stay
            mid = mid[mid.numel() - max(room, 0):] if room > 0 else mid[:0]
        keep[mid] = True
        if int(keep.sum()) > cap:  # the unfinished part alone exceeds the cap: trim its oldest
            keep[self.sinks: n - cap + self.sinks] = False
        if bool(keep.all()):
            return None
        idx = keep.nonzero()[:, 0]
        return idx.expand(cache.info.n_kv_heads, -1)


def _check(opts):
    if opts["sinks"] + opts["local"] > opts["budget"]:
        raise SpecError(f"policy `anchor`: options `sinks` ({opts['sinks']}) + `local` ({opts['local']}) "
                        f"exceed option `budget` ({opts['budget']}), which bounds every layer's memory")


@register("anchor", "selector", {
    "budget": Opt(int, 1024, "most tokens kept per KV head after each chunk (oldest anchors go first)", min=1),
    "sinks": Opt(int, 4, "first tokens always kept", min=0),
    "local": Opt(int, 256, "newest tokens kept (separator variant; AnLLM keeps the unfinished sentence)", min=0),
    "chunk": Opt(int, 0, "prefill chunk length (0: the runtime's --chunk-size)", min=0),
}, "anchor/separator tokens carry each sentence (AnLLM / SepLLM); non-AnLLM models lose exact retrieval", _check)
def build(policy, info, layer):
    return AnchorSelector(policy.opts, info)
