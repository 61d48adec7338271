"""Which kernel paths run: one object, passed explicitly (a model's `ModelInfo.kernels`).

Each choice is "auto" (the kernel where it pays: on CUDA where Triton runs), "on" (wherever
Triton runs, the CPU interpreter included: how tests reach the kernels) or "off" (the
plain-torch reference). Environment variables set the defaults a run starts with:
VRAMCHAT_FUSED (fused RMSNorm/RoPE; legacy values cuda/always are auto/on), VRAMCHAT_WINDOW
(the fixed-shape decode window kernel), VRAMCHAT_KIVI (the KIVI decode kernel) and
VRAMCHAT_CUDA_GRAPHS (0: replay no CUDA graphs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from . import triton_ok

_CHOICES = ("auto", "on", "off")
_LEGACY = {"cuda": "auto", "always": "on"}


def _choice(name: str, raw: str) -> str:
    value = _LEGACY.get(raw, raw)
    if value not in _CHOICES:
        raise ValueError(f"kernel switch `{name}`: {raw!r} is not one of {', '.join(_CHOICES)}")
    return value


@dataclass(frozen=True)
class Kernels:
    fused: str = "auto"  # fused RMSNorm and RoPE in the decoder layers (the adapter routes them)
    window: str = "auto"  # Triton window attention + row write in fixed-shape decode
    kivi: str = "auto"  # Triton KIVI decode attention
    graphs: bool = True  # fixed-shape decode windows replayed as CUDA graphs (CUDA only)

    def __post_init__(self):
        for name in ("fused", "window", "kivi"):
            _choice(name, getattr(self, name))

    @classmethod
    def from_env(cls) -> "Kernels":
        env = os.environ
        return cls(fused=_choice("fused", env.get("VRAMCHAT_FUSED", "auto")),
                   window=_choice("window", env.get("VRAMCHAT_WINDOW", "auto")),
                   kivi=_choice("kivi", env.get("VRAMCHAT_KIVI", "auto")),
                   graphs=env.get("VRAMCHAT_CUDA_GRAPHS", "1") != "0")

    def with_(self, **changes) -> "Kernels":
        return replace(self, **changes)

    def on(self, name: str, device) -> bool:
        """Whether kernel `name` (fused, window, kivi) runs for tensors on `device`."""
        value = getattr(self, name)
        if value == "off" or not triton_ok(device):
            return False
        return value == "on" or torch.device(device).type == "cuda"
