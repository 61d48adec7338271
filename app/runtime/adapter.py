"""Every touch of transformers internals lives here, so an upgrade breaks one file.

We run the model's own modules (projections, norms, RoPE, MLP) but own attention: a
registered attention function hands each layer's post-RoPE q/k/v to that layer's
`LayerCache`, which stores, evicts and attends by its policy stack. No mask function is
registered, so transformers builds no mask (our caches build their own), and no transformers
`Cache` object is passed at all: the model is called with explicit `position_ids`, and
our `KVCache` rides along in the forward kwargs to the attention function.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface

from policies import Chunk, KVCache, ModelInfo, SpecError, attention, parse_spec
from policies.kernels.switch import Kernels

from . import fusion
from .fusion import use_kernels
from .paths import trained_dir

ATTN_NAME = "vramchat"


def _vramchat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (post-RoPE) -> ([1, T, Hq, D], None)."""
    cache: KVCache | None = kwargs.get("vram_cache")
    if cache is None:
        raise RuntimeError("vramchat attention called without a cache (use Adapter.forward)")
    chunk: Chunk = kwargs["vram_chunk"]
    layer = cache.layers[module.layer_idx]
    rec = RECORDER.get()
    if rec is not None:  # the queries an answer's sources are computed from (evidence.py)
        rec.see(layer, query[0], chunk)
    # a sliding window (Mistral, Phi-3, Gemma's local layers) and logit soft-capping (Gemma 2)
    # come as the layer's own arguments; query pre-scaling comes as `scaling`
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if window or softcap:
        with attention.rules(window, softcap):
            out = layer.forward(query[0], key[0], value[0], scaling, chunk)
    else:
        out = layer.forward(query[0], key[0], value[0], scaling, chunk)
    return out.transpose(0, 1)[None], None


def _attention_facts(cfg, layers, rotary) -> dict:
    """What each layer's attention does beyond softmax(q·kᵀ·scale), as transformers passes it
    to the function above: its sliding window (the module's own attribute, else the
    config's, as Mistral and Phi-3 pass it), soft-capping, and RoPE frequencies per layer type
    (Gemma 3's sliding layers rotate with their own base). -> ModelInfo fields."""
    windows = tuple(int(getattr(l.self_attn, "sliding_window", getattr(cfg, "sliding_window", None)) or 0)
                    for l in layers)

    def freq(prefix: str = ""):
        f = getattr(rotary, f"{prefix}original_inv_freq", None)
        return getattr(rotary, f"{prefix}inv_freq") if f is None else f

    local = None
    if hasattr(rotary, "layer_types"):  # one table per layer type
        inv = freq("full_attention_" if "full_attention" in rotary.layer_types else f"{rotary.layer_types[0]}_")
        if "sliding_attention" in rotary.layer_types:
            local = freq("sliding_attention_")
            local = None if torch.equal(local, inv) else local.detach().float().clone()
    else:
        inv = freq()
    return {"windows": windows if any(windows) else (), "softcap": float(getattr(cfg, "attn_logit_softcapping", 0) or 0),
            "inv_freq": inv.detach().float().clone(), "local_inv_freq": local}


def refusals(info: ModelInfo, layers) -> dict[str, str]:
    """Policies this model's attention rules out, each with why (the spec is refused naming
    the policy and the architecture: `check_spec`)."""
    from policies import REGISTRY
    out = {}
    what = ("sliding-window layers" if any(info.windows) else "") + \
        (" and " if any(info.windows) and info.softcap else "") + ("logit soft-capping" if info.softcap else "")
    if what:
        out["kivi"] = f"its quantized decode attention reads every stored token and applies no {what}"
        out["doublesparse"] = f"it attends over a gathered subset of tokens, where {what} cannot be applied"
    if info.local_inv_freq is not None:
        why = ("it moves kept keys to compacted positions by re-rotating them with one RoPE base, and this "
               "model's sliding layers use another")
        out.update({n: why for n, e in REGISTRY.items() if e.slot == "selector" and n != "full"})
    if any(hasattr(l, "pre_feedforward_layernorm") for l in layers):
        out["ffnskip"] = ("it reads each FFN block's input at post_attention_layernorm, which this architecture "
                          "applies to the attention output")
    return out


def check_spec(spec: str, refused: dict[str, str], arch: str) -> None:
    """SpecError naming the first policy of `spec` this architecture rules out, and why."""
    for pol in parse_spec(spec).values():
        if pol.name in refused:
            raise SpecError(f"policy `{pol.name}` cannot serve {arch} models: {refused[pol.name]}; "
                            f"choose another policy (`main.py plan` lists what fits)")


# NOTE: no mask function is registered: for an attention name without one, transformers
# skips mask creation entirely (mask None). Registering one that returns None is not the
# same: transformers then first checks position_ids for packed sequences with a
# host-device sync (`.all()` on a GPU tensor) on every forward, which stalls eager decode.
AttentionInterface.register(ATTN_NAME, _vramchat_attention)

RECORDER: ContextVar = ContextVar("vramchat_recorder", default=None)  # an evidence.Recorder, or None


@contextmanager
def recording(rec):
    """Forwards in this block show their queries to `rec` (an evidence.Recorder; None: nothing)."""
    token = RECORDER.set(rec)
    try:
        yield
    finally:
        RECORDER.reset(token)


class Adapter:
    """Wraps a loaded HF causal LM: model facts, forward with our cache, hooks."""

    def __init__(self, model, tokenizer, model_id: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        cfg = model.config
        self.arch = getattr(cfg, "model_type", "?")
        model.set_attn_implementation(ATTN_NAME)
        self.decoder = model.model
        self.layers = self.decoder.layers
        self._capture: dict | None = None
        for i, layer in enumerate(self.layers):
            layer.self_attn.register_forward_pre_hook(self._make_capture(i), with_kwargs=True)
        self.fused = fusion.route(self.model, self.arch, self.layers)
        self._ffn = None  # the active cache's `ffn` component (ffnskip), during a forward
        self._ffn_in: dict = {}
        self._ffn_ok = all(self._wrap_mlp(i, layer) for i, layer in enumerate(self.layers))
        self.info = self._model_info()
        self.refused = refusals(self.info, self.layers)  # policy -> why this architecture rules it out

    def _wrap_mlp(self, i, layer) -> bool:
        """Route layer i's MLP through the ffn component while one is active. The hidden
        state entering the FFN block is the post-attention norm's input."""
        mlp, norm = getattr(layer, "mlp", None), getattr(layer, "post_attention_layernorm", None)
        if mlp is None or norm is None:
            return False
        run, norm_run = mlp.forward, norm.forward

        def norm_forward(h):
            if self._ffn is not None:
                self._ffn_in[i] = h
            return norm_run(h)

        def mlp_forward(x):
            if self._ffn is None:
                return run(x)
            return self._ffn.mlp(i, self._ffn_in.pop(i), x, run)

        norm.forward, mlp.forward = norm_forward, mlp_forward
        return True

    def _make_capture(self, i):
        def hook(module, args, kwargs):
            if self._capture is not None:
                hs = kwargs.get("hidden_states", args[0] if args else None)
                self._capture[i] = hs[0]
        return hook

    def _model_info(self) -> ModelInfo:
        cfg = self.model.config
        n_q = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
        facts = _attention_facts(cfg, self.layers, self.decoder.rotary_emb)
        kernels = Kernels.from_env()
        if facts["windows"] or facts["softcap"]:  # the window kernel applies neither: the torch path does
            kernels = kernels.with_(window="off")
        p = next(self.model.parameters())
        dtype = p.dtype if p.dtype.is_floating_point else torch.float16
        if getattr(self.model, "hf_quantizer", None) is not None:
            dtype = getattr(cfg, "dtype", None) or torch.bfloat16
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
        return ModelInfo(
            n_layers=cfg.num_hidden_layers, n_q_heads=n_q, n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim, dtype=dtype, device=p.device, inv_freq=facts["inv_freq"],
            window=getattr(cfg, "max_position_embeddings", 0) or 0, model_id=self.model_id,
            hidden_size=cfg.hidden_size, tokenizer=self.tokenizer, search_dirs=(trained_dir(),),
            kernels=kernels, windows=facts["windows"], softcap=facts["softcap"],
            local_inv_freq=facts["local_inv_freq"])

    def check(self, spec: str) -> None:
        """Raise SpecError for a spec this model's architecture rules out (or a bad spec)."""
        check_spec(spec, self.refused, self.arch)

    def new_cache(self, spec: str) -> KVCache:
        self.check(spec)
        return KVCache(spec, self.info)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, chunk: Chunk, all_logits: bool = False,
                capture_hidden: bool | None = None) -> torch.Tensor:
        """Run ids [T] through the model at positions cache.next_position.. ; returns
        float32 logits [T, V] (all_logits) or [V] for the last token."""
        n = ids.shape[-1]
        pos = torch.arange(cache.next_position, cache.next_position + n, device=ids.device)
        logits = self.run(ids, pos, cache, chunk, all_logits, capture_hidden)
        cache.next_position += n
        return logits

    def run(self, ids, pos, cache: KVCache, chunk: Chunk, all_logits: bool = False,
            capture_hidden: bool | None = None) -> torch.Tensor:
        """The model over ids [T] at RoPE positions pos [T] (a device tensor: a fixed-shape
        decode step computes it on the device); the caller moves `next_position`."""
        if capture_hidden is None:
            capture_hidden = cache.needs_hidden
        self._capture = chunk.hidden if capture_hidden else None
        self._ffn = cache.ffn
        if self._ffn is not None:
            if not self._ffn_ok:
                raise SpecError(f"`{cache.slots['ffn'].name}` needs decoder layers with `mlp` and "
                                f"`post_attention_layernorm`; {self.arch} layers do not have both")
            self._ffn.begin(chunk)
        try:
            with use_kernels(cache.info.kernels):
                out = self.model(
                    input_ids=ids[None], position_ids=pos[None], use_cache=False,
                    logits_to_keep=0 if all_logits else 1, vram_cache=cache, vram_chunk=chunk)
        finally:
            self._capture = self._ffn = None
            self._ffn_in.clear()
            chunk.hidden = {}
        logits = out.logits[0].float()
        return logits if all_logits else logits[-1]

    def weights_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.nbytes
        return total

    # What callers outside the forward need from a layer's attention module, so they never
    # reach into it (module names differ by architecture).

    @property
    def hidden_act(self) -> str:
        """The MLP's activation name (retaining heads use the model's own)."""
        return getattr(self.model.config, "hidden_act", "silu")

    def attn_scale(self, layer: int) -> float:
        """The factor layer `layer`'s attention multiplies QKᵀ by (query pre-scaling included)."""
        return getattr(self.layers[layer].self_attn, "scaling", self.info.head_dim ** -0.5)

    def input_norm_weight(self, layer: int) -> torch.Tensor:
        """Gain [hidden] of the RMSNorm in front of layer `layer`'s attention."""
        return self.layers[layer].input_layernorm.weight

    def query_states(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] (layer `layer`'s normed input, as `capture_hidden` records it),
        positions [T] -> post-RoPE queries [Hq, T, D], computed as the layer's attention
        does: q_proj or Q's rows of a fused qkv_proj (Phi-3), biases (Qwen2), q_norm (Qwen3),
        then the model's own rotary embedding (partial rotary, scaled frequencies)."""
        attn, info = self.layers[layer].self_attn, self.info
        if hasattr(attn, "q_proj"):
            q = attn.q_proj(hidden)
        else:  # fused qkv: Q's rows come first
            q = attn.qkv_proj(hidden)[..., : info.n_q_heads * info.head_dim]
        q = q.view(1, hidden.shape[0], info.n_q_heads, info.head_dim)
        if hasattr(attn, "q_norm"):  # per head, before RoPE
            q = attn.q_norm(q)
        q = q.transpose(1, 2)  # [1, Hq, T, D]
        cos, sin = self.decoder.rotary_emb(q, positions.to(q.device)[None])
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return rotate(q, q, cos, sin)[0][0]

    def qkv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer `layer`'s q, k and v projections as one, float32 on the CPU: (weight
        [(Hq + 2·Hkv)·D, hidden], bias [(Hq + 2·Hkv)·D], zeros where a projection has
        none, or None where none has one)."""
        a = self.layers[layer].self_attn
        projs = [a.qkv_proj] if hasattr(a, "qkv_proj") else [a.q_proj, a.k_proj, a.v_proj]
        w = torch.cat([p.weight.detach().float().cpu() for p in projs])
        if all(p.bias is None for p in projs):
            return w, None
        return w, torch.cat([p.bias.detach().float().cpu() if p.bias is not None else torch.zeros(p.weight.shape[0])
                             for p in projs])
