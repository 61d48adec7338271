"""GET /metrics: Prometheus's text format, written here (no client library needed).

vLLM's names where the meaning is the same, so stock dashboards and `--backend`'s gauge
(app/runtime/remote.py) read them: requests running and waiting, KV-cache usage, token
counters. Then vramchat's own: KV bytes by tier and kind, tokens read and retained, the
policy. Every number comes from the runtime's last published state, never blocking on it.
"""
from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Page:
    def __init__(self):
        self.lines: list[str] = []

    def add(self, name: str, kind: str, help_: str, samples) -> None:
        """samples: [(labels dict, value)]."""
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            tags = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{tags}}} {float(value)!r}" if tags else f"{name} {float(value)!r}")


def kv_usage(mem) -> float:
    """The share of what the cache could grow into on its device (its K/V there plus the
    free memory) that it holds: 0..1. vLLM's is the share of a preallocated block pool; this
    runtime allocates as it reads, so free memory is the pool."""
    kv = mem.kv_total("gpu")
    if mem.has_gpu and mem.gpu_total is not None:
        free = mem.gpu_total - mem.gpu_used + ((mem.torch_reserved or 0) - (mem.torch_allocated or 0))
    else:
        free = mem.host_available
    return kv / (kv + free) if kv + free > 0 else 0.0


def exposition(serving) -> str:
    rt = serving.rt
    mem, state = rt.memory(), rt.snapshot()
    ctx = state.context
    model = {"model_name": rt.model_id}
    p = _Page()
    p.add("vllm:num_requests_running", "gauge", "Requests being answered (batch 1: 0 or 1).",
          [(model, serving.running is not None)])
    p.add("vllm:num_requests_waiting", "gauge", "Requests waiting in the queue.", [(model, serving.waiting())])
    usage = kv_usage(mem)
    p.add("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage, 0..1: its bytes over those plus the device's "
          "free memory.", [(model, usage)])
    p.add("vllm:gpu_cache_usage_perc", "gauge", "The same as vllm:kv_cache_usage_perc (older vLLM's name).",
          [(model, usage)])
    t = serving.totals
    p.add("vllm:prompt_tokens_total", "counter", "Prompt tokens of answered requests (the whole prompt).",
          [(model, t["prompt_tokens"])])
    p.add("vllm:generation_tokens_total", "counter", "Tokens generated.", [(model, t["generation_tokens"])])
    p.add("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the cache.",
          [(model, t["prompt_tokens"])])
    p.add("vllm:prefix_cache_hits_total", "counter", "Prompt tokens the cache already held (not read again).",
          [(model, t["cached_tokens"])])
    p.add("vllm:request_success_total", "counter", "Requests answered, by finish reason.",
          [({**model, "finished_reason": r}, n) for r, n in serving.finished.items()])
    p.add("vramchat_requests_served_total", "counter", "Requests the model thread finished (answered, refused "
          "there, or left by their client).", [(model, serving.served)])
    p.add("vramchat_prefilled_tokens_total", "counter", "Tokens read into the cache for prompts.",
          [(model, t["prefilled_tokens"])])
    p.add("vramchat_info", "gauge", "The model and the KV policy the cache holds now.",
          [({**model, "policy": state.policy, "auto": str(rt.auto).lower()}, 1)])
    kv = [({"tier": tier, "kind": kind}, n)
          for tier, kinds in sorted(mem.kv.items()) for kind, n in sorted(kinds.items())]
    p.add("vramchat_kv_bytes", "gauge", "Bytes the KV cache holds, by tier (gpu: the compute device, host: "
          "offloaded) and kind.", kv)
    p.add("vramchat_kv_peak_bytes", "gauge", "The KV cache's peak bytes, all tiers.", [({}, mem.kv_peak_bytes)])
    p.add("vramchat_weights_bytes", "gauge", "Bytes of model weights.", [({}, mem.weights_bytes)])
    p.add("vramchat_context_read_tokens", "gauge", "Tokens the conversation has put through the model.",
          [({}, ctx.read)])
    p.add("vramchat_context_retained_tokens", "gauge", "Tokens per KV head the cache holds.", [({}, ctx.retained)])
    p.add("vramchat_context_window_tokens", "gauge", "The model's native context window.", [({}, ctx.window)])
    if mem.has_gpu and mem.gpu_total is not None:
        p.add("vramchat_device_memory_bytes", "gauge", "Device memory (NVML, all processes).",
              [({"state": "total"}, mem.gpu_total), ({"state": "used"}, mem.gpu_used)])
    p.add("vramchat_host_memory_bytes", "gauge", "Host memory.",
          [({"state": "total"}, mem.host_total), ({"state": "available"}, mem.host_available),
           ({"state": "rss"}, mem.rss)])
    return "\n".join(p.lines) + "\n"
