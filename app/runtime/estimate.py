"""The estimate behind `main.py plan` (app/plan.py): a model's bytes at a context, from its
metadata alone (config.json, a GGUF header, a hub-cache entry): no weights are read.

- Weights: the model built on the `meta` device (shapes, no memory), its parameters counted
  at each `--weights` choice (4/8-bit: the decoder's Linear weights quantized as
  bitsandbytes stores them, everything else in bf16).
- KV: the policy's own cache built on `meta` (the runtime's ModelInfo, from an Adapter over
  the meta model) through a prefill of the context and an answer: tokens held follow the
  runtime's own rule (`policies.capacity`: the selector's chunk plan, `budget` and
  final-chunk rule); bytes are the buffers that rule grows (full precision, host), an
  explicit store's own code replayed on the CPU, plus the selector's per-token index and
  scores.
- Peak: weights + KV at its peak + one prefill chunk's activations (+ attention scores on a
  CPU, which has no flash attention).
"""
from __future__ import annotations

import dataclasses

import torch

from policies import KVCache, capacity

from .describe import Model, _dtype, weights_bytes

MAX_SEARCH = 1 << 24  # the largest context `largest` looks for (16M tokens)


REPLAY_MAX = 1 << 16  # reads up to this replay an explicit store chunk by chunk (longer: its rates)
REPLAY_ANSWER = 32  # answer tokens replayed one by one; the rest are counted at the store's rate
_RATES: dict = {}


def _replay(pol, info, plan: list[int], budget: int | None, answer: int) -> tuple[int, int]:
    """(peak, end) bytes of one layer's store of `pol` through a prefill in `plan`'s chunks
    (evicted to what `capacity.read` keeps of `budget`), then `answer` decode tokens: the store's own
    code on random K/V on the CPU with one KV head (its bytes scale with the heads), so a
    quantized store's groups, full-precision window, pending chunk and buffer growth all
    count as they will."""
    from policies import REGISTRY
    cpu = torch.device("cpu")
    one = dataclasses.replace(info, n_kv_heads=1, n_q_heads=info.group, n_layers=1, device=cpu,
                              inv_freq=torch.zeros(info.inv_freq.shape), resources={})
    store = REGISTRY[pol.name].build(pol, one, 0)
    g = torch.Generator().manual_seed(0)

    def kv(t):
        return [torch.randn(1, t, info.head_dim, generator=g).to(info.dtype) for _ in range(2)]

    def size():
        return sum(store.nbytes().values())

    peak = 0
    with torch.inference_mode():
        for t, (_, kept) in zip(plan, capacity.read(budget, plan)):
            store.append(*kv(t))
            peak = max(peak, size())
            if store.length > kept:
                idx = torch.arange(store.length - kept, store.length)[None]
                store.compact(idx, torch.zeros_like(idx))
        for _ in range(answer):
            store.append(*kv(1))
            peak = max(peak, size())
    return peak * info.n_kv_heads, size() * info.n_kv_heads


def _steady(plan: list[int], budget: int | None) -> list[int]:
    """`plan` less the chunks that repeat a state: once a selector evicts, every further
    non-final chunk takes the store from `budget` tokens to `budget + chunk` and back, so
    two such cycles stand for all of them (a 128K prefill replays in seconds, not minutes)."""
    steps = capacity.read(budget, plan)
    first = next((i for i, (appended, kept) in enumerate(steps[:-1]) if kept < appended), None)
    return plan[: first + 3] + plan[-1:] if first is not None and first + 3 < len(plan) - 1 else plan


def _rates(pol, info) -> tuple[float, float, float]:
    """(bytes per stored token, fixed bytes, extra bytes per token of a prefill chunk just
    appended) of an explicit store, from two one-chunk replays (4K, 8K tokens): for the
    answer's tokens past the first REPLAY_ANSWER, contexts past REPLAY_MAX and `largest`'s
    search (buffer growth headroom is left out there). Cached per spec and shape."""
    key = (pol.spec(), info.dtype, info.n_kv_heads, info.head_dim)
    if key not in _RATES:
        got = [_replay(pol, info, [n], None, 1) for n in (4096, 8192)]
        slope = (got[1][1] - got[0][1]) / 4096
        _RATES[key] = (slope, max(0.0, got[0][1] - slope * 4097), max(0.0, got[1][0] - got[1][1]) / 8192)
    return _RATES[key]


def _layer_bytes(layer, info, n: int, chunk: int, answer: int, spill_opts: dict, store_pol,
                 exact: bool = True, device: str = "cuda") -> dict:
    """One layer's KV at its peak while reading n tokens then answering `answer`, and after
    the answer. -> {"gpu", "host", "gpu_end", "host_end", "held"} (held: tokens per KV head
    at the end). Tokens held follow `policies.capacity`; the default and host stores' buffers
    grow by its rule; an explicit store (a spec's `store` slot) is replayed (`_replay`)."""
    sel, store = layer.selector, layer.store
    plan = capacity.chunks(sel, n, chunk)
    budget = sel.budget
    trace = capacity.lengths(sel, n, chunk, 0, answer)  # tokens per KV head at every step
    peak, end = max(trace), trace[-1]
    spilled = [0]  # tokens evicted so far, after each eviction
    for before, after in zip(trace, trace[1:]):
        if after < before:
            spilled.append(spilled[-1] + before - after)
    evicted = spilled[-1] > 0
    # per token and KV head: its conversation index once anything was evicted, and its score
    meta_bytes = info.n_kv_heads * ((8 if evicted else 0) + (4 if sel.needs_scores or sel.reads_attention else 0))
    per_token = store.token_bytes()
    if store_pol is not None and store.tier == "gpu":
        steady = _steady(plan, budget)
        if exact and sum(steady) <= REPLAY_MAX:
            kv, kv_end = _replay(store_pol, info, steady, budget, min(answer, REPLAY_ANSWER))
            rest = max(0, answer - REPLAY_ANSWER) * _rates(store_pol, info)[0] if answer > REPLAY_ANSWER else 0
            kv, kv_end = kv + rest, kv_end + rest
        else:
            rate, fixed, transient = _rates(store_pol, info)
            kv = peak * rate + fixed + transient * max(plan, default=0)
            kv_end = end * rate + fixed
    else:
        # NOTE: the default store (policies/full.py) and the host store (offload/host.py) grow
        # buffers of `BLOCK` rows by `capacity.grown` and keep the room they took; one that
        # reserves ahead first takes what KVCache.expect projects
        ahead = [max(capacity.lengths(sel, n, chunk, 0, capacity.ANSWER))] if store.reserve_ahead else []
        kv = kv_end = capacity.reserved([*ahead, *trace], store.BLOCK) * per_token
    kv += peak * meta_bytes
    kv_end += end * meta_bytes
    out = {"gpu": 0, "host": 0, "gpu_end": 0, "host_end": 0, "held": end}
    out[store.tier] += kv
    out[store.tier + "_end"] += kv_end
    if store.tier == "host" and device == "cuda":  # streamed in per layer: two layers' buffers on the device
        out["gpu"] += 2 * kv / info.n_layers
        out["gpu_end"] += 2 * kv_end / info.n_layers
    if layer.spill is not None:
        _spill(spill_opts, info, spilled, out, [*plan, *[1] * answer])
    return out


def _spill(opts: dict, info, spilled: list[int], out: dict, logged: list[int]) -> None:
    """offload behind a selector: the evicted tokens' K/V and conversation index on the host,
    their labels (`channels` per KV head, as the spill's LabelCache stores them; none with
    rank=off) and the recall buffer on the device. The spill's host rows grow by
    `capacity.grown` as each eviction arrives (offload/spill.py `_reserve`), at the precision
    `kbits`/`vbits` keep them (offload/rows.py); with quote spans, the map from conversation
    index to host row (int32 per KV head at the token log's capacity once `logged` tokens
    were read and written)."""
    from offload.quotes import capacity_after
    from offload.spill import QUOTE_MIN, OffloadSpill, host_rows_bytes, quote_span, row_map_bytes
    cap = capacity.reserved(spilled, OffloadSpill.BLOCK)
    host = host_rows_bytes(info, opts.get("kbits", 16), opts.get("vbits", 16), cap)
    if cap and quote_span(opts["recall"], opts.get("quote", 0)) >= QUOTE_MIN:
        host += row_map_bytes(info, capacity_after(logged))
    gpu = opts["recall"] * info.kv_bytes_per_token() if cap else 0
    if opts["rank"]:  # rank=off keeps no labels
        from offload.labels import LabelCache  # the spill's own label rows, grown on meta tensors
        lab = LabelCache(info.n_kv_heads, opts["channels"], info.dtype, torch.device("meta"))
        lab.grow(cap, 0)
        gpu += lab.nbytes()
    for tier, n in (("host", host), ("gpu", gpu)):
        out[tier] += n
        out[tier + "_end"] += n


def kv_bytes(m: Model, spec: str, n: int, chunk: int, answer: int, choice: str, exact: bool = True,
             device: str = "cuda") -> dict:
    """KV of `spec` over all layers while reading n tokens and answering `answer`: at its
    peak {"gpu", "host"}, after the answer {"gpu_end", "host_end"}, and tokens held per KV
    head at the end; a spec that cannot be built for this model raises SpecError."""
    from .adapter import check_spec
    check_spec(spec, m.refused, m.arch)
    info = dataclasses.replace(m.info, dtype=_dtype(choice), resources=m.info.resources)
    cache = KVCache(spec, info)
    total = {"gpu": 0, "host": 0, "gpu_end": 0, "host_end": 0, "held": 0}
    kinds: dict = {}
    spill = cache.slots["spill"].opts if "spill" in cache.slots else {}
    for layer in cache.layers:
        key = (type(layer.selector), type(layer.store))
        if key not in kinds:
            kinds[key] = _layer_bytes(layer, info, n, chunk, answer, spill, cache.slots.get("store"), exact, device)
        got = kinds[key]
        for k in ("gpu", "host", "gpu_end", "host_end"):
            total[k] += got[k]
        total["held"] = max(total["held"], got["held"])
    return total


def workspace(m: Model, chunk: int, held: int, choice: str, device: str) -> int:
    """One prefill chunk's activations: the MLP's three intermediate tensors, a few hidden
    states and the q/k/v projections in the compute dtype, RMSNorm's fp32 upcast, the last
    token's fp32 logits; on a CPU the attention scores of the chunk against what is held."""
    info = m.info
    elt = 4 if choice == "fp32" else 2
    qkv = (info.n_q_heads + 2 * info.n_kv_heads) * info.head_dim
    act = chunk * (3 * m.intermediate + 4 * info.hidden_size + qkv) * elt + chunk * info.hidden_size * 8
    act += m.vocab * 4
    if device == "cpu":
        act += info.n_q_heads * chunk * (held + chunk) * 4
    return act


def estimate(m: Model, spec: str, n: int, chunk: int, answer: int, choice: str, device: str,
             exact: bool = True) -> dict:
    """Bytes of `spec` reading n tokens then answering `answer`: KV at its peak and after the
    answer by tier, tokens held, and the device's peak (weights + KV + workspace). exact=False
    uses per-token rates for replayed stores (fast; `largest`'s search)."""
    kv = kv_bytes(m, spec, n, chunk, answer, choice, exact, device)
    w = weights_bytes(m, choice)
    return {"kv_gpu": int(kv["gpu"]), "kv_host": int(kv["host"]), "held": kv["held"],
            "kv_gpu_end": int(kv["gpu_end"]), "kv_host_end": int(kv["host_end"]),
            "peak": int(w + kv["gpu"] + workspace(m, chunk, kv["held"], choice, device))}


def largest(m: Model, spec, chunk: int, answer: int, choice: str, device: str, gpu: int,
            host: int | None) -> int:
    """The longest context (tokens read before an answer of `answer`) whose peak fits `gpu`
    bytes and whose host KV fits `host` (None: a CPU, where both share the one memory `gpu`:
    `fits`); MAX_SEARCH where nothing binds, 0 where none does. `spec`: a spec, or a function
    of the context giving the spec for it (`auto`'s choice)."""
    spec_at = spec if callable(spec) else (lambda n: spec)
    return _search(lambda n: fits(estimate(m, spec_at(n), n, chunk, answer, choice, device, exact=False), gpu, host))


def fits(e: dict, gpu: int, host: int | None) -> bool:
    """Whether an `estimate` fits: its peak in `gpu` bytes and its host KV in `host`; host None
    (a CPU): device and host are one memory, peak and host KV together in `gpu`."""
    if host is None:
        return e["peak"] + e["kv_host"] <= gpu
    return e["peak"] <= gpu and e["kv_host"] <= host


def _search(ok) -> int:
    """The largest n <= MAX_SEARCH with ok(n) (to 0.2 %), ok being monotone; 0 where none."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi < MAX_SEARCH and ok(hi):
        lo, hi = hi, hi * 2
    if hi >= MAX_SEARCH and ok(MAX_SEARCH):
        return MAX_SEARCH
    while hi - lo > max(1, lo // 512):  # 0.2 %: the estimate is not finer than that
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
