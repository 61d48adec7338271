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
from policies import SpecError, parse_spec

from . import doc_cache, documents, loader, memory, snapshot
from .adapter import Adapter
from .decode import free_cached, generate, is_oom
from .prefill import prefill
from .sampling import stop_token_ids
from . import auto, fit
from .auto import AUTO, Choice
from .session import Conversation, common_prefix
from .types import (CacheState, ContextInfo, ConversionResult, DocumentInfo, MemoryReport, Progress, Sampling,
                    TurnResult, VramchatError)

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
        self.auto = policy == AUTO  # choose the stack as the conversation grows (app/runtime/auto.py)
        self.auto_choice: Choice | None = None  # the last choice and its reason
        self.notes: list[str] = []  # what a person should know, in order (auto's switches, window warnings)
        self.on_note = None  # callable(str): called with each note as it is made (from the model thread)
        self._choosing = False
        self.cache = self.adapter.new_cache("full" if self.auto else policy)
        self.cached_text = ""  # the rendering of the conversation the cache holds
        self._answer_start = None  # index in cached_text where the last answer began
        self._marks: list[tuple[int, int]] = []  # (len(cached_text), cache.seen) where a message ends
        self._ids: list[int] = []  # the token ids the cache encodes (cache files keep them)
        self.doc_cache = None  # a doc_cache.DocCache: documents read before are restored, not read
        self._weights_bytes = self.adapter.weights_bytes()
        self._lock = threading.RLock()
        self._state: CacheState = memory.cache_state(self.cache, self.context())
        self._published = 0.0

    # ---- construction -------------------------------------------------------------
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
            self._marks, self._ids = [], []
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

    def _sync(self, target: str, progress=None, stop=None) -> tuple[torch.Tensor | None, int]:
        """Make the cache hold `target`; prefill only what is new. -> (logits, n_new)."""
        keep = common_prefix(self.cached_text, target)
        if keep < len(self.cached_text):
            # The history differs. Inside the last answer the template may render it
            # differently (whitespace it strips, reasoning it drops): tolerated. Else the cache
            # is cut back to the last message end both share (a chat edited or regenerated),
            # or rebuilt when it cannot be cut.
            if self._answer_start is None or keep < self._answer_start or keep == len(target):
                if not self._cut_back(keep, len(target)):
                    return self._rebuild(target, progress, stop)
                keep = len(self.cached_text)
        new = target[keep:]
        if not new:
            return None, 0
        ids = self.tokens(new)
        self._before_reading(len(ids), progress, stop)
        return self._atomic(ids, target, progress, stop), len(ids)

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.on_note is not None:
            self.on_note(text)

    def window_warning(self, n_new: int, answer: int | None = None) -> str:
        return fit.window_warning(self, n_new, answer)

    def _before_reading(self, n_new: int, progress=None, stop=None) -> None:
        """Before n_new tokens are read: `auto` re-chooses, the window and memory are checked."""
        fit.before_reading(self, n_new, progress, stop)

    @property
    def answer_room(self) -> int:
        return fit.answer_room(self)

    def _cut_back(self, keep: int, end: int) -> bool:
        """Forget what the cache holds past the last message end at or before `keep` and
        before `end` (the new text's last token must be read for its logits)."""
        marks = [m for m in self._marks if m[0] <= keep and m[0] < end]
        if not marks or not self.cache.truncate(marks[-1][1]):
            return False
        self._marks = marks
        del self._ids[marks[-1][1]:]
        self._set_cached(self.cached_text[:marks[-1][0]])
        return True

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
        self._marks.append((len(target), self.cache.seen))
        self._ids.extend(int(i) for i in ids)
        return logits

    def _rebuild(self, target, progress=None, stop=None):
        self.reset_cache()
        ids = self.tokens(target)
        self._before_reading(len(ids), progress, stop)
        return self._atomic(ids, target, progress, stop), len(ids)

    # ---- conversation -------------------------------------------------------------
    def load_estimate(self, path: str) -> str:
        """One line before a document is read: its tokens and what the policy will hold (the
        estimate of `main.py plan`); "" where the file cannot be read (loading says why)."""
        from app.plan import before_load
        try:
            return before_load(self, path)
        except (VramchatError, SpecError):
            return ""

    def load_document(self, path: str, progress=None, stop=None) -> DocumentInfo:
        with self._changing():
            text = documents.read_document(path)
            name = Path(path).name
            msg = {"role": "document", "name": name, "content": text, "path": str(Path(path).resolve())}
            target = self.conv.render(self.tok, pending=[msg], open_user=True)
            t0 = time.perf_counter()
            key, snap, note = None, None, ""
            if self.doc_cache is not None:
                sha = doc_cache.file_hash(path)
                key = self.doc_cache.key(snapshot.identity(self.adapter), AUTO if self.auto else self.policy, sha,
                                         target)
                found = self.doc_cache.find(key)
                snap, why = self._open_cache(found) if found is not None else (None, "")
                note = f"document cache: {why}; read it again" if why else ""
            _, n_new = self._sync(target, progress, stop)
            n_new = int(snap.extra.get("doc_tokens", 0)) if snap is not None else n_new
            if n_new == 0:
                raise VramchatError(f"{path} adds no tokens to the conversation")
            took = time.perf_counter() - t0
            if key is not None and snap is None:
                extra = {"name": name, "doc_tokens": n_new, "file_sha256": sha}
                note = self.doc_cache.put(key, lambda p: self.save_cache(p, extra)) or note
            msg["tokens"] = n_new
            self.conv.messages.append(msg)
            return DocumentInfo(name, str(path), len(text), n_new, took, from_cache=snap is not None, note=note)

    def ask(self, question: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
            on_token=None, progress=None, stop: threading.Event | None = None,
            prefix: str | None = None) -> TurnResult:
        """Answer `question`. prefix: the answer begins with this text and the model continues
        it (the result's answer is the continuation only); trailing whitespace is dropped, as
        transformers' `continue_final_message` does, since tokenizers read " word" as one token."""
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
            return self._checked(res, g)

    def complete(self, prompt: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
                 on_token=None, progress=None, stop: threading.Event | None = None) -> TurnResult:
        """Continue raw text, no chat template (a text-completions API). The conversation
        becomes empty; the cache keeps what it shares with `prompt` up to a message end.
        A tokenizer that begins every text with BOS gets it here too."""
        if not prompt:
            raise VramchatError("empty prompt")
        bos = self.tok.bos_token
        if bos and not prompt.startswith(bos) and self.tok("a")["input_ids"][:1] == [self.tok.bos_token_id]:
            prompt = bos + prompt
        with self._changing():
            # NOTE: no tolerance inside the last answer (`_sync`): raw text is read exactly as sent
            self.conv, self._answer_start = Conversation(), None
            res, g = self._answer(prompt, prompt, max_new_tokens, sampling, on_token, progress, stop,
                                  on_read=lambda: None)
            return self._checked(res, g)

    def _answer(self, target: str, question: str, max_new_tokens: int, sampling: Sampling | None, on_token,
                progress, stop, on_read):
        """Read what the cache lacks of `target` (then on_read()), decode after it.
        -> (TurnResult, the generation); the caller records the answer, then `_checked`."""
        if max_new_tokens < 1:
            raise VramchatError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        sampling = sampling or Sampling()
        t0 = time.perf_counter()
        logits, n_prompt = self._sync(target, progress, stop)
        if logits is None:
            raise VramchatError("nothing new to answer")
        t_prefill = time.perf_counter() - t0
        on_read()
        self._answer_start = len(self.cached_text)
        gen = torch.Generator(device="cpu")
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        g = generate(self.adapter, self.cache, logits, self.tok, stop_ids=self.stop_ids,
                     max_new_tokens=max_new_tokens, sampling=sampling, gen=gen, on_token=on_token, stop=stop,
                     on_step=self._publish_now_and_then)
        self.cached_text += self.tok.decode(g.ids, skip_special_tokens=False)
        self._ids.extend(g.ids)
        self._marks.append((len(self.cached_text), self.cache.seen))
        n, t_end = len(g.ids), g.end_s
        decode_s = (t_end - g.first_s) if g.first_s else 0.0
        res = TurnResult(
            question=question, answer=g.text, prompt_tokens=n_prompt, new_tokens=n,
            ttft_s=(g.first_s or t_end) - t0, prefill_tok_s=n_prompt / t_prefill if t_prefill > 0 else 0.0,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0, policy=self.policy,
            stopped=g.finish in ("stopped", "oom"), finish=g.finish,
            ffn_skip_ratio=self.cache.ffn.ratio() if self.cache.ffn is not None else None,
            decode_mode=g.mode)
        return res, g

    @staticmethod
    def _checked(res: TurnResult, g) -> TurnResult:
        if g.finish == "oom":
            raise VramchatError(f"out of memory after {res.new_tokens} generated tokens; the partial answer is "
                                "kept. Try `kivi` or a smaller budget.")
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

    def set_conversation(self, system: str | None, messages: list[dict]) -> None:
        """Replace the conversation (user / assistant / document messages) but keep the
        cache: the next turn reads only what the cache does not hold already (a server
        receives the whole chat with every request)."""
        with self._changing():
            last = self.conv.messages[-1] if self.conv.messages else None
            given = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or given is None or given["content"] != last["content"]:
                self._answer_start = None  # not our last answer as we gave it: no tolerance inside it
            self.conv = Conversation(system=system or None, messages=[dict(m) for m in messages])

    # ---- policies -----------------------------------------------------------------
    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        """Switch the KV policy (`auto`: let the runtime choose, now and as the conversation grows)."""
        with self._changing():
            was, old = self.auto, self.policy
            self.auto = spec == AUTO
            try:
                if self.auto:
                    choice = auto.choose(self, self.cache.seen, self.answer_room)
                    self.auto_choice, spec = choice, choice.spec
                return self._convert(spec, progress, stop, reprefill)
            except BaseException:
                if self.cache is not None and self.cache.spec == old:  # nothing switched (no heads): as it was
                    self.auto = was
                raise

    def _convert(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        from .convert import switch
        with self._changing():
            return switch(self, spec, progress, stop, reprefill)

    def _open_user(self) -> bool:
        msgs = self.conv.messages
        return bool(msgs) and msgs[-1]["role"] == "document"

    # ---- save / restore -----------------------------------------------------------
    def to_json(self) -> dict:
        return {"model": self.model_id, "policy": self.policy, **self.conv.to_json()}

    def restore(self, data: dict, progress=None, stop=None, cache_file=None) -> str:
        """Replace the conversation by a saved one (`to_json`). Its cache comes from
        `cache_file` (`save_cache`) where that fits, else the conversation is read again.
        -> one line saying which, and why."""
        with self._changing():
            self.conv = Conversation.from_saved(data)
            self.reset_cache()
            target = self.conv.render(self.tok, open_user=self._open_user())
            if not target:
                return "nothing to read"
            t0 = time.perf_counter()
            snap, why = self._open_cache(cache_file) if cache_file is not None else (None, "")
            if snap is None:
                self._sync(target, progress, stop)
                return f"re-read the conversation ({why})" if why else "re-read the conversation"
            # NOTE: what the cache lacks or holds otherwise (a chat template's end of the last
            # answer; an edited chat) is synced by the next turn, as the saved runtime would
            # have done it: the same chunks, the same evictions
            self._answer_start = snapshot.answer_start(snap.held, self.conv.messages)
            changed = "" if snapshot.covers(self.cached_text, self._answer_start, target) else (
                "; the conversation changed after it was saved: the next turn reads it from the change")
            return (f"restored its cache from {snap.path.name} ({snap.bytes / 2**20:,.1f} MiB, "
                    f"{self.cache.seen:,} tokens) in {time.perf_counter() - t0:.2f} s{changed}")

    # ---- cache files (snapshot.py) ------------------------------------------------
    def save_cache(self, path, extra: dict | None = None) -> int:
        """Write the cache and the tokens it encodes to `path` (atomic, 0600), for `restore`
        and the document cache. -> bytes on disk. Raises snapshot.SnapshotError where the
        cache holds tokens outside the conversation (`prefill`)."""
        with self._lock:
            last = self.conv.messages[-1] if self.conv.messages else None
            answer = last["content"] if last is not None and last["role"] == "assistant" else None
            held = snapshot.Held(self.cached_text, self._answer_start, list(self._marks), list(self._ids), answer)
            return snapshot.write(path, self.cache, held, self.adapter, extra)

    def _open_cache(self, path):
        """Hold the cache saved at `path` and the text it encodes (the next sync reads what
        differs). -> (the snapshot, "") or (None, one line why not); a file that fails after
        the old cache was dropped leaves an empty cache (the caller reads)."""
        try:
            snap = snapshot.read(path, self.adapter, None if self.auto else self.policy)
            self.reset_cache()
            self.cache = snap.build(self.adapter)
        except snapshot.SnapshotError as e:
            return None, str(e)
        h = snap.held
        self._set_cached(h.text, h.answer_start)
        self._marks, self._ids = [tuple(m) for m in h.marks], list(h.ids)
        return snap, ""

