"""What a remote server says of its memory: a Prometheus text exposition read into samples,
the KV-cache use line vLLM and SGLang allow, and the report the gauge shows for it."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .types import MemoryReport

NOT_REPORTED = "remote: memory not reported"
# Prometheus gauges of KV-cache use, 0..1 (vLLM >= 0.10, older vLLM, SGLang with --enable-metrics)
_KV_METRICS = (("vllm:kv_cache_usage_perc", "vLLM"), ("vllm:gpu_cache_usage_perc", "vLLM"),
               ("sglang:token_usage", "SGLang"))
_QUEUE_METRICS = (("vllm:num_requests_running", "vllm:num_requests_waiting"),
                  ("sglang:num_running_reqs", "sglang:num_queue_reqs"))
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


@dataclass
class RemoteMemory(MemoryReport):
    """What the server reports. `remote` says where the numbers come from; a server that
    reports no byte counts (host_total == 0) has only that line."""

    remote: str = NOT_REPORTED


def prometheus(text: str) -> dict[str, list[float]]:
    """Samples of a Prometheus text exposition by metric name (labels dropped)."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                out.setdefault(m.group(1), []).append(float(m.group(3)))
            except ValueError:
                continue
    return out


def kv_usage_line(samples: dict[str, list[float]]) -> str | None:
    """'remote KV cache 37% used (vLLM; 2 running, 1 waiting)', or None without such a metric."""
    for name, engine in _KV_METRICS:
        if samples.get(name):
            used = max(samples[name])
            extra = ""
            for running, waiting in _QUEUE_METRICS:
                if samples.get(running) is not None and samples.get(waiting) is not None:
                    extra = f"; {sum(samples[running]):.0f} running, {sum(samples[waiting]):.0f} waiting"
            return f"remote KV cache {used:.0%} used ({engine}{extra})"
    return None
