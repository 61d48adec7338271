"""Triton kernels (decode attention) and what they share: whether Triton can run here.

Triton is optional: CPU-only installs may lack it, or have it without a GPU. On a CPU the
kernels run only under the Triton interpreter (`TRITON_INTERPRET=1`, set before Python
starts: triton reads it when a kernel is defined), which is how CI tests them.
"""
from __future__ import annotations

import os

import torch

try:  # NOTE: CPU-only installs may lack triton, or have it without a GPU or interpreter.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised on machines without triton
    triton = tl = None


def triton_ok(device) -> bool:
    """Whether a Triton kernel can run on tensors of `device` here."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"
