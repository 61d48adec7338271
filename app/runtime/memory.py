"""MemoryReport: counted, never estimated. NVML for the device, torch for this process,
the cache for its own bytes, psutil for the host."""
from __future__ import annotations

import resource
import time
from collections import Counter
from typing import NamedTuple

import psutil
import torch

from . import cache_map
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


class Sample(NamedTuple):
    t: float  # time.monotonic() (a test's clock: any increasing number)
    gpu: int  # KV bytes on the compute device
    host: int  # KV bytes in host memory
    policy: str
    documents: int  # documents in the cache


class Timeline:
    """KV bytes by tier over time, with the policy and the documents read at each sample:
    one sample per published state that changed them (a read adds one per chunk it
    publishes, a switch one). Appended on the model thread, read from any thread (`samples` copies)."""

    MAX = 2048  # past it every other sample goes, except where the policy or documents changed

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._samples: list[Sample] = []

    def add(self, gpu: int, host: int, policy: str, documents: int) -> None:
        s = self._samples
        if s and s[-1][1:] == (gpu, host, policy, documents):
            return
        new = Sample(self.clock(), gpu, host, policy, documents)
        if len(s) < self.MAX:
            s.append(new)  # NOTE: one append: a reader's list() sees it whole or not at all
            return
        kept = [x for i, x in enumerate(s) if i % 2 == 0 or i == 0 or x[3:] != s[i - 1][3:]]
        self._samples = kept + [new]

    def samples(self) -> list[Sample]:
        return list(self._samples)


def cache_state(cache, context, held=None, messages=None, tok=None, prev: CacheState | None = None) -> CacheState:
    """What the gauge shows of `cache` now (call it on the thread that changes the cache).
    held, messages, tok: the record of what it encodes, the conversation and its tokenizer,
    for the map of where each token sits (`cache_map`); prev: the last state (its timeline
    goes on)."""
    per = [layer.nbytes() for layer in cache.layers]
    kv: Counter = Counter()
    for c in per:
        kv.update(c)
    cmap = None
    if held is not None:
        segs = cache_map.segments(held, messages or [], tok, cache.seen)
        cmap = cache_map.build(cache, segs, cache_map.text_of(held, messages or [], tok), len(held.ids))
    timeline = prev.timeline if prev is not None and prev.timeline is not None else Timeline()
    tiers = Counter()
    for (tier, _), n in kv.items():
        tiers[tier] += n
    timeline.add(tiers["gpu"], tiers["host"], cache.spec, cmap.documents if cmap is not None else 0)
    return CacheState(policy=cache.spec, kv=tuple((t, k, n) for (t, k), n in sorted(kv.items())),
                      peak=cache.peak_bytes, layers=tuple(sum(c.values()) for c in per), context=context,
                      cache_map=cmap, timeline=timeline)


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
