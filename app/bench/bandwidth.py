"""Measured copy bandwidths: the floor a memory-bound decode step is held against."""
from __future__ import annotations

import time

import torch

from .common import sync


def _copies_per_s(src: torch.Tensor, dst: torch.Tensor, reps: int) -> float:
    """Copies of src into dst per second (one untimed first)."""
    dst.copy_(src, non_blocking=True)
    sync(dst.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    sync(dst.device)
    return reps / (time.perf_counter() - t0)


def bandwidth(device: torch.device) -> float:
    """Measured device memory bandwidth, bytes/s (a large copy: read + write)."""
    n = 256 * 2**20 if device.type == "cuda" else 64 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    return 2 * n * _copies_per_s(a, torch.empty_like(a), 10)


def h2d_bandwidth(device: torch.device) -> float:
    """Measured pinned host -> device copy bandwidth, bytes/s (PCIe: what `offload` alone
    streams every layer's K/V over, every token)."""
    n = 1 << 30
    bw = n * _copies_per_s(torch.empty(n, dtype=torch.uint8, pin_memory=True),
                           torch.empty(n, dtype=torch.uint8, device=device), 4)
    getattr(torch._C, "_host_emptyCache", lambda: None)()  # the pinned GiB back to the system
    return bw
