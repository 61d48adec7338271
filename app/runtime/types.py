"""Plain data the runtime hands to its callers (CLI, UI, bench). No torch here."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

# progress(done, total) for prefill / conversion; token(text_piece) while decoding.
Progress = Callable[[int, int], None]
OnToken = Callable[[str], None]


class VramchatError(Exception):
    """An error a person can act on: the message names the problem and what to do."""


class Stopped(VramchatError):
    """The user stopped the work (stop flag / Ctrl-C); what was done is kept."""


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None


@dataclass
class DocumentInfo:
    name: str
    path: str
    chars: int
    tokens: int
    prefill_s: float = 0.0
    from_cache: bool = False  # restored from the document cache instead of read
    note: str = ""  # one line about the document cache (why it was not used or kept), or ""


@dataclass
class TurnResult:
    question: str
    answer: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    policy: str
    stopped: bool = False  # the user stopped it: the answer is partial
    finish: str = "stop"  # "stop" (EOS / stop token), "length", "stopped"
    ffn_skip_ratio: Optional[float] = None
    decode_mode: str = "eager"  # "cuda graph", "fixed shapes" or "eager (why)": app/runtime/decode.py
    sources: list = field(default_factory=list)  # [{document, page, line, text, weight, tier}] (evidence.py)
    sources_note: str = ""  # where what answers it may have been evicted
    sources_s: float = 0.0  # seconds spent finding the sources, after decoding

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_generation(cls, g, *, question: str, prompt_tokens: int, t0: float, prefill_s: float, policy: str,
                        ffn_skip_ratio: Optional[float]) -> "TurnResult":
        """The turn whose prompt was read from t0 (perf_counter) for prefill_s, then decoded
        as `g` (decode.Generation): times to the first token, prefill and decode speeds."""
        n, t_end = len(g.ids), g.end_s
        decode_s = (t_end - g.first_s) if g.first_s else 0.0
        return cls(question=question, answer=g.text, prompt_tokens=prompt_tokens, new_tokens=n,
                   ttft_s=(g.first_s or t_end) - t0, prefill_tok_s=prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
                   decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0, policy=policy,
                   stopped=g.finish in ("stopped", "oom"), finish=g.finish, ffn_skip_ratio=ffn_skip_ratio,
                   decode_mode=g.mode)


@dataclass
class ConversionResult:
    old_policy: str
    new_policy: str
    before_bytes: int
    after_bytes: int
    reprefilled: bool
    lossy: bool
    message: str


@dataclass(frozen=True)
class ContextInfo:
    read: int  # tokens the conversation has put through the model so far
    retained: int  # tokens per KV head the cache holds now
    window: int  # the model's native context window


@dataclass(frozen=True)
class CacheState:
    """The cache as the gauge and panels show it, taken on the model thread between two
    changes (after prefill chunks, during decoding, after a conversion or a clear: published.py)
    and replaced whole: any thread may read the last one while the cache changes."""

    policy: str
    kv: tuple = ()  # ((tier, kind, bytes), ...): the cache's own nbytes
    peak: int = 0  # the cache's peak bytes, all tiers
    layers: tuple = ()  # KV bytes per decoder layer, all tiers
    context: ContextInfo = ContextInfo(0, 0, 0)
    cache_map: object = None  # a cache_map.CacheMap: where each token read sits now (None: not known)
    timeline: object = None  # a memory.Timeline: KV bytes by tier since the runtime started (None: none kept)

    def kv_by_tier(self) -> dict:
        """{"gpu": {kind: bytes}, "host": {kind: bytes}} (a fresh dict)."""
        out: dict = {"gpu": {}, "host": {}}
        for tier, kind, n in self.kv:
            out.setdefault(tier, {})[kind] = out.get(tier, {}).get(kind, 0) + n
        return out


@dataclass
class MemoryReport:
    """One snapshot for the gauge. Bytes everywhere; None where not applicable."""

    device: str  # "cuda:0 (NVIDIA ...)" or "cpu"
    has_gpu: bool
    kv: dict = field(default_factory=dict)  # {"gpu": {kind: bytes}, "host": {kind: bytes}}
    kv_peak_bytes: int = 0
    weights_bytes: int = 0
    gpu_total: Optional[int] = None  # NVML, device-wide
    gpu_used: Optional[int] = None  # NVML, device-wide, all processes
    torch_allocated: Optional[int] = None
    torch_reserved: Optional[int] = None
    torch_peak: Optional[int] = None
    rss: int = 0
    rss_peak: int = 0
    host_total: int = 0
    host_available: int = 0

    def kv_total(self, tier: str | None = None) -> int:
        tiers = [tier] if tier else list(self.kv)
        return sum(sum(self.kv.get(t, {}).values()) for t in tiers)


def fmt_bytes(n: float) -> str:
    """4.2 GiB, 512.0 KiB, 17 B."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"
