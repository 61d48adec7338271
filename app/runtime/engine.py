"""The Runtime: one model, one tokenizer, one KV cache, one conversation.

A turn renders the conversation and has the `Reader` make the cache hold it (reading only
what is new, `reader.py`), then decodes the answer (`decode.py`). Work that fails (stop,
out of memory) leaves the conversation as it was before that work began. Every change holds
the lock and publishes a `CacheState` as it goes, so the gauge reads memory from any thread
without waiting. `protocol.ChatRuntime` states what the app needs of it.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch

from policies import parse_spec

from . import auto, doc_cache, documents, evidence, loader, memory
from .adapter import Adapter, recording
from .auto import AUTO, Choice
from .decode import generate
from .fit import Fit
from .held import Held
from .published import Published
from .reader import Reader
from .sampling import generator, stop_token_ids
from .session import Conversation, with_bos
from .types import (CacheState, ContextInfo, ConversionResult, DocumentInfo, MemoryReport, Progress, Sampling,
                    TurnResult, VramchatError)


class Runtime:
    def __init__(self, model, tokenizer, *, policy: str = "full", model_id: str = "", device=None,
                 weights: str = "", chunk_size: int | None = None):
        self.adapter = Adapter(model, tokenizer, model_id)
        self.tok = tokenizer
        self.model_id = model_id or getattr(model.config, "_name_or_path", "model")
        self.device = self.adapter.info.device if device is None else torch.device(device)
        self.weights = weights or str(self.adapter.info.dtype).replace("torch.", "")
        self.window = self.adapter.info.window
        chunk_size = chunk_size or (2048 if self.device.type == "cuda" else 512)
        if chunk_size < 1:
            raise VramchatError(f"--chunk-size {chunk_size}: must be at least 1")
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.conv = Conversation()
        self.notes: list[str] = []  # what a person should know, in order (auto's switches, window warnings)
        self.on_note = None  # callable(str): called with each note as it is made (from the model thread)
        self.doc_cache = None  # a doc_cache.DocCache: documents read before are restored, not read
        self.sources = True  # each answer says which passages it read (evidence.py); False: off
        self._passages = evidence.Passages(tokenizer)
        self._weights_bytes = self.adapter.weights_bytes()
        self._lock = threading.RLock()
        self.kv = Reader(self.adapter, policy, fit=Fit(self.window, chunk_size, self.device),
                         tokens=self.tokens, conversation=lambda: self.conv.rendered(self.tok),
                         choose=lambda n, answer: auto.choose(self, n, answer),
                         publish=lambda last: self.published.chunk_read(last), note=self._note)
        self.published = Published(self._cache_state)

    @classmethod
    def load(cls, model: str | None = None, *, policy: str = "full", device: str = "auto",
             weights: str = "auto", chunk_size: int | None = None, trust_remote_code: bool = False,
             status=None) -> "Runtime":
        if policy != AUTO:
            parse_spec(policy)  # a bad spec fails before the model loads
        hf, tok, model_id, dev, label = loader.load(model, device, weights, trust_remote_code, status)
        return cls(hf, tok, policy=policy, model_id=model_id, device=dev, weights=label, chunk_size=chunk_size)

    @classmethod
    def from_model(cls, model, tokenizer, policy: str = "full", **kw) -> "Runtime":
        return cls(model, tokenizer, policy=policy, **kw)

    # ---- public state -------------------------------------------------------------
    # the prefill chunk: the Reader reads and checks with the one the runtime has now (a bench may change it)
    chunk_size = property(lambda self: self.kv.fit.chunk_size, lambda self, n: setattr(self.kv.fit, "chunk_size", n))

    @property
    def cache(self):
        """The KV cache (policies.KVCache); read it on the model thread, between turns."""
        return self.kv.cache

    @property
    def held(self) -> Held:
        """What the cache encodes: text, token ids, read ends (read it, never change it)."""
        return self.kv.held

    @property
    def auto(self) -> bool:
        return self.kv.auto

    @property
    def auto_choice(self) -> Choice | None:
        return self.kv.auto_choice

    @property
    def policy(self) -> str:
        return self.cache.spec

    @property
    def policy_label(self) -> str:
        """The spec, marked when `auto` chose it."""
        return f"auto: {self.policy}" if self.auto else self.policy

    @property
    def system(self) -> str | None:
        return self.conv.system

    @property
    def messages(self) -> list:
        return self.conv.messages

    def context(self) -> ContextInfo:
        return ContextInfo(read=self.cache.seen, retained=self.cache.length, window=self.window)

    def memory(self) -> MemoryReport:
        """Device and host memory now, the cache as last published: from any thread, never blocks."""
        return memory.report(self.device, self.published.state, self._weights_bytes)

    def snapshot(self) -> CacheState:
        """The cache's last published state (policy, bytes, context): from any thread."""
        return self.published.state

    def policy_warnings(self) -> list[str]:
        """What the current policy says a person should know (`anchor` on a model not trained for it)."""
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
        self.published.now()

    def _cache_state(self, last: CacheState | None) -> CacheState | None:
        """The state to publish now (None: a cache mid-replacement, or layers freed by a failed
        conversion: the last one stays)."""
        cache = self.cache
        if cache is None or any(layer is None for layer in cache.layers):
            return None
        return memory.cache_state(cache, self.context(), self.held, self.conv.messages, self.tok, last)

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.on_note is not None:
            self.on_note(text)

    def reset_cache(self, spec: str | None = None) -> None:
        """An empty cache under `spec` (default: the current one); the next turn reads the conversation again."""
        with self._changing():
            self.kv.reset(spec)

    def prefill(self, ids, progress: Progress | None = None, stop: threading.Event | None = None) -> torch.Tensor:
        """Read token ids (list or tensor [T]) into the cache, outside the conversation (the
        conversation does not know of them: benchmarks and tests). -> last logits [V]."""
        with self._changing():
            return self.kv.prefill(ids, progress, stop)

    def sync(self, target: str, progress=None, stop=None) -> tuple[torch.Tensor | None, int]:
        """Make the cache hold the rendering `target` (benchmarks: a prompt alone). -> (logits or None, tokens read)."""
        with self._changing():
            return self.kv.sync(target, progress, stop)

    # ---- conversation -------------------------------------------------------------
    def load_document(self, path: str, progress=None, stop=None) -> DocumentInfo:
        with self._changing():
            msg = documents.message(path)
            target = self.conv.render(self.tok, pending=[msg], open_user=True)
            t0 = time.perf_counter()
            n_new, restored, note = doc_cache.read_document(
                self.doc_cache, self.kv, path, target, AUTO if self.auto else self.policy, self.save_cache,
                progress, stop)
            if n_new == 0:
                raise VramchatError(f"{path} adds no tokens to the conversation")
            msg["tokens"] = n_new
            self.conv.messages.append(msg)
            return DocumentInfo(msg["name"], str(path), len(msg["content"]), n_new, time.perf_counter() - t0,
                                from_cache=restored, note=note)

    def ask(self, question: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
            on_token=None, progress=None, stop: threading.Event | None = None,
            prefix: str | None = None) -> TurnResult:
        """Answer `question`. prefix: the answer begins with it and the model continues (the result
        is the continuation); its trailing whitespace goes, as in transformers' `continue_final_message`."""
        if not question.strip():
            raise VramchatError("empty question")
        prefix = None if prefix is None else prefix.rstrip()
        with self._changing():
            msg = {"role": "user", "content": question}
            target = self.conv.render(self.tok, pending=[msg], answer_prefix=prefix)
            res, g = self._answer(target, question, max_new_tokens, sampling, on_token, progress, stop,
                                  on_read=lambda: self.conv.messages.append(msg))
            self.conv.messages.append({"role": "assistant", "content": (prefix or "") + g.text,
                                       "partial": res.stopped, "stats": res.to_json()})
            return g.checked(res)

    def complete(self, prompt: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
                 on_token=None, progress=None, stop: threading.Event | None = None) -> TurnResult:
        """Continue raw text, no chat template (a text-completions API). The conversation
        becomes empty; the cache keeps what it shares with `prompt` up to a read end.
        A tokenizer that begins every text with BOS gets it here too."""
        if not prompt:
            raise VramchatError("empty prompt")
        prompt = with_bos(self.tok, prompt)
        with self._changing():
            # NOTE: no tolerance inside the last answer (`Held.keeps`): raw text is read exactly as sent
            self.conv = Conversation()
            self.kv.held.no_answer()
            res, g = self._answer(prompt, prompt, max_new_tokens, sampling, on_token, progress, stop,
                                  on_read=lambda: None)
            return g.checked(res)

    def _answer(self, target: str, question: str, max_new_tokens: int, sampling: Sampling | None, on_token,
                progress, stop, on_read):
        """Read what the cache lacks of `target` (then on_read()), decode after it.
        -> (TurnResult, the generation); the caller records the answer, then `g.checked`."""
        if max_new_tokens < 1:
            raise VramchatError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        sampling = sampling or Sampling()
        rec = evidence.Recorder(evidence.layers_for(self.adapter.info.n_layers)) if self.sources else None
        t0 = time.perf_counter()
        with recording(rec):
            logits, n_prompt = self.kv.sync(target, progress, stop)
            if logits is None:
                raise VramchatError("nothing new to answer")
            t_prefill = time.perf_counter() - t0
            on_read()
            held = self.kv.held
            held.begin_answer()
            g = generate(self.adapter, self.cache, logits, self.tok, stop_ids=self.stop_ids,
                         max_new_tokens=max_new_tokens, sampling=sampling, gen=generator(sampling),
                         on_token=on_token, stop=stop,
                         on_step=self.published.now_and_then)
        held.answered(self.tok.decode(g.ids, skip_special_tokens=False), g.ids, self.cache.seen)
        ffn = self.cache.ffn.ratio() if self.cache.ffn is not None else None
        res = TurnResult.from_generation(g, question=question, prompt_tokens=n_prompt, t0=t0, prefill_s=t_prefill,
                                         policy=self.policy, ffn_skip_ratio=ffn)
        if rec is not None:
            t1 = time.perf_counter()
            res.sources, res.sources_note = evidence.explain(self.cache, held, self.conv.messages, self._passages,
                                                             rec, self.adapter.attn_scale, question)
            res.sources_s = time.perf_counter() - t1
        return res, g

    def set_system(self, text: str | None) -> None:
        with self._changing():
            self.conv.system = text or None  # the next turn re-prefills if the prefix changed

    def clear(self) -> None:
        with self._changing():
            self.conv = Conversation(system=self.conv.system)
            self.kv.reset()

    def set_conversation(self, system: str | None, messages: list[dict]) -> None:
        """Replace the conversation (user / assistant / document messages) but keep the
        cache: the next turn reads only what the cache does not hold already (a server
        receives the whole chat with every request)."""
        with self._changing():
            last = self.conv.messages[-1] if self.conv.messages else None
            given = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or given is None or given["content"] != last["content"]:
                self.kv.held.no_answer()  # not our last answer as we gave it: no tolerance inside it
            self.conv = Conversation(system=system or None, messages=[dict(m) for m in messages])

    # ---- policies, save / restore -------------------------------------------------
    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        """Switch the KV policy (`auto`: let the runtime choose, now and as the conversation grows)."""
        with self._changing():
            return self.kv.set_policy(spec, progress, stop, reprefill)

    def to_json(self) -> dict:
        return {"model": self.model_id, "policy": self.policy, **self.conv.to_json()}

    def restore(self, data: dict, progress=None, stop=None, cache_file=None) -> str:
        """Replace the conversation by a saved one (`to_json`), its cache from `cache_file`
        (`save_cache`) where that fits, else read again. -> one line saying which, and why."""
        with self._changing():
            self.conv = Conversation.from_saved(data)
            self.kv.reset()
            target = self.conv.rendered(self.tok)
            if not target:
                return "nothing to read"
            return self.kv.restore(target, cache_file, self.conv.messages, progress, stop)

    def save_cache(self, path, extra: dict | None = None) -> int:
        """Write the cache and the tokens it encodes to `path` (atomic, 0600), for `restore`
        and the document cache. -> bytes on disk. Raises snapshot.SnapshotError where the
        cache holds tokens outside the conversation (`prefill`)."""
        with self._lock:
            last = self.conv.messages[-1] if self.conv.messages else None
            answer = last["content"] if last is not None and last["role"] == "assistant" else None
            return self.kv.save(path, answer, extra)
