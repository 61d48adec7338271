"""The Runtime: one model, one tokenizer, one KV cache, one conversation.

A turn renders the conversation, prefills what the cache does not hold yet (`prefill.py`)
and decodes the answer (`decode.py`). Work that fails (stop, out of memory) leaves the
conversation as it was before that work began. Every change holds the lock and publishes
a `CacheState` as it goes, so the gauge reads memory from any thread without waiting.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import offload  # noqa: F401  (registers offload's policies)
from policies import parse_spec

from . import documents, loader, memory
from .adapter import Adapter
from .decode import free_cached, generate, is_oom
from .prefill import chunk_plan, prefill
from .sampling import stop_token_ids
from .session import Conversation, common_prefix
from .types import (CacheState, ContextInfo, ConversionResult, DocumentInfo, MemoryReport, Progress, Sampling,
                    Stopped, TurnResult, VramchatError)

PUBLISH_S = 0.1  # while decoding, publish the cache's state at most this often (it walks every layer)


class Runtime:
    def __init__(self, model, tokenizer, *, policy: str = "full", model_id: str = "", device=None,
                 weights: str = "", chunk_size: int | None = None):
        self.adapter = Adapter(model, tokenizer, model_id)
        self.tok = tokenizer
        self.model_id = model_id or getattr(model.config, "_name_or_path", "model")
        self.device = self.adapter.info.device if device is None else torch.device(device)
        self.weights = weights or str(self.adapter.info.dtype).replace("torch.", "")
        self.window = self.adapter.info.window
        self.chunk_size = chunk_size or (2048 if self.device.type == "cuda" else 512)
        if self.chunk_size < 1:
            raise VramchatError(f"--chunk-size {self.chunk_size}: must be at least 1")
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.conv = Conversation()
        self.cache = self.adapter.new_cache(policy)
        self.cached_text = ""  # the rendering of the conversation the cache holds
        self._answer_start = None  # index in cached_text where the last answer began
        self._weights_bytes = self.adapter.weights_bytes()
        self._lock = threading.RLock()
        self._state: CacheState = memory.cache_state(self.cache, self.context())
        self._published = 0.0

    # ---- construction -------------------------------------------------------------
    @classmethod
    def load(cls, model: str | None = None, *, policy: str = "full", device: str = "auto",
             weights: str = "auto", chunk_size: int | None = None, trust_remote_code: bool = False,
             status=None) -> "Runtime":
        parse_spec(policy)  # a bad spec fails before the model loads
        hf, tok, model_id, dev, label = loader.load(model, device, weights, trust_remote_code, status)
        return cls(hf, tok, policy=policy, model_id=model_id, device=dev, weights=label, chunk_size=chunk_size)

    @classmethod
    def from_model(cls, model, tokenizer, policy: str = "full", **kw) -> "Runtime":
        return cls(model, tokenizer, policy=policy, **kw)

    # ---- public state -------------------------------------------------------------
    @property
    def policy(self) -> str:
        return self.cache.spec

    @property
    def system(self) -> str | None:
        return self.conv.system

    @property
    def messages(self) -> list:
        return self.conv.messages

    def context(self) -> ContextInfo:
        return ContextInfo(read=self.cache.seen, retained=self.cache.length, window=self.window)

    def memory(self) -> MemoryReport:
        """Device and host memory now, the cache as of its last published state: never
        blocks, from any thread."""
        return memory.report(self.device, self._state, self._weights_bytes)

    def snapshot(self) -> CacheState:
        """The cache's last published state (policy, bytes, context): from any thread."""
        return self._state

    def policy_warnings(self) -> list[str]:
        """What the current policy says a person should know (e.g. `anchor` on a model
        not trained for it)."""
        return self.cache.warnings()

    def tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # ---- changes ----------------------------------------------------------------
    @contextmanager
    def _changing(self):
        """Hold the lock for a change of the cache or conversation; publish on the way out."""
        with self._lock:
            try:
                yield
            finally:
                self._publish()

    def _publish(self) -> None:
        """Replace the state the gauge reads by the cache's now (on the thread that changes it).
        A cache mid-replacement (None, or layers freed by a failed conversion) keeps the last."""
        cache = self.cache
        if cache is None or any(layer is None for layer in cache.layers):
            return
        self._state = memory.cache_state(cache, self.context())
        self._published = time.monotonic()

    def reset_cache(self, spec: str | None = None) -> None:
        """An empty cache under `spec` (default: the current policy). The conversation is
        kept; its next turn reads it again."""
        with self._changing():
            spec = spec or self.cache.spec
            self.cache = None  # NOTE: the old cache's memory goes before the new one's is taken
            self._set_cached("")
            free_cached(self.device)
            self.cache = self.adapter.new_cache(spec)

    def _set_cached(self, text: str, answer_start: int | None = None) -> None:
        """The cache now holds the rendering `text`; the last answer begins at answer_start."""
        self.cached_text, self._answer_start = text, answer_start

    # ---- prefill ------------------------------------------------------------------
    def prefill(self, ids, progress: Progress | None = None, stop: threading.Event | None = None) -> torch.Tensor:
        """Read token ids (list or tensor [T]) into the cache, outside the conversation (the
        conversation does not know of them: benchmarks and tests). -> last logits [V]."""
        with self._changing():
            def chunk_done(done: int, total: int) -> None:
                self._publish()
                if progress is not None:
                    progress(done, total)
            return prefill(self.adapter, self.cache, ids, self.chunk_size, progress=chunk_done, stop=stop)

    def _check_fit(self, n_new: int, extra: int = 0) -> None:
        """Refuse (before reading) what the policy cannot hold in this device's memory."""
        need_tokens = self.cache.projected_length(n_new + extra, chunk_plan(self.cache, max(n_new, 1),
                                                                           self.chunk_size)[0])
        per_tok = self.cache.bytes_per_token()
        need = need_tokens * per_tok - sum(self.cache.bytes_by_tier().values())
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0] + (
                torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        else:
            import psutil
            free = psutil.virtual_memory().available
        free -= 512 * 2**20  # activations, attention scores of one chunk, the allocator's slack
        if need > free:
            fits = max(0, int((free + sum(self.cache.bytes_by_tier().values())) // per_tok))
            raise VramchatError(
                f"this needs {n_new:,} more tokens; policy `{self.policy}` would hold {need_tokens:,} tokens "
                f"= {need_tokens * per_tok / 2**30:.2f} GiB of KV cache, but only {max(free, 0) / 2**30:.2f} GiB "
                f"is free on {self.device} (room for about {fits:,} tokens). Nothing was read. Try "
                "`locret` (a fixed budget) or `kivi` (about 5x smaller), or free memory.")

    def _sync(self, target: str, progress=None, stop=None) -> tuple[torch.Tensor | None, int]:
        """Make the cache hold `target`; prefill only what is new. -> (logits, n_new)."""
        keep = common_prefix(self.cached_text, target)
        if keep < len(self.cached_text):
            # The template re-rendered history differently; tolerate it only inside the
            # last answer (whitespace the template strips), else rebuild from scratch.
            if self._answer_start is None or keep < self._answer_start:
                return self._rebuild(target, progress, stop)
        new = target[keep:]
        if not new:
            return None, 0
        ids = self.tokens(new)
        self._check_fit(len(ids))
        return self._atomic(ids, target, progress, stop), len(ids)

    def _atomic(self, ids, target, progress, stop):
        """Prefill ids; on stop or out-of-memory put the cache back as it was."""
        seen0, text0, ans0 = self.cache.seen, self.cached_text, self._answer_start
        try:
            logits = self.prefill(ids, progress, stop)
        except BaseException as e:
            if not self.cache.truncate(seen0):
                self.reset_cache()
            else:
                self._set_cached(text0, ans0)
            if is_oom(e):
                free_cached(self.device)
                raise VramchatError(
                    f"out of memory while reading {len(ids):,} new tokens with policy `{self.policy}`; "
                    "the conversation is intact (that input was not added). Try a smaller --chunk-size, "
                    "`locret` or `kivi`.") from e
            raise
        self._set_cached(target)
        return logits

    def _rebuild(self, target, progress=None, stop=None):
        self.reset_cache()
        ids = self.tokens(target)
        self._check_fit(len(ids))
        return self._atomic(ids, target, progress, stop), len(ids)

    # ---- conversation -------------------------------------------------------------
    def load_document(self, path: str, progress=None, stop=None) -> DocumentInfo:
        with self._changing():
            text = documents.read_document(path)
            name = Path(path).name
            msg = {"role": "document", "name": name, "content": text, "path": str(Path(path).resolve())}
            target = self.conv.render(self.tok, pending=[msg], open_user=True)
            t0 = time.perf_counter()
            _, n_new = self._sync(target, progress, stop)
            if n_new == 0:
                raise VramchatError(f"{path} adds no tokens to the conversation")
            msg["tokens"] = n_new
            self.conv.messages.append(msg)
            return DocumentInfo(name, str(path), len(text), n_new, time.perf_counter() - t0)

    def ask(self, question: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
            on_token=None, progress=None, stop: threading.Event | None = None) -> TurnResult:
        if not question.strip():
            raise VramchatError("empty question")
        if max_new_tokens < 1:
            raise VramchatError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        sampling = sampling or Sampling()
        with self._changing():
            msg = {"role": "user", "content": question}
            target = self.conv.render(self.tok, pending=[msg])
            t0 = time.perf_counter()
            logits, n_prompt = self._sync(target, progress, stop)
            if logits is None:
                raise VramchatError("nothing new to answer")
            t_prefill = time.perf_counter() - t0
            self.conv.messages.append(msg)
            self._answer_start = len(self.cached_text)
            gen = torch.Generator(device="cpu")
            if sampling.seed is not None:
                gen.manual_seed(sampling.seed)
            g = generate(self.adapter, self.cache, logits, self.tok, stop_ids=self.stop_ids,
                         max_new_tokens=max_new_tokens, sampling=sampling, gen=gen, on_token=on_token, stop=stop,
                         on_step=self._publish_now_and_then)
            self.cached_text += self.tok.decode(g.ids, skip_special_tokens=False)
            n, t_end = len(g.ids), g.end_s
            decode_s = (t_end - g.first_s) if g.first_s else 0.0
            res = TurnResult(
                question=question, answer=g.text, prompt_tokens=n_prompt, new_tokens=n,
                ttft_s=(g.first_s or t_end) - t0, prefill_tok_s=n_prompt / t_prefill if t_prefill > 0 else 0.0,
                decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0, policy=self.policy,
                stopped=g.finish in ("stopped", "oom"), finish=g.finish,
                ffn_skip_ratio=self.cache.ffn.ratio() if self.cache.ffn is not None else None,
                decode_mode=g.mode)
            self.conv.messages.append({"role": "assistant", "content": g.text, "partial": res.stopped,
                                       "stats": res.to_json()})
            if g.finish == "oom":
                raise VramchatError(f"out of memory after {n} generated tokens; the partial answer is kept. "
                                    "Try `kivi` or a smaller budget.")
            return res

    def _publish_now_and_then(self) -> None:
        if time.monotonic() - self._published >= PUBLISH_S:
            self._publish()

    def set_system(self, text: str | None) -> None:
        with self._changing():
            self.conv.system = text or None  # the next turn re-prefills if the prefix changed

    def clear(self) -> None:
        with self._changing():
            self.conv = Conversation(system=self.conv.system)
            self.reset_cache()

    # ---- policies -----------------------------------------------------------------
    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        from .convert import convert
        with self._changing():
            parse_spec(spec)
            old = self.cache
            before = sum(old.bytes_by_tier().values())
            old_spec = old.spec
            try:
                new, lossy, note = (None, False, "") if reprefill else convert(old, self.adapter.info, spec)
            except BaseException as e:
                if not is_oom(e):
                    if any(l is None for l in old.layers):  # convert freed some old layers: re-read next turn
                        self.reset_cache(old_spec)
                    raise
                new, note = None, "out of memory while converting"
            if new is None:
                target = self.conv.render(self.tok, open_user=self._open_user())
                self.reset_cache(spec)
                if target:
                    try:
                        self._rebuild(target, progress, stop)
                    except (Stopped, VramchatError) as e:
                        raise VramchatError(f"switched to `{self.policy}` but re-reading the conversation "
                                            f"failed: {e}. It is re-read on the next question.") from e
                after = sum(self.cache.bytes_by_tier().values())
                why = note or "this conversion needs the original tokens"
                return ConversionResult(old_spec, self.policy, before, after, True, False,
                                        f"re-read the conversation under `{self.policy}` ({why})")
            self.cache = new
            self.cache.give_tokens(lambda: self.tokens(self.cached_text))
            self.cache.track_peak()
            del old
            free_cached(self.device)
            after = sum(self.cache.bytes_by_tier().values())
            return ConversionResult(old_spec, self.policy, before, after, False, lossy, note)

    def _open_user(self) -> bool:
        msgs = self.conv.messages
        return bool(msgs) and msgs[-1]["role"] == "document"

    # ---- save / restore -----------------------------------------------------------
    def to_json(self) -> dict:
        return {"model": self.model_id, "policy": self.policy, **self.conv.to_json()}

    def restore(self, data: dict, progress=None, stop=None) -> None:
        with self._changing():
            msgs = data.get("messages")
            if not isinstance(msgs, list) or not all(
                    isinstance(m, dict) and m.get("role") in ("user", "assistant", "document")
                    and isinstance(m.get("content"), str) for m in msgs):
                raise VramchatError("not a vramchat conversation: `messages` must be a list of "
                                    "{role: user|assistant|document, content: text}")
            for m in msgs:
                if m["role"] == "document" and not isinstance(m.get("name"), str):
                    m["name"] = "document"
            self.conv = Conversation(system=data.get("system") or None, messages=list(msgs))
            self.reset_cache()
            target = self.conv.render(self.tok, open_user=self._open_user())
            if target:
                self._rebuild(target, progress, stop)
