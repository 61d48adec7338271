"""`bench probe-pinned`: does `offload.host.host_empty` pin exactly its size (torch's pinned
cache rounds blocks up to a power of two unless told not to)? Prints the torch version,
whether the setting took, and the process RSS growth for a 260 MiB host tensor, pinned
where CUDA is present. Writes no JSON."""
from __future__ import annotations

import psutil
import torch

from offload.host import host_empty, pinned_exact


def run():
    proc = psutil.Process()
    pin = torch.cuda.is_available()
    rss0 = proc.memory_info().rss
    t = host_empty((8, 133120, 128), torch.bfloat16, pin)  # 260 MiB: a 128K+1K-token layer's keys
    rss1 = proc.memory_info().rss
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()
    print(f"torch {torch.__version__}; exact pinning set: {pinned_exact()}; "
          f"pinned: {t.is_pinned()}; tensor {t.nbytes / 2**20:.0f} MiB; RSS +{(rss1 - rss0) / 2**20:.0f} MiB; "
          f"allocator bytes {stats.get('allocated_bytes.current', 0) / 2**20:.0f} MiB")
