"""The slot contract: what a layer's cache (`policies.base.LayerCache`) may ask of each part.

A spec fills up to five slots per layer (see `registry`). Each slot kind is a base class
here that declares every capability the cache uses, with its default, its shapes and when
it is called. The cache calls methods and reads these attributes; it never probes a part
for an attribute, so a part gets a capability only by declaring it.

Shapes: q [Hq, T, D]; k, v [Hkv, T, D] post-RoPE at the chunk's positions; scores
[Hkv, T] float32; per-head token indices idx [Hkv, b], sorted ascending per head.
Bytes: `nbytes()` -> {(tier, kind): bytes}, tier "gpu" (the compute device) or "host".
"""
from __future__ import annotations

import torch

from . import evict


class Part:
    """What every slot kind shares."""

    warning = ""  # one line a person should know about this part (the UI shows it once)

    @property
    def token_log(self):
        """An object following the conversation's token ids (`fill(ids, seen)`, `n`), or None.
        `KVCache.give_tokens` fills it after a live conversion from a cache that kept none."""
        return None

    @staticmethod
    def link(parts: list) -> None:
        """Called once per cache with this slot's part of every layer (layer order): the
        place to share state between the layers of one cache (never through the model)."""

    def nbytes(self) -> dict:
        """Exact bytes held by this part, beyond the store's: {(tier, kind): bytes}."""
        return {}

    # Cache files (app/runtime/snapshot.py). NOTE: exactness is the contract: a part built
    # fresh for the same spec and model, given `restore(*state())`, behaves bit for bit as
    # this one -- the next forward's outputs and `nbytes()` equal. Options and files read at
    # construction (heads, channels) are not state: the fresh part has them already.
    def state(self) -> tuple[dict, dict]:
        """What this part holds beyond its construction: (tensors {name: Tensor}, which may be
        views and are copied to the host by the writer; meta {name: JSON value})."""
        return {}, {}

    def restore(self, tensors: dict, meta: dict) -> None:
        """Take back what `state` gave (tensors on the host, dtypes as saved), on a part just
        built. Raises ValueError (or the torch error of a shape that does not fit) for a state
        made by another spec or model."""

    @staticmethod
    def linked_state(parts: list) -> tuple[dict, dict]:
        """Like `state`, for what `link` shares between the layers: saved once per cache,
        called with this slot's part of every layer (layer order)."""
        return {}, {}

    @staticmethod
    def restore_linked(parts: list, tensors: dict, meta: dict) -> None:
        """Take back `linked_state` on freshly linked parts (before each part's `restore`)."""


class Selector(Part):
    """Decides which tokens stay. Called per layer: `score` as a chunk's tokens arrive (before
    attention), `attend` instead of the store's attention if `reads_attention`, then after
    every prefill chunk `select` (all layers, then `KVCache` evicts what was not picked)."""

    evicts = False  # it may drop tokens: positions are compacted, truncation is impossible
    budget: int | None = None  # tokens kept per KV head after a chunk (None: unbounded)
    local = 0  # last tokens of a prefill held back as its final chunk (never evicted)
    chunk: int | None = None  # its own prefill chunk length (None: the runtime's)
    needs_hidden = False  # the adapter captures each layer's normed input into chunk.hidden
    needs_scores = False  # selection reads scores recorded at prefill (a converted cache without them re-reads)
    share_scores = False  # scores are combined over layers by `combine` before selection
    reads_attention = False  # `attend` replaces the store's attention (it needs the probabilities)
    static_decode = False  # `score` of a decode token is a pure function of the step's inputs
    full_precision = False  # this layer wants its tokens unquantized (a FullStore) from its next eviction

    def plan(self, n: int, size: int) -> list[int]:
        """Chunk lengths for n new prefill tokens given chunk size `size`."""
        return evict.plan(n, size, self.local) if n else []

    def score(self, cache, chunk, k, v) -> torch.Tensor | None:
        """-> scores [Hkv, T] of the chunk's new tokens (appended to cache.scores), or None."""
        return None

    def attend(self, cache, chunk, q, k, v, scale, extra):
        """Only if `reads_attention`: -> (out [Hq, T, D], new tokens' scores [Hkv, T] or None);
        may update cache.scores of the stored tokens in place."""
        return cache.store.attend(q, k, v, scale, extra), None

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """Only if `share_scores`: [L, Hkv, T] scores of the new tokens -> one per token [T]."""
        return scores.mean((0, 1))

    def select(self, cache, chunk) -> torch.Tensor | None:
        """After a prefill chunk: -> indices [Hkv, b] to keep, or None (keep all)."""
        return None


class EvictingSelector(Selector):
    """A selector with a budget, following the chunked-prefill semantics of `policies.evict`:
    after a non-final chunk a layer keeps `budget` tokens per KV head; after the final chunk
    it keeps `budget` plus that chunk, whose tokens are never evicted. A subclass fills in
    `pick` (and `score`/`attend` if it scores); options `budget`, `local` and `chunk`
    (0: the runtime's) are read here when the policy has them."""

    evicts = True

    def __init__(self, opts: dict, info):
        self.info = info
        self.budget = opts.get("budget", self.budget)
        self.local = opts.get("local", 0)
        self.chunk = opts.get("chunk") or None

    def select(self, cache, chunk) -> torch.Tensor | None:
        cap, fixed = evict.cap_and_fixed(self.budget, chunk)
        if cache.length <= cap:
            return None
        return self.pick(cache, chunk, cap, fixed)

    def pick(self, cache, chunk, cap: int, fixed: int) -> torch.Tensor:
        """-> sorted indices [Hkv, cap] of cache.length tokens; the newest `fixed` must be in."""
        raise NotImplementedError


class Store(Part):
    """Holds the kept tokens. Invariant (policies/base.py): stored index i sits at RoPE
    position `layer.base + i`; `length` tokens per KV head.

    Eager path per chunk: `attend` (may stage the new tokens in its buffers), then `commit`
    through `append`. Fixed-shape decode (`static_decode`, policies/static.py): `open_window`,
    then per step `write_step` + `window`, then `commit` of the steps taken."""

    tier = "gpu"  # where its tokens live (kinds from nbytes() without a tier get this one)
    lossless = False  # dense() gives back exactly what was appended
    static_decode = False  # implements open_window / write_step / window
    reserve_ahead = False  # growing is expensive: `reserve` the projected length at once

    def __init__(self, info):
        self.info = info
        self.length = 0

    def attend(self, q, k, v, scale, extra=None) -> torch.Tensor:
        """q [Hq, T, D] over the stored tokens, `extra` (k, v) in front, and new k/v -> [Hq, T, D]."""
        raise NotImplementedError

    def append(self, k, v) -> None:
        """Commit the new k/v [Hkv, T, D] (the ones `attend` just saw)."""
        raise NotImplementedError

    def commit(self, n: int) -> None:
        """The n tokens already written past `length` become stored."""
        self.length += n

    def dense(self, idx: torch.Tensor | None = None):
        """Full-precision (k, v) [Hkv, T, D]: all tokens, or per-head indices [Hkv, n]."""
        raise NotImplementedError

    def compact(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Keep per-head indices idx [Hkv, b] only, re-rotating their keys by delta [Hkv, b]."""
        raise NotImplementedError

    def load(self, k, v) -> None:
        """Replace the contents with dense k/v [Hkv, T, D] (live conversion)."""
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        """Forget tokens past index n (only where nothing was evicted)."""
        raise NotImplementedError

    def reserve(self, n: int) -> None:
        """Make room for n tokens without changing what is stored."""

    def token_bytes(self) -> float:
        """Bytes per stored token (this layer, K + V), for projections."""
        return self.info.kv_bytes_per_token()

    def quantized(self) -> int:
        """How many stored tokens at the front are held quantized (key or value): 0 here."""
        return 0

    # fixed-shape decode (only where `static_decode`)
    def open_window(self, start: int, end: int) -> None:
        """Room for indices start..end-1, and that tail cleared (it is read with weight 0)."""
        raise NotImplementedError

    def write_step(self, k, v, step: torch.Tensor, start: int, kernel: bool) -> None:
        """Write one token's k/v [Hkv, 1, D] at index `start + step` (step: [1] int64 on the
        device, the window's steps so far; start: the length when the window opened); `kernel`:
        through the Triton window kernel."""
        raise NotImplementedError

    def window(self, end: int):
        """-> (k, v) [Hkv, end, D]: the fixed span a window's steps attend over."""
        raise NotImplementedError


class Spill(Part):
    """Receives evicted tokens; may bring some back for attention."""

    def receive(self, layer, idx: torch.Tensor) -> None:
        """Tokens at store indices idx [Hkv, e] are about to be dropped from layer's store."""

    def recall(self, layer, q, chunk):
        """-> extra (k, v) [Hkv, m, D] attention also reads (rotated into the frame), or None."""
        return None

    def adopt(self, other: "Spill") -> None:
        """Take over another spill's tokens (live conversion). Default: start empty."""

    def host_positions(self) -> torch.Tensor | None:
        """Conversation positions of the tokens it holds [Hkv, n], or None when it holds none."""
        return None

    def recalled_positions(self) -> torch.Tensor | None:
        """Conversation positions of the tokens brought back for the last question [Hkv, m], or None."""
        return None


class Reader(Part):
    """Decides which stored tokens attention reads."""

    def attend(self, layer, q, k, v, scale, extra) -> torch.Tensor:
        """Like `Store.attend`, over the subset it chooses -> [Hq, T, D]."""
        return layer.store.attend(q, k, v, scale, extra)

    def after_evict(self, layer, idx: torch.Tensor) -> None:
        """The layer just kept indices idx [Hkv, b] (its keys re-rotated)."""


class Ffn(Part):
    """Acts on the model's FFN blocks, not on the cache (one per cache; the adapter routes it)."""

    def begin(self, chunk) -> None:
        """Before every forward."""

    def mlp(self, i: int, h: torch.Tensor, x: torch.Tensor, run) -> torch.Tensor:
        """Layer i's FFN: h [.., hidden] entering the block, x its normed form, run(x) the MLP."""
        return run(x)

