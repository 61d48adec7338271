"""The cache every decoder layer owns, composed of policy slots.

A layer's cache has up to five slots, filled from the spec (see `registry`); each slot
kind is a base class in `policies.slots` that declares what the cache may ask of it:

- **selector** decides which tokens stay (`full` keeps all; `locret`, `streaming`, ...
  evict after each prefill chunk);
- **store** decides how kept tokens are held (`FullStore` here; `kivi` quantized);
- **spill** receives evicted tokens (absent: they are dropped; `offload`: host + recall);
- **reader** decides which stored tokens attention reads (`doublesparse`);
- **ffn** acts on the model, not the cache (`ffnskip`); the adapter routes it.

Positions. NOTE (invariant relied on everywhere): for every layer,
`base + store.length == KVCache.next_position`, and the stored token at index i sits
at RoPE position `base + i`. Eviction keeps tokens in their original order and moves
them to consecutive positions right-aligned to the frame; when every layer keeps the
same count the frame itself resets to that count (compacted positions, as Locret and
StreamingLLM do), so a model with an 8K window reads a 100K document in a 2K budget.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from . import capacity, static
from .full import FullStore, KeepAll  # noqa: F401  (the default store and selector)
from .kernels.switch import Kernels
from .registry import Policy, REGISTRY, SpecError, parse_spec, spec_of
from .slots import Ffn


@dataclass
class ModelInfo:
    """What policies may know about the model; `resources` caches files shared by layers."""

    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    inv_freq: torch.Tensor  # [rot/2] float32, the model's (unscaled) RoPE frequencies
    window: int  # native context length
    model_id: str = ""
    hidden_size: int = 0
    tokenizer: Any = None
    resources: dict = field(default_factory=dict)  # files read once per model (heads, channels)
    kernels: Kernels = field(default_factory=Kernels.from_env)  # which kernel paths run
    windows: tuple = ()  # per layer: its sliding attention window in tokens, 0 = global (() = all global)
    softcap: float = 0.0  # attention-logit soft-capping c (Gemma 2): logits -> c * tanh(logits / c); 0 = none
    local_inv_freq: torch.Tensor | None = None  # [rot/2] RoPE frequencies of the sliding layers, where they differ (Gemma 3)
    # folders holding files trained or calibrated for models on this machine (DIR/heads/KEY/,
    # DIR/channels/KEY/), searched before the shipped ones (policies.files.find_file)
    search_dirs: tuple = ()

    @property
    def group(self) -> int:
        return self.n_q_heads // self.n_kv_heads

    def kv_bytes_per_token(self) -> int:
        """Full-precision K+V bytes per token per layer."""
        return 2 * self.n_kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


@dataclass
class Chunk:
    """One forward pass worth of new tokens, shared by all layers."""

    input_ids: torch.Tensor  # [T]
    start: int  # rope position of the first new token (== KVCache.next_position)
    phase: str = "prefill"  # or "decode"
    final: bool = True  # last chunk of this prefill: selectors do not evict after it
    hidden: dict = field(default_factory=dict)  # layer -> normed layer input [T, hidden]
    static: "static.StaticStep | None" = None  # a fixed-shape decode step (policies/static.py)

    @property
    def n(self) -> int:
        return self.input_ids.shape[-1]


class LayerCache:
    """One decoder layer's cache: the slots of the spec, plus token bookkeeping."""

    def __init__(self, info: ModelInfo, layer: int, selector, store, spill=None, reader=None):
        self.info, self.layer = info, layer
        self.selector, self.store, self.spill, self.reader = selector, store, spill, reader
        self.base = 0  # rope position of stored index 0
        self.pos: torch.Tensor | None = None  # [Hkv, T] conversation index per token; None = base..
        self.scores: torch.Tensor | None = None  # [Hkv, T] float32 selector scores, if any
        self.seen = 0  # tokens ever appended (conversation index of the next token)

    @property
    def length(self) -> int:
        return self.store.length

    def positions(self) -> torch.Tensor:
        """Conversation index of each stored token, [Hkv, T] int64."""
        if self.pos is not None:
            return self.pos
        t = torch.arange(self.seen - self.length, self.seen, device=self.info.device)
        return t.expand(self.info.n_kv_heads, -1)

    def forward(self, q, k, v, scale, chunk: Chunk):
        """q [Hq, T, D], k/v [Hkv, T, D] post-RoPE at chunk positions -> out [Hq, T, D]."""
        if chunk.static is not None:
            return static.forward(self, q, k, v, scale, chunk)
        s = self.selector.score(self, chunk, k, v)
        extra = self.spill.recall(self, q, chunk) if self.spill is not None else None
        if self.selector.reads_attention:
            out, s = self.selector.attend(self, chunk, q, k, v, scale, extra)
        elif self.reader is not None:
            out = self.reader.attend(self, q, k, v, scale, extra)
        else:
            out = self.store.attend(q, k, v, scale, extra)
        self.store.append(k, v)
        self.advance(k.shape[1], s)
        return out

    def advance(self, n: int, scores: torch.Tensor | None) -> None:
        """Bookkeeping for n tokens the store just committed, with their scores [Hkv, n]
        (or None): the one path after an eager chunk and after a fixed-shape window."""
        if self.pos is not None:
            new = torch.arange(self.seen, self.seen + n, device=self.pos.device)
            self.pos = torch.cat((self.pos, new.expand(self.pos.shape[0], -1)), 1)
        if scores is not None:
            self.scores = scores if self.scores is None else torch.cat((self.scores, scores), 1)
        self.seen += n

    def select(self, chunk: Chunk) -> torch.Tensor | None:
        """Indices [Hkv, b] (sorted per head) the selector keeps now, or None."""
        return self.selector.select(self, chunk)

    def evict(self, idx: torch.Tensor, new_base: int) -> None:
        """Keep idx [Hkv, b] (sorted per head) at positions new_base..new_base+b-1."""
        b = idx.shape[1]
        old_rope = self.base + idx
        delta = torch.arange(new_base, new_base + b, device=idx.device)[None, :] - old_rope
        if self.spill is not None:
            self.spill.receive(self, _complement(idx, self.length))
        pos = self.positions().gather(1, idx)
        if self.selector.full_precision and not isinstance(self.store, FullStore):
            self._to_full_precision()
        self.store.compact(idx, delta)
        if self.reader is not None:
            self.reader.after_evict(self, idx)
        self.pos = pos
        if self.scores is not None:
            self.scores = self.scores.gather(1, idx)
        self.base = new_base

    def _to_full_precision(self) -> None:
        """Swap the store for a FullStore holding its tokens (dequantized where they were
        quantized): for a selector that keeps few tokens in a layer for good (lighttransfer's
        lazy layers) and asks for them at full precision (`Selector.full_precision`)."""
        k, v = self.store.dense()
        store = FullStore(self.info)
        store.load(k, v)
        self.store = store

    def adopt(self, src: "LayerCache") -> None:
        """Hold what another stack's layer holds (live conversion): its tokens at full
        precision, their positions and scores, and its spilled tokens where both spill."""
        k, v = src.store.dense()
        self.store.load(k, v)
        self.base, self.seen = src.base, src.seen
        self.pos = None if src.pos is None else src.pos.clone()
        self.scores = None if src.scores is None else src.scores.clone()
        if src.spill is not None and self.spill is not None:
            self.spill.adopt(src.spill)

    def rebase(self, new_base: int) -> None:
        """Shift every stored token by (new_base - base) positions."""
        if new_base == self.base or self.length == 0:
            self.base = new_base
            return
        idx = torch.arange(self.length, device=self.info.device).expand(self.info.n_kv_heads, -1)
        self.evict(idx, new_base)

    def nbytes(self) -> Counter:
        """Exact bytes by (tier, kind)."""
        out = Counter()
        for kind, n in self.store.nbytes().items():  # a kind, or (tier, kind) for a two-tier store
            out[kind if isinstance(kind, tuple) else (self.store.tier, kind)] += n
        if self.pos is not None:
            out[(self.store.tier, "index")] += self.pos.nbytes
        if self.scores is not None:
            out[(self.store.tier, "scores")] += self.scores.nbytes
        for part in self.parts(with_store=False):
            for (tier, kind), n in part.nbytes().items():
                out[(tier, kind)] += n
        return out

    def parts(self, with_store: bool = True) -> list:
        """The slot parts this layer has (selector, store, spill, reader)."""
        parts = (self.selector, self.store, self.spill, self.reader) if with_store else (
            self.selector, self.spill, self.reader)
        return [p for p in parts if p is not None]


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Per-head sorted indices in 0..n-1 not in idx [Hkv, b] -> [Hkv, n-b]."""
    mask = torch.ones(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, idx, False)
    return mask.nonzero()[:, 1].reshape(idx.shape[0], n - idx.shape[1])


class KVCache:
    """The whole model's cache: one LayerCache per decoder layer, built from a spec."""

    ffn: Ffn | None = None  # the spec's model-level part (`ffnskip`); the adapter routes FFN blocks through it

    def __init__(self, spec: str | dict, info: ModelInfo):
        self.slots = parse_spec(spec) if isinstance(spec, str) else dict(spec)
        self.info = info
        if "selector" not in self.slots:
            self.slots["selector"] = Policy("full", "selector", {})
        self.layers = [self._build_layer(i) for i in range(info.n_layers)]
        for slot in ("selector", "store", "spill", "reader"):  # parts that share state across layers
            parts = [getattr(l, slot) for l in self.layers if getattr(l, slot) is not None]
            if parts:
                parts[0].link(parts)
        # the adapter captures each layer's normed input only for selectors that score it
        self.needs_hidden = any(l.selector.needs_hidden for l in self.layers)
        ffn = self.slots.get("ffn")  # model-level: one component, the adapter attaches it
        self.ffn = REGISTRY[ffn.name].build(ffn, info, None) if ffn else None
        self.next_position = 0
        self.peak_bytes = 0
        self._shared = 0  # leading score columns already shared across layers (share_scores)

    @property
    def spec(self) -> str:
        """The canonical spec of this cache (`registry.canonical_spec`)."""
        return spec_of(self.slots)

    def _build_layer(self, i: int) -> LayerCache:
        made = {}
        for slot in ("selector", "store", "spill", "reader"):
            pol = self.slots.get(slot)
            made[slot] = REGISTRY[pol.name].build(pol, self.info, i) if pol else None
        if made["reader"] is not None and made["selector"].reads_attention:
            raise SpecError(f"`{self.slots['selector'].name}` reads the attention of every stored token; "
                            f"it cannot be combined with `{self.slots['reader'].name}`, which reads a subset")
        if made["store"] is None:
            made["store"] = FullStore(self.info)
        return LayerCache(self.info, i, made["selector"], made["store"], made["spill"], made["reader"])

    @property
    def length(self) -> int:
        """Tokens held per KV head (the largest over layers)."""
        return max(l.length for l in self.layers)

    @property
    def seen(self) -> int:
        return self.layers[0].seen

    @property
    def evicts(self) -> bool:
        return self.layers[0].selector.evicts

    @torch.inference_mode()  # NOTE: stores are inference tensors (filled in forward); evict in place
    def end_chunk(self, chunk: Chunk) -> None:
        """After a prefill chunk: let every layer's selector evict, then fix the frame."""
        if self.layers[0].selector.share_scores:
            self._share_scores(self.layers[0].selector)
        picks = [l.select(chunk) for l in self.layers]
        if any(p is not None for p in picks):
            lens = [p.shape[1] if p is not None else l.length for p, l in zip(picks, self.layers)]
            new_next = max(lens)
            for layer, p, n in zip(self.layers, picks, lens):
                if p is not None:
                    layer.evict(p, new_next - n)
                else:
                    layer.rebase(new_next - n)
            self.next_position = new_next
            self._shared = self.layers[0].length
        self.track_peak()

    def _share_scores(self, selector) -> None:
        """Replace the scores of the tokens scored since the last chunk, in every layer and
        head, by `selector.combine` of all of them ([L, Hkv, T] -> [T]): one score per
        token, so every layer keeps the same tokens. Layers then hold the same tokens, and
        the unshared scores are the columns past `_shared` (layers of unequal length, e.g.
        after a policy switch, share nothing and select per layer)."""
        n = self.layers[0].length
        if any(l.scores is None or l.length != n or l.scores.shape[1] != n for l in self.layers):
            return
        s0 = min(self._shared, n)
        if s0 == n:
            return
        one = selector.combine(torch.stack([l.scores[:, s0:] for l in self.layers]))
        for l in self.layers:
            l.scores = torch.cat((l.scores[:, :s0], one.expand(l.scores.shape[0], -1)), 1)
        self._shared = n

    def give_tokens(self, get) -> bool:
        """Parts that follow the conversation's token ids (`token_log`: offload's quotes) and
        lack some of them, as after a live conversion from a cache that keeps none, take
        them from get() -> list[int] (every token read so far). -> whether any took them."""
        logs = {}
        for l in self.layers:
            for part in l.parts():
                log = part.token_log
                if log is not None and log.n < self.seen:
                    logs[id(log)] = log
        if not logs:
            return False
        ids = get()
        return any([log.fill(ids, self.seen) for log in logs.values()])

    def warnings(self) -> list[str]:
        """What the policy's parts say a person should know (e.g. `anchor` on a model not
        trained for it), each once."""
        out = []
        for layer in self.layers:
            for part in layer.parts():
                w = part.warning
                if w and w not in out:
                    out.append(w)
        return out

    def track_peak(self) -> int:
        total = sum(self.nbytes().values())
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def nbytes(self) -> Counter:
        out = Counter()
        for l in self.layers:
            out.update(l.nbytes())
        return out

    def bytes_by_tier(self) -> dict[str, int]:
        out = {"gpu": 0, "host": 0}
        for (tier, _), n in self.nbytes().items():
            out[tier] += n
        return out

    def projected_length(self, n_new: int, chunk: int, answer: int = 0) -> int:
        """Largest retained length (tokens per KV head) while reading n_new more tokens in
        chunks of `chunk` (a selector's own chunk size wins), then decoding `answer`."""
        return max(capacity.lengths(self.layers[0].selector, n_new, chunk, self.length, answer))

    def expect(self, n_new: int, chunk: int, answer: int = capacity.ANSWER) -> None:
        """Reading n_new more tokens, then an answer: stores that grow expensively
        (`reserve_ahead`: pinned host memory, where growing by an eighth at a time re-pins
        and re-copies ~9x the final size, and one growth at 128K stalls a token for
        seconds) take the projected length with `answer` tokens at once."""
        need = self.projected_length(n_new, chunk, answer)
        for l in self.layers:
            if l.store.reserve_ahead:
                l.store.reserve(need)

    def bytes_per_token(self) -> float:
        """Cache bytes per retained token, all layers (a store may say; else full precision)."""
        return sum(l.store.token_bytes() for l in self.layers)

    def truncate(self, n_seen: int) -> bool:
        """Forget the tokens appended after conversation index n_seen, where no layer has
        evicted anything. Returns False where that is impossible (the caller re-prefills)."""
        if any(l.pos is not None or l.base != 0 or l.spill is not None for l in self.layers):
            return False
        for l in self.layers:
            l.store.truncate(n_seen)
            if l.scores is not None:
                l.scores = l.scores[:, :n_seen]
            l.seen = min(l.seen, n_seen)
        self.next_position = self.layers[0].seen
        return True
