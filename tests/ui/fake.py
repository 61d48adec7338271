"""A fast, deterministic stand-in for `app.runtime.engine.Runtime` (the same contract).

It streams word-sized tokens, reports prefill progress in chunks, honours the stop event, and
reports fixed memory numbers so snapshots are stable. `hold_after` pauses an answer after that
many tokens until `release` is set (for the mid-stream snapshot and the stop test). Like the
runtime it publishes its state after every change (`snapshot()`, `memory()` read the last one):
a cache map and a timeline by the fixed rule of fake_map.py. Under `auto` it chooses `full`
up to AUTO_FULL tokens, else AUTO_LONG.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

from app.runtime.types import (CacheState, ContextInfo, ConversionResult, DocumentInfo, MemoryReport, Sampling,
                               Stopped, TurnResult, VramchatError)
from policies.registry import parse_spec
from tests.ui.fake_map import FakeCache

GiB, MiB = 1 << 30, 1 << 20
AUTO_FULL, AUTO_FULL_SPEC, AUTO_LONG = 2048, "full", "locret+offload"
CITED_NOTE = ("the part of the document that answers this may have been evicted: “harbour” occurs only in "
              "notes.md line 40, which the policy did not keep or recall for this question")


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z0-9]{4,}", text)}


def answer_for(question: str) -> str:
    return (f"You asked: **{question}**.\n\nThe document says the cache can be *compressed*.\n\n"
            "```python\nprint('kv')\n```\n\nThat is all.")


class FakeRuntime:
    def __init__(self, model_id: str = "tiny-fake", has_gpu: bool = True, policy: str = "full"):
        self.model_id, self.device, self.weights, self.window = model_id, "cuda:0 (Fake GPU)", "bf16", 8192
        self.has_gpu = has_gpu
        if not has_gpu:
            self.device = "cpu"
        self.policy = policy
        self.auto = False
        self.on_note = None
        self.system: str | None = None
        self.messages: list[dict] = []
        self.read = 0
        self.hold_after: int | None = None
        self.held = threading.Event()  # set when an answer reached hold_after
        self.release = threading.Event()
        self.calls: list[str] = []
        self.chunk = 16
        self.hold_prefill = False  # pause prefill half-way until `release` (or stop) is set
        self.cite = False  # answers carry sources (`cited`: the second one recalled) and a note
        self.cache = FakeCache()
        self._publish()

    # -- helpers --
    def policy_warnings(self) -> list[str]:
        from policies.anchor import WARNING
        return [WARNING] if self.policy.startswith("anchor") else []

    def _kv_bytes(self, read: int | None = None, policy: str | None = None) -> int:
        per_token = 64 * 1024
        if "kivi" in (policy or self.policy):
            per_token //= 8
        return self._retained(read, policy) * per_token

    def _retained(self, read: int | None = None, policy: str | None = None) -> int:
        read = self.read if read is None else read
        slots = parse_spec(policy or self.policy)
        budget = slots["selector"].opts.get("budget") if "selector" in slots else None
        return min(read, budget) if budget else read

    def _host_bytes(self, read: int, policy: str) -> int:
        """offload keeps on the host what the selector evicts (alone: everything)."""
        if "offload" not in policy:
            return 0
        return (read - (self._retained(read, policy) if "+" in policy else 0)) * 64 * 1024

    def _publish(self) -> None:
        """Replace the published state by the one of now (a timeline sample first, as the runtime's)."""
        read, policy = self.read, self.policy
        gpu = self._kv_bytes(read, policy) if "+offload" in policy or "offload" not in policy else 0
        cmap = self.cache.map(read, policy)
        self.cache.timeline.add(gpu, self._host_bytes(read, policy), policy, cmap.documents)
        per = gpu // 4
        layers = [per, per, per // 4, per // 4] if policy.startswith("lighttransfer") else [per] * 4
        self._state = CacheState(policy=policy, layers=tuple(layers), context=self.context(), cache_map=cmap,
                                 timeline=self.cache.timeline)

    def _prefill(self, n: int, progress, stop) -> None:
        """Reads chunk by chunk; `read` (context()) grows as the chunks go in, as the runtime's
        published state does; a stop puts it back."""
        base = self.read
        for done in range(0, n, self.chunk):
            if stop is not None and stop.is_set():
                self.read = base
                self._publish()
                raise Stopped("stopped while reading")
            self.read = base + done
            self._publish()
            if progress:
                progress(done, n)
            if self.hold_prefill and done >= n // 2:
                self._hold(stop)
        self.read = base + n
        self._publish()
        if progress:
            progress(n, n)

    def _hold(self, stop) -> None:
        self.held.set()
        while not self.release.wait(0.01):
            if stop is not None and stop.is_set():
                break

    def cited(self, question: str) -> list[dict]:
        """Sources as the runtime gives them: the last document's three lines that share the
        most words of 4+ letters with the question (ties: the earlier), the second one recalled."""
        docs = [m for m in self.messages if m.get("role") == "document"]
        if not docs:
            return []
        asked = _words(question)
        lines = [(n, line) for n, line in enumerate(docs[-1]["content"].split("\n"), 1) if line.strip()]
        best = sorted(lines, key=lambda nl: (-len(asked & _words(nl[1])), nl[0]))[:3]
        return [{"document": docs[-1]["name"], "page": None, "line": n, "text": line.strip(), "weight": w,
                 "tier": "recalled" if i == 1 else "device"}
                for i, ((n, line), w) in enumerate(zip(best, (0.5625, 0.25, 0.125)))]

    # -- contract (app.runtime.protocol.ChatRuntime) --
    def load_document(self, path: str, progress=None, stop=None) -> DocumentInfo:
        self.calls.append(f"load_document {path}")
        p = Path(path)
        if p.suffix.lower() not in (".txt", ".md", ".pdf"):
            raise VramchatError(f"{p.name}: unsupported file type `{p.suffix}`; use .txt, .md or .pdf")
        if not p.is_file():
            raise VramchatError(f"no such file: {path}")
        text = p.read_text(encoding="utf-8")
        tokens = max(1, len(text) // 4)
        base = self.read
        if self.auto:
            self._choose(base + tokens)
        self._prefill(tokens, progress, stop)
        self.messages.append({"role": "document", "name": p.name, "path": str(p), "content": text,
                              "tokens": tokens})
        self.cache.read(p.name, "document", base, text, tokens)
        self._publish()
        return DocumentInfo(p.name, str(p), len(text), tokens, prefill_s=0.5)

    def ask(self, question: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
            on_token=None, progress=None, stop=None) -> TurnResult:
        self.calls.append(f"ask {question}")
        base = self.read
        self._prefill(len(question) // 4 + 1, progress, stop)
        self.cache.read("chat", "chat", base, question, self.read - base)
        self.cache.recall(self.policy)
        self._publish()
        pieces = [w + " " for w in answer_for(question).split(" ")][:max_new_tokens]
        out, stopped = [], False
        for i, piece in enumerate(pieces):
            if self.hold_after is not None and i == self.hold_after:
                self._hold(stop)
            if stop is not None and stop.is_set():
                stopped = True
                break
            out.append(piece)
            if on_token:
                on_token(piece)
        answer = "".join(out).rstrip()
        self.cache.read("chat", "chat", self.read, answer, len(out))
        self.read += len(out)
        self._publish()
        result = TurnResult(question, answer, prompt_tokens=self.read, new_tokens=len(out), ttft_s=0.12,
                            prefill_tok_s=1000.0, decode_tok_s=42.0, policy=self.policy, stopped=stopped,
                            finish="stopped" if stopped else "stop")
        if self.cite:
            result.sources = self.cited(question)
            result.sources_note = CITED_NOTE if result.sources else ""
        self.messages.append({"role": "user", "content": question})
        self.messages.append({"role": "assistant", "content": answer, "stats": result.to_json(),
                              "partial": stopped})
        return result

    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        self.calls.append(f"set_policy {spec}")
        self.auto = spec == "auto"
        if self.auto:
            spec = AUTO_FULL_SPEC if self.read <= AUTO_FULL else AUTO_LONG
        parse_spec(spec)  # raises SpecError
        before, old = self._kv_bytes(), self.policy
        reprefill = reprefill or "streaming" in spec
        if reprefill:
            read, self.read = self.read, 0
            self._prefill(read, progress, stop)
        self.policy = spec
        self._publish()
        return ConversionResult(old, spec, before, self._kv_bytes(), reprefill, lossy=spec != "full",
                                message="")

    def _choose(self, tokens: int) -> None:
        """auto, before a read: the stack for the longer text (a live switch, published)."""
        want = AUTO_FULL_SPEC if tokens <= AUTO_FULL else AUTO_LONG
        if want != self.policy:
            self.policy = want
            self._publish()

    def set_system(self, text: str | None) -> None:
        self.calls.append(f"set_system {text}")
        self.system = text

    def clear(self) -> None:
        self.calls.append("clear")
        self.messages, self.read = [], 0
        self.cache.clear()
        self._publish()

    def memory(self) -> MemoryReport:
        state = self._state  # the published state, as the runtime's gauge reads it
        read, policy = state.context.read, state.policy
        kv = self._kv_bytes(read, policy)
        kvs = {"gpu" if self.has_gpu else "host": {"keys": kv // 2, "values": kv // 2}}
        host = self._host_bytes(read, policy)
        if host:
            kvs["host"] = {"keys": host // 2, "values": host // 2}
            if "+" not in policy:  # offload alone: nothing on the device
                kvs.pop("gpu", None)
        common = dict(kv=kvs, kv_peak_bytes=sum(sum(d.values()) for d in kvs.values()), weights_bytes=3 * GiB,
                      rss=(2 * GiB if self.has_gpu else 4 * GiB) + kv, rss_peak=5 * GiB, host_total=32 * GiB,
                      host_available=20 * GiB)
        if not self.has_gpu:
            return MemoryReport(device="cpu", has_gpu=False, **common)
        return MemoryReport(device=self.device, has_gpu=True, gpu_total=24 * GiB, gpu_used=6 * GiB + kv,
                            torch_allocated=3 * GiB + kv + 200 * MiB, torch_reserved=3 * GiB + kv + 512 * MiB,
                            torch_peak=4 * GiB, **common)

    def context(self) -> ContextInfo:
        return ContextInfo(read=self.read, retained=self._retained(), window=self.window)

    def snapshot(self) -> CacheState:
        return self._state

    def layer_bytes(self) -> list[int]:
        """Four layers; under `lighttransfer` the last two are lazy (a quarter the bytes)."""
        per = self._kv_bytes() // 4
        return [per, per, per // 4, per // 4] if self.policy.startswith("lighttransfer") else [per] * 4

    def to_json(self) -> dict:
        return {"model": self.model_id, "policy": self.policy, "system": self.system,
                "messages": [dict(m) for m in self.messages]}

    def save_cache(self, path, extra=None) -> int:
        self.calls.append("save_cache")
        return 0

    def restore(self, data: dict, progress=None, stop=None, cache_file=None) -> str:
        self.calls.append("restore")
        self.messages, self.read = [], 0
        self.cache.clear()
        self.system = data.get("system")
        self.policy = data.get("policy", self.policy)
        sizes = [int(m.get("tokens", len(str(m.get("content", ""))) // 4 + 1)) for m in data["messages"]]
        self._prefill(sum(sizes), progress, stop)
        at = 0
        for m, n in zip(data["messages"], sizes):
            doc = m.get("role") == "document"
            self.cache.read(m.get("name", "document") if doc else "chat", "document" if doc else "chat", at,
                            str(m.get("content", "")), n)
            at += n
        self.messages = [dict(m) for m in data["messages"]]
        self._publish()
        return "re-read the conversation"
