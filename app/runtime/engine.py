"""The Runtime: one model, one tokenizer, one KV cache, one conversation.

Prefill runs chunk by chunk through the policy stack; decode streams tokens to a
callback and checks a stop flag every token. Work that fails (stop, out of memory)
leaves the conversation as it was before that work began.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

import offload  # noqa: F401  (registers offload's policies)
from policies import Chunk, parse_spec

from . import documents, loader, memory
from .adapter import Adapter
from .decode import Decoder
from .sampling import sample, stop_token_ids
from .session import Conversation, common_prefix
from .types import (ContextInfo, ConversionResult, DocumentInfo, MemoryReport, Sampling, Stopped,
                    TurnResult, VramchatError)

_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS))


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
        self.cached_text = ""
        self._answer_start = None  # index in cached_text where the last answer began
        self._weights_bytes = self.adapter.weights_bytes()
        self._lock = threading.RLock()

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
        return memory.report(self.device, self.cache, self._weights_bytes)

    def policy_warnings(self) -> list[str]:
        """What the current policy says a person should know (e.g. `anchor` on a model
        not trained for it)."""
        return self.cache.warnings()

    def layer_bytes(self) -> list[int]:
        """KV bytes held per decoder layer (all tiers): policies like `lighttransfer` keep
        some layers short."""
        return [sum(layer.nbytes().values()) for layer in self.cache.layers]

    def tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # ---- prefill ------------------------------------------------------------------
    def _chunks(self, n: int) -> list[int]:
        sel = self.cache.layers[0].selector
        size = getattr(sel, "chunk", None) or self.chunk_size
        if hasattr(sel, "plan"):
            return sel.plan(n, size)
        return [min(size, n - s) for s in range(0, n, size)]

    def _prefill(self, ids: list[int], progress=None, stop: threading.Event | None = None) -> torch.Tensor:
        """Feed ids through the cache chunk by chunk; returns the last token's logits."""
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        done, logits = 0, None
        plan = self._chunks(len(ids))
        self.cache.expect(len(ids), plan[0] if plan else 0)
        for i, n in enumerate(plan):
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped after {done:,} of {len(ids):,} tokens")
            chunk = Chunk(x[done:done + n], self.cache.next_position, "prefill", final=i == len(plan) - 1)
            logits = self.adapter.forward(chunk.input_ids, self.cache, chunk)
            self.cache.end_chunk(chunk)
            done += n
            if progress is not None:
                progress(done, len(ids))
        return logits

    def _check_fit(self, n_new: int, extra: int = 0) -> None:
        """Refuse (before reading) what the policy cannot hold in this device's memory."""
        need_tokens = self.cache.projected_length(n_new + extra, self._chunks(max(n_new, 1))[0])
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
            logits = self._prefill(ids, progress, stop)
        except BaseException as e:
            if not self.cache.truncate(seen0):
                self._reset_cache(self.cache.spec)
                self.cached_text, self._answer_start = "", None
            else:
                self.cached_text, self._answer_start = text0, ans0
            if _is_oom(e):
                self._free()
                raise VramchatError(
                    f"out of memory while reading {len(ids):,} new tokens with policy `{self.policy}`; "
                    "the conversation is intact (that input was not added). Try a smaller --chunk-size, "
                    "`locret` or `kivi`.") from e
            raise
        self.cached_text, self._answer_start = target, None
        return logits

    def _rebuild(self, target, progress=None, stop=None):
        self._reset_cache(self.cache.spec)
        self.cached_text, self._answer_start = "", None
        ids = self.tokens(target)
        self._check_fit(len(ids))
        return self._atomic(ids, target, progress, stop), len(ids)

    def _reset_cache(self, spec: str) -> None:
        self.cache = None
        self._free()
        self.cache = self.adapter.new_cache(spec)

    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- conversation -------------------------------------------------------------
    def load_document(self, path: str, progress=None, stop=None) -> DocumentInfo:
        with self._lock:
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
        with self._lock:
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
            out: list[int] = []
            text, finish, t_first = "", "length", None
            with Decoder(self.adapter, self.cache) as dec:
                while len(out) < max_new_tokens:
                    if stop is not None and stop.is_set():
                        finish = "stopped"
                        break
                    tok = sample(logits, sampling, gen)
                    if tok in self.stop_ids:
                        finish = "stop"
                        break
                    out.append(tok)
                    piece, text = self._detok(out, text)
                    if t_first is None:
                        t_first = time.perf_counter()
                    if piece and on_token is not None:
                        on_token(piece)
                    try:
                        logits = dec.step(tok)
                    except BaseException as e:
                        if not _is_oom(e):
                            raise
                        self._free()
                        finish = "oom"
                        out.pop()  # that token never reached the cache
                        text = self.tok.decode(out, skip_special_tokens=True)
                        break
            self.cache.track_peak()  # NOTE: decode only appends, so the end is the peak
            t_end = time.perf_counter()
            text = self.tok.decode(out, skip_special_tokens=True)
            self.cached_text += self.tok.decode(out, skip_special_tokens=False)
            n = len(out)
            decode_s = (t_end - t_first) if t_first else 0.0
            res = TurnResult(
                question=question, answer=text, prompt_tokens=n_prompt, new_tokens=n,
                ttft_s=(t_first or t_end) - t0, prefill_tok_s=n_prompt / t_prefill if t_prefill > 0 else 0.0,
                decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0, policy=self.policy,
                stopped=finish in ("stopped", "oom"), finish=finish,
                ffn_skip_ratio=self.cache.ffn.ratio() if self.cache.ffn is not None else None,
                decode_mode=dec.mode)
            self.conv.messages.append({"role": "assistant", "content": text, "partial": res.stopped,
                                       "stats": res.to_json()})
            if finish == "oom":
                raise VramchatError(f"out of memory after {n} generated tokens; the partial answer is kept. "
                                    "Try `kivi` or a smaller budget.")
            return res

    def _detok(self, ids: list[int], prev: str) -> tuple[str, str]:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", prev  # an incomplete UTF-8 sequence: wait for the next token
        return text[len(prev):] if text.startswith(prev) else text, text

    def set_system(self, text: str | None) -> None:
        with self._lock:
            self.conv.system = text or None  # the next turn re-prefills if the prefix changed

    def clear(self) -> None:
        with self._lock:
            self.conv = Conversation(system=self.conv.system)
            self._reset_cache(self.cache.spec)
            self.cached_text, self._answer_start = "", None

    # ---- policies -----------------------------------------------------------------
    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        from .convert import convert
        with self._lock:
            parse_spec(spec)
            old = self.cache
            before = sum(old.bytes_by_tier().values())
            old_spec = old.spec
            try:
                new, lossy, note = (None, False, "") if reprefill else convert(old, self.adapter.info, spec)
            except BaseException as e:
                if not _is_oom(e):
                    if any(l is None for l in old.layers):  # convert freed some old layers: re-read next turn
                        self._reset_cache(old_spec)
                        self.cached_text, self._answer_start = "", None
                    raise
                new, note = None, "out of memory while converting"
            if new is None:
                target = self.conv.render(self.tok, open_user=self._open_user())
                self._reset_cache(spec)
                self.cached_text, self._answer_start = "", None
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
            self._free()
            after = sum(self.cache.bytes_by_tier().values())
            return ConversionResult(old_spec, self.policy, before, after, False, lossy, note)

    def _open_user(self) -> bool:
        msgs = self.conv.messages
        return bool(msgs) and msgs[-1]["role"] == "document"

    # ---- save / restore -----------------------------------------------------------
    def to_json(self) -> dict:
        return {"model": self.model_id, "policy": self.policy, **self.conv.to_json()}

    def restore(self, data: dict, progress=None, stop=None) -> None:
        with self._lock:
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
            self._reset_cache(self.cache.spec)
            self.cached_text, self._answer_start = "", None
            target = self.conv.render(self.tok, open_user=self._open_user())
            if target:
                self._rebuild(target, progress, stop)

