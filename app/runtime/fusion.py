"""One-kernel RMSNorm and RoPE routed into a transformers model: the model's norms and its
module's `apply_rotary_pos_emb` are wrapped once per model, and at call time run the fused
kernels (policies/kernels/fused.py) where the switchboard of the forward in progress allows
(`ModelInfo.kernels.fused`); outside one of our forwards (a transformers baseline, a direct
call) the model's own code runs."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from policies.kernels import fused
from policies.kernels.switch import Kernels

_ACTIVE: ContextVar[Kernels | None] = ContextVar("vramchat_kernels", default=None)
# norm classes whose forward is exactly `fused.rmsnorm_reference` (checked in transformers 5.23)
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
# architectures whose module-level apply_rotary_pos_emb is `fused.rope_reference` (Phi-3's
# handles partial rotary and keeps its own)
_ROPE_ARCHS = {"llama", "mistral", "qwen2", "qwen3"}


@contextmanager
def use_kernels(kernels: Kernels):
    """The fused norm/RoPE routing follows `kernels` inside this block (our forward sets it)."""
    token = _ACTIVE.set(kernels)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _fuse_on(x: torch.Tensor) -> bool:
    """The kernels have no backward: never where autograd records."""
    kernels = _ACTIVE.get()
    return kernels is not None and not torch.is_grad_enabled() and kernels.on("fused", x.device)


def _fused_rope(run):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and set(kwargs) <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1
        if plain and _fuse_on(q) and fused.rope_fits(q, k, cos, sin):
            return fused.rope(q, k, cos, sin)
        return run(q, k, cos, sin, *args, **kwargs)
    apply_rotary_pos_emb.vramchat_fused = True
    return apply_rotary_pos_emb


def _fused_norm(mod):
    run = mod.forward

    def forward(h):
        w = mod.weight  # read per call: the module may have moved since
        if h.dtype == w.dtype and _fuse_on(h):
            return fused.rmsnorm(h, w, mod.variance_epsilon)
        return run(h)
    forward.vramchat_fused = True
    return forward


def _ours(obj) -> bool:
    """Whether obj's code is transformers' own (a model's remote code may share its class
    and function names with different arithmetic or signatures: never patched)."""
    return getattr(obj, "__module__", "").startswith("transformers.models.")


def route(model, arch: str, layers) -> dict:
    """Route the model's RMSNorms and RoPE through one-kernel versions where the active
    switchboard allows at call time (else the module's own code runs). -> what was routed."""
    norms = 0
    for mod in model.modules():
        if type(mod).__name__ in _NORMS and _ours(type(mod)) and hasattr(mod, "variance_epsilon"):
            if not getattr(mod.forward, "vramchat_fused", False):  # (a second Adapter on the model)
                mod.forward = _fused_norm(mod)
            norms += 1
    rope = ""
    if arch in _ROPE_ARCHS and len(layers):
        mod = sys.modules[type(layers[0].self_attn).__module__]
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is not None and (getattr(fn, "vramchat_fused", False) or _ours(fn)):
            if not getattr(fn, "vramchat_fused", False):
                mod.apply_rotary_pos_emb = _fused_rope(fn)
            rope = mod.__name__
    return {"rmsnorm": norms, "rope": rope}
