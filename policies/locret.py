"""`locret`: retaining heads score every token as it enters the cache; after each prefill
chunk every layer keeps, per KV head, the `budget` best-scored tokens (arXiv 2410.01805).

Retaining heads. One small MLP per decoder layer, `score = fc2(act(fc1(x)))`, no biases
(except a folded q/k/v bias, below), on the layer's post-input_layernorm hidden state
x [T, hidden] (the adapter captures it into `chunk.hidden[layer]`), one unnormalised
score per KV head. The paper feeds concat[Q, K, V] (pre-RoPE) instead; Q, K, V are
linear in x, so an official head folds exactly into ours:
`fc1_hidden = fc1_qkv · [Wq; Wk; Wv]`, plus `fc1_qkv · [bq; bk; bv]` as an fc1 bias
for models whose projections have biases (Qwen2). `fold_qkv` does that once, at import.

Eviction (Algorithm 1). `plan` holds the last `local` tokens back as the final chunk.
After a non-final chunk the newest `stabilizers` tokens are never evicted (they count
inside the budget), nor the conversation's first `SINKS` tokens; after the final chunk its
own tokens are never evicted. Indices are
re-sorted so kept tokens stay in order; `LayerCache.evict` compacts positions.

Shared scores and pooling (ours; measured in BENCHMARKS.md, Locret). The paper lets each
KV head of each layer keep its own best tokens. With `share=on` (default) the scores of a
chunk's tokens become their mean over all layers' heads before eviction (`KVCache`
calls `combine` once per chunk, after every layer has scored it): an ensemble of
L x Hkv predictors, and every layer keeps the same tokens -- a fact must survive in most
layers to be answered. `pool=k` then gives each token the best score within k//2 of it,
so a kept number keeps the words that say what it is; `back=b` (b < k//2) leans that window
ahead, from b tokens before a token to k-1-b after it, so more of the words before a value
(its name) and fewer after it stay with it at the same cost in slots. The shipped heads are trained for
this (`train-heads --labels shared`: every head regresses the max over layers of
z-scored labels). Per-head, shared and shared + pooled selection side by side:
BENCHMARKS.md, Locret.

Many turns. Question and answer tokens get scores like any other (decode scores them
too) and only the final chunk of the prefill that added them is protected, so the next
prefill evicts them like document tokens: after every prefill a layer holds at most
`budget + final chunk` tokens, plus the answer it then decodes. 100 turns stay bounded.

Heads come from `heads=PATH`, else the shipped file in `policies/heads/` whose model key
and name match this model, else a `SpecError` saying how to train them. Random heads are
never used. Loaded heads are cached in `ModelInfo.resources` (one load for all layers).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import ModelInfo
from .evict import best, max_pool as _pool
from .files import check_digest, digest, find_file, model_key, read_meta
from .registry import NoHeadsError, Opt, SpecError, register
from .slots import EvictingSelector

HEADS_DIR = Path(__file__).parent / "heads"
# The conversation's first tokens are attention sinks: evicting them breaks the model (the
# default model's trained heads kept token 0 in only ~46 % of heads and answered nothing;
# with these kept it answered). They count inside the budget, like stabilizers.
SINKS = 4
TRAIN_HINT = ("train them with `python main.py train-heads --model M` (kept for this model and found "
              "next time), or pass a heads file as `locret:heads=PATH`")
_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class RetainingHeads(torch.nn.Module):
    """Per-layer MLPs hidden [T, d_in] -> scores [T, n_kv]; `layers.{i}.fc1/fc2` weights."""

    def __init__(self, n_layers: int, d_in: int, d_r: int, n_kv: int, act: str = "silu",
                 fc1_bias: bool = False):
        super().__init__()
        if act not in _ACTS:
            raise SpecError(f"retaining heads: activation {act!r} is not one of {', '.join(_ACTS)}")
        self.act_name, self.d_r = act, d_r
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"fc1": torch.nn.Linear(d_in, d_r, bias=fc1_bias),
                                 "fc2": torch.nn.Linear(d_r, n_kv, bias=False)})
            for _ in range(n_layers))

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_in] (any float dtype) -> [T, n_kv] float32."""
        h = self.layers[i]
        return h["fc2"](_ACTS[self.act_name](h["fc1"](x.float())))

    def score(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The selector's view: x [T, d_in] -> [n_kv, T] float32."""
        return self.layer(i, x).t().contiguous()

    def meta(self) -> dict:
        l0 = self.layers[0]
        return {"n_layers": len(self.layers), "d_in": l0["fc1"].in_features, "d_r": self.d_r,
                "n_kv": l0["fc2"].out_features, "act": self.act_name,
                "fc1_bias": l0["fc1"].bias is not None}


def save_heads(heads: RetainingHeads, path: str | Path, key: str, names: list[str], extra: dict | None = None,
               dtype: torch.dtype = torch.float32):
    """Write heads as safetensors (in `dtype`; they load as float32); metadata carries the
    shapes, the model key and the model names they fit."""
    from safetensors.torch import save_file
    meta = {"format": "vramchat-locret-1", "model_key": key, "names": json.dumps(names),
            **{k: json.dumps(v) for k, v in heads.meta().items()}}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in heads.state_dict().items()}
    meta["sha256"] = digest(state)
    save_file(state, str(path), metadata=meta)


def load_heads(path: str | Path, info: ModelInfo | None = None) -> RetainingHeads:
    """Load a heads file, refusing one made for another model or a partial one."""
    from safetensors.torch import load_file
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != "vramchat-locret-1":
        raise SpecError(f"locret heads {path}: not a vramchat retaining-heads file "
                        f"(format {meta.get('format')!r}); {TRAIN_HINT}")
    try:
        shape = {k: json.loads(meta[k]) for k in ("n_layers", "d_in", "d_r", "n_kv", "act", "fc1_bias")}
    except (KeyError, ValueError) as e:
        raise SpecError(f"locret heads {path}: broken shape metadata ({e!r}); {TRAIN_HINT}") from None
    if info is not None:
        want = model_key(info)
        if meta.get("model_key") != want:
            raise SpecError(f"locret heads {path} were trained for a model with key {meta.get('model_key')} "
                            f"but this model has key {want} (hidden-layers-heads-kv-head_dim-vocab); {TRAIN_HINT}")
    heads = RetainingHeads(shape["n_layers"], shape["d_in"], shape["d_r"], shape["n_kv"], shape["act"],
                           shape["fc1_bias"])
    state = load_file(str(path))
    check_digest(path, state, meta, TRAIN_HINT)
    expect = set(heads.state_dict())
    if set(state) != expect:
        missing, extra = sorted(expect - set(state)), sorted(set(state) - expect)
        raise SpecError(f"locret heads {path}: {len(state)} tensors, expected {len(expect)} "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as e:  # tensor shapes that contradict the metadata
        raise SpecError(f"locret heads {path}: tensors do not match the shapes in its metadata {shape}: "
                        f"{str(e).splitlines()[-1].strip()}; {TRAIN_HINT}") from None
    return heads.eval().requires_grad_(False)


def find_heads(info: ModelInfo, path: str = "") -> tuple[RetainingHeads, str]:
    """-> (heads on info.device, where they came from). Cached in info.resources."""
    key = ("locret-heads", path or "shipped")
    if key in info.resources:
        return info.resources[key]
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "heads.safetensors"
        if not p.is_file():
            raise SpecError(f"option `heads` of policy `locret`: {p} does not exist; {TRAIN_HINT}")
        if p.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise SpecError(f"option `heads` of policy `locret`: {p} looks like an official Locret checkpoint "
                            "(heads over [Q,K,V]); fold it into this model's heads once with `python main.py "
                            f"train-heads --model M --out DIR --import {p}` and pass `heads=DIR`")
        src = p
    else:
        src = _shipped(info)
    heads = load_heads(src, info).to(info.device)
    if heads.meta()["n_layers"] != info.n_layers or heads.meta()["d_in"] != info.hidden_size \
            or heads.meta()["n_kv"] != info.n_kv_heads:
        raise SpecError(f"locret heads {src}: shapes {heads.meta()} do not fit this model "
                        f"({info.n_layers} layers, hidden {info.hidden_size}, {info.n_kv_heads} KV heads)")
    info.resources[key] = (heads, str(src))
    return heads, str(src)


def _shipped(info: ModelInfo) -> Path:
    found = find_file("heads", HEADS_DIR, info)
    if found is not None:
        return found
    want = model_key(info)
    where = ", ".join(str(Path(d) / "heads" / want) for d in info.search_dirs)
    raise NoHeadsError(f"policy `locret` has no retaining heads for model {info.model_id or '?'} (key {want}): "
                    f"none ship in {HEADS_DIR}{' or were trained into ' + where if where else ''}; "
                    f"{TRAIN_HINT}; or choose a policy that needs no heads (e.g. `auto`)")


# ---- official checkpoints (hyx21/Locret-*) ---------------------------------------------

_OFFICIAL = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.(fc[12])\.(weight|bias)$")


def read_official(path: str | Path, n_layers: int) -> dict[int, dict[str, torch.Tensor]]:
    """An official pickled state dict -> {layer: {"fc1": [d_r, in], "fc2": [n_kv, d_r]}} float32.

    NOTE: their loader uses strict=False and silently loads nothing on a name mismatch;
    here the count of head tensors must be exactly 2 per layer or this raises.
    """
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise SpecError(f"{path}: not a state dict (a {type(sd).__name__})")
    out: dict[int, dict[str, torch.Tensor]] = {}
    n = 0
    for name, t in sd.items():
        m = _OFFICIAL.match(name)
        if m is None:
            continue
        if m.group(3) == "bias":
            raise SpecError(f"{path}: {name}: retaining heads have no biases; this is not a Locret checkpoint")
        out.setdefault(int(m.group(1)), {})[m.group(2)] = t.float()
        n += 1
    expect = 2 * n_layers
    complete = sorted(out) == list(range(n_layers)) and all(len(v) == 2 for v in out.values())
    if n != expect or not complete:
        raise SpecError(f"{path}: found {n} retaining-head tensors (layers.N.self_attn.fc1/fc2.weight), "
                        f"expected {expect} for a {n_layers}-layer model; refusing a partial load")
    return out


def fold_qkv(fc1: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None = None):
    """fc1 [d_r, Dqkv] over concat[Q,K,V] -> (w [d_r, hidden], b [d_r] or None) over x, with
    w_qkv [Dqkv, hidden] = cat(Wq, Wk, Wv) and b_qkv [Dqkv] their biases. Exact: linear."""
    if fc1.shape[1] != w_qkv.shape[0]:
        raise SpecError(f"official head fc1 takes {fc1.shape[1]} inputs but this model's [Q,K,V] "
                        f"is {w_qkv.shape[0]} wide: the checkpoint is for another model")
    fc1 = fc1.double()
    w = (fc1 @ w_qkv.double()).float()
    b = None if b_qkv is None else (fc1 @ b_qkv.double()).float()
    return w, b


def heads_from_official(ckpt: dict, w_qkv: list, b_qkv: list, n_kv: int, act: str = "silu") -> RetainingHeads:
    """Build hidden-input heads from `read_official` output and per-layer [Dqkv, hidden] weights."""
    n_layers = len(ckpt)
    d_r, hidden = ckpt[0]["fc1"].shape[0], w_qkv[0].shape[1]
    if ckpt[0]["fc2"].shape != (n_kv, d_r):
        raise SpecError(f"official head fc2 is {tuple(ckpt[0]['fc2'].shape)}, expected ({n_kv}, {d_r}): "
                        "the checkpoint is for another model")
    has_bias = any(b is not None for b in b_qkv)
    heads = RetainingHeads(n_layers, hidden, d_r, n_kv, act, fc1_bias=has_bias)
    with torch.no_grad():
        for i in range(n_layers):
            w, b = fold_qkv(ckpt[i]["fc1"], w_qkv[i], b_qkv[i])
            heads.layers[i]["fc1"].weight.copy_(w)
            if has_bias:
                heads.layers[i]["fc1"].bias.copy_(b if b is not None else torch.zeros(d_r))
            heads.layers[i]["fc2"].weight.copy_(ckpt[i]["fc2"])
    return heads.eval().requires_grad_(False)


# ---- the selector ------------------------------------------------------------------------

class LocretSelector(EvictingSelector):
    """Keeps the top-`budget` tokens per KV head by retaining-head score."""

    needs_hidden = True
    needs_scores = True
    static_decode = True  # a decode token's score depends on its own hidden state only

    def __init__(self, opts: dict, info: ModelInfo, layer: int):
        super().__init__(opts, info)
        self.stabilizers = opts["stabilizers"]
        self.share_scores, self.pool, self.back = opts["share"], opts["pool"], opts["back"]
        self.layer = layer
        self.heads, self.source = find_heads(info, opts["heads"])

    def score(self, cache, chunk, k, v) -> torch.Tensor:
        """-> [Hkv, T] float32 scores of the chunk's tokens, from the captured hidden state."""
        x = chunk.hidden.get(self.layer)
        if x is None:
            raise RuntimeError(f"locret: layer {self.layer} got no hidden state (the adapter must "
                               "capture it for selectors with needs_hidden)")
        s = self.heads.score(self.layer, x)
        return s if self.share_scores else _pool(s, self.pool, self.back)

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """share=on: [L, Hkv, T] scores of new tokens -> one score per token [T]: the mean
        over every layer's heads (an ensemble of L x Hkv predictors), then pooled."""
        return _pool(scores.mean((0, 1))[None], self.pool, self.back)[0]

    def pick(self, cache, chunk, cap, fixed) -> torch.Tensor:
        """-> sorted indices [Hkv, cap]: sinks, stabilizers, the final chunk, the best scored."""
        n = cache.length
        protect = min(n, self.stabilizers + fixed)
        s = cache.scores.clone()  # [Hkv, n]
        s[:, n - protect:] = float("inf")  # NOTE: protect + SINKS <= cap, so best() takes them all
        s.masked_fill_(cache.positions() < SINKS, float("inf"))
        return best(s, cap)


def _check(opts: dict) -> None:
    if opts["pool"] % 2 == 0:
        raise SpecError(f"policy `locret`: option `pool` ({opts['pool']}) must be odd (a window centred on the token)")
    if opts["stabilizers"] + SINKS >= opts["budget"]:
        raise SpecError(f"policy `locret`: option `stabilizers` ({opts['stabilizers']}) must be below "
                        f"option `budget` ({opts['budget']}) minus {SINKS} sink tokens: both count inside the budget")


@register("locret", "selector", {
    "budget": Opt(int, 1024, "tokens kept per KV head after each chunk", min=16),
    "chunk": Opt(int, 0, "prefill chunk length (0: the runtime's --chunk-size)", min=0),
    "stabilizers": Opt(int, 256, "newest tokens of a chunk never evicted (inside the budget)", min=0),
    "local": Opt(int, 100, "last tokens of a prefill read without eviction", min=0),
    "heads": Opt("path", "", "retaining heads file or folder (default: shipped heads for this model)"),
    "share": Opt(bool, True, "on: every layer keeps the tokens with the best mean score over all layers' "
                 "heads; off: each head keeps its own best (the paper)"),
    "pool": Opt(int, 9, "score of a token = the best within this window around it (odd; 1: none)", min=1, max=63),
    "back": Opt(int, 63, "the pool window reaches at most this many tokens back (at most pool//2), the rest "
                "ahead: a token keeps the score of a peak up to pool-1-back tokens after it, so a value "
                "keeps the words before it (its name)", min=0, max=63),
}, "retaining heads keep the best `budget` tokens per head; memory fixed by budget + chunk", _check)
def build(policy, info, layer):
    return LocretSelector(policy.opts, info, layer)
