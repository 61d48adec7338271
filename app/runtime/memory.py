"""MemoryReport: counted, never estimated. NVML for the device, torch for this process,
the cache for its own bytes, psutil for the host."""
from __future__ import annotations

import resource
from collections import Counter

import psutil
import torch

from .types import CacheState, MemoryReport

_nvml_handles: dict = {}


def _nvml(index: int):
    """(total, used) bytes device-wide from NVML's v2 memory API, or None."""
    try:
        import pynvml
        if index not in _nvml_handles:
            pynvml.nvmlInit()
            _nvml_handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
        h = _nvml_handles[index]
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        except (TypeError, AttributeError):
            info = pynvml.nvmlDeviceGetMemoryInfo(h)
        return int(info.total), int(info.used)
    except Exception:
        return None


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cache_state(cache, context) -> CacheState:
    """What the gauge shows of `cache` now (call it on the thread that changes the cache)."""
    per = [layer.nbytes() for layer in cache.layers]
    kv: Counter = Counter()
    for c in per:
        kv.update(c)
    return CacheState(policy=cache.spec, kv=tuple((t, k, n) for (t, k), n in sorted(kv.items())),
                      peak=cache.peak_bytes, layers=tuple(sum(c.values()) for c in per), context=context)


def report(device: torch.device, state: CacheState | None = None, weights_bytes: int = 0) -> MemoryReport:
    """The device and host now, the cache as of `state` (from any thread)."""
    proc = psutil.Process()
    vm = psutil.virtual_memory()
    kv = state.kv_by_tier() if state is not None else {"gpu": {}, "host": {}}
    peak = state.peak if state is not None else 0
    rep = MemoryReport(
        device=str(device), has_gpu=device.type == "cuda", kv=kv, kv_peak_bytes=peak,
        weights_bytes=weights_bytes, rss=proc.memory_info().rss, rss_peak=rss_peak_bytes(),
        host_total=vm.total, host_available=vm.available)
    if device.type == "cuda":
        idx = device.index or 0
        rep.device = f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
        rep.torch_allocated = torch.cuda.memory_allocated(idx)
        rep.torch_reserved = torch.cuda.memory_reserved(idx)
        rep.torch_peak = torch.cuda.max_memory_allocated(idx)
        got = _nvml(idx)
        if got is None:
            free, total = torch.cuda.mem_get_info(idx)
            got = (total, total - free)
        rep.gpu_total, rep.gpu_used = got
    return rep
