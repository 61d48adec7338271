"""MemoryReport: counted, never estimated. NVML for the device, torch for this process,
the cache for its own bytes, psutil for the host."""
from __future__ import annotations

import resource

import psutil
import torch

from .types import MemoryReport

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


def report(device: torch.device, cache=None, weights_bytes: int = 0) -> MemoryReport:
    proc = psutil.Process()
    vm = psutil.virtual_memory()
    kv: dict = {"gpu": {}, "host": {}}
    peak = 0
    if cache is not None:
        for (tier, kind), n in cache.nbytes().items():
            kv.setdefault(tier, {})[kind] = kv.get(tier, {}).get(kind, 0) + n
        peak = cache.peak_bytes
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
