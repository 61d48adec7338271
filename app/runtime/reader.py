"""The KV cache and the record of what it holds: one object per runtime, one job.

`Reader` makes the cache hold a text the runtime gives it (`sync`: only what is new is
read; a history that differs is cut back to a read end both share, else read anew),
switches the cache's policy (`switch`: converted in place where the math allows, else the
text re-read under the new one) and, before every read, lets `auto` choose the stack for
the longer text, warns before a policy that keeps every position passes the native window,
and refuses what will not fit in memory (`Fit`). A read that fails (stop, out of memory)
leaves the cache and its record as they were; a document's read that is stopped keeps what
it read first (`partial.py`), and `resume` goes on from there.

It knows nothing of conversations, turns or locks: the Runtime renders the text, holds its
lock around every call and is told of each chunk read (`publish`) and of what a person should
know (`note`). Calls never come back up: choosing, switching and re-reading for a switch go
down through `_prepare` -> `switch` -> `_read_anew(choose=False)`.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from policies import KVCache

from .auto import AUTO, Choice
from .convert import convert
from .decode import free_cached, is_oom
from .fit import Fit
from .held import Held
from .partial import Reading
from .prefill import chunk_plan, prefill
from .types import ConversionResult, Progress, Stopped, VramchatError


class Reader:
    def __init__(self, adapter, policy: str, *, fit: Fit, tokens: Callable[[str], list],
                 conversation: Callable[[], str], choose: Callable[[int, int], Choice],
                 publish: Callable[[bool], None], note: Callable[[str], None]):
        """tokens(text) -> ids; conversation() -> the rendering a switch re-reads (the conversation
        so far); choose(tokens, answer) -> auto's Choice; publish(last) after every chunk read
        (last: the read's final chunk); note(text): what a person should know, as it happens."""
        self.adapter = adapter
        self.fit = fit
        self.auto = policy == AUTO  # choose the stack as the text grows (`choose`: auto.choose)
        self.auto_choice: Choice | None = None  # the last choice and its reason
        self.cache: KVCache | None = adapter.new_cache("full" if self.auto else policy)
        self.held = Held()
        self._tokens, self._conversation, self._choose = tokens, conversation, choose
        self._publish, self._note = publish, note

    def tokens(self, text: str) -> list:
        return self._tokens(text)

    @property
    def device(self) -> torch.device:
        return self.fit.device

    def reset(self, spec: str | None = None) -> None:
        """An empty cache under `spec` (default: the current policy)."""
        spec = spec or self.cache.spec
        self.cache = None  # NOTE: the old cache's memory goes before the new one's is taken
        self.held.clear()
        free_cached(self.device)
        self.cache = self.adapter.new_cache(spec)

    def prefill(self, ids, progress: Progress | None = None, stop: threading.Event | None = None) -> torch.Tensor:
        """Read token ids into the cache, outside the record (benchmarks and tests). -> last logits [V]."""
        def chunk_done(done: int, total: int) -> None:
            self._publish(done >= total)
            if progress is not None:
                progress(done, total)
        return prefill(self.adapter, self.cache, ids, self.fit.chunk_size, progress=chunk_done, stop=stop)

    # ---- reads ----------------------------------------------------------------------
    def sync(self, target: str, progress=None, stop=None, keeper=None) -> tuple[torch.Tensor | None, int]:
        """Make the cache hold `target`; read only what is new. -> (last logits or None, tokens read).
        keeper: a `partial.Keeper` that keeps what this read has read if it stops (a document's)."""
        keep = self.held.keeps(target, self.cache.truncate)
        if keep is None:
            return self._read_anew(target, progress, stop, choose=True, keeper=keeper)
        new = target[keep:]
        if not new:
            return None, 0
        ids = self._tokens(new)
        self._prepare(len(ids), progress, stop)
        return self._read(self._reading(ids, keep), target, progress, stop, keeper), len(ids)

    def _read_anew(self, target: str, progress, stop, *, choose: bool, keeper=None):
        """Empty the cache and read `target`. choose: let `auto` choose first (not when the read
        is the switch auto asked for)."""
        self.reset()
        ids = self._tokens(target)
        if choose:
            self._prepare(len(ids), progress, stop)
        else:
            self.fit.check(self.cache, len(ids))
        return self._read(self._reading(ids, 0), target, progress, stop, keeper), len(ids)

    def _reading(self, ids, start: int) -> Reading:
        """ids [n], the text from character `start` of the target, to be read in the chunks the cache reads them in."""
        return Reading(list(ids), chunk_plan(self.cache, len(ids), self.fit.chunk_size), start)

    def resume(self, snap, held: Held, reading: Reading, target: str, progress=None, stop=None,
               keeper=None) -> torch.Tensor:
        """Hold the cache of a read kept part way (`partial.py`: `reading.done` tokens of it in
        `snap`, `held` the record from before it) and read the rest, in the rest of its plan:
        the cache ends as one read whole would. Its spec is the one the read began under (under
        `auto` too: chosen then for the whole length). -> last logits."""
        self.reset()
        self.cache = snap.build(self.adapter)
        self.held.replace(held)
        n_rest = len(reading.ids) - reading.done
        warning = self.fit.window_warning(self.cache, n_rest)
        if warning:
            self._note("warning: " + warning)
        try:
            self.fit.check(self.cache, n_rest)
        except BaseException:
            self._undo(self.cache.seen - reading.done)
            raise
        return self._read(reading, target, progress, stop, keeper)

    def _prepare(self, n_new: int, progress=None, stop=None) -> None:
        """Before n_new tokens are read: auto's choice (a live conversion where the math allows,
        else a re-read, said in a note), the window warning, then the memory check."""
        if self.auto:
            choice = self.auto_choice = self._choose(self.cache.seen + n_new, self.fit.answer_room)
            # NOTE: both canonical (auto.choose_for, KVCache.spec): equal strings, the same stack
            if choice.spec != self.cache.spec:
                res = self.switch(choice.spec, progress, stop)
                self._note(f"auto chose `{choice.spec}` (was `{res.old_policy}`): {choice.reason}; {res.message}")
        warning = self.fit.window_warning(self.cache, n_new)
        if warning:
            self._note("warning: " + warning)
        self.fit.check(self.cache, n_new)

    def _read(self, reading: Reading, target: str, progress, stop, keeper=None) -> torch.Tensor:
        """Prefill what `reading` has left, after which the cache holds `target`; on stop or out of
        memory put it back (`keeper` keeps what a stopped read read, and checkpoints it as it goes)."""
        ids, n = reading.ids, len(reading.ids)
        seen0 = self.cache.seen - reading.done
        first = reading.done

        def chunk_done(done: int, total: int) -> None:
            reading.done = first + done
            self._publish(reading.done >= n)
            if keeper is not None and reading.done < n:
                keeper.chunk(self, reading)
            if progress is not None:
                progress(reading.done, n)
        if progress is not None:  # where it starts (part way for a resumed read): rates count from here
            progress(first, n)
        if keeper is not None:
            keeper.begin()
        try:
            logits = prefill(self.adapter, self.cache, ids[first:], plan=reading.plan[reading.resume_at():],
                             progress=chunk_done, stop=stop)
        except BaseException as e:
            try:  # NOTE: written before the cache is cut back, which it describes
                kept = keeper.stopped(self, reading) if keeper is not None and isinstance(e, Stopped) else ""
            finally:
                self._undo(seen0)
            if is_oom(e):
                free_cached(self.device)
                raise VramchatError(
                    f"out of memory while reading {n - first:,} new tokens with policy `{self.cache.spec}`; "
                    "the conversation is intact (that input was not added). Try a smaller --chunk-size, "
                    "`locret` or `kivi`.") from e
            if kept:
                raise Stopped(kept) from e
            raise
        self.held.read(target, ids, self.cache.seen)
        return logits

    def _undo(self, seen: int) -> None:
        """Back to the cache of `seen` tokens the record holds (emptied where it cannot be cut there)."""
        if not self.cache.truncate(seen):
            self.reset()

    # ---- policies -------------------------------------------------------------------
    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        """Switch to `spec` (`auto`: choose now and as the text grows)."""
        was, old = self.auto, self.cache.spec
        self.auto = spec == AUTO
        try:
            if self.auto:
                self.auto_choice = self._choose(self.cache.seen, self.fit.answer_room)
                spec = self.auto_choice.spec
            return self.switch(spec, progress, stop, reprefill)
        except BaseException:
            if self.cache is not None and self.cache.spec == old:  # nothing switched (no heads): as it was
                self.auto = was
            raise

    def switch(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        """Convert the cache to `spec` in place, or read the conversation again under `spec`
        where converting is impossible, ran out of memory or `reprefill` asks for it."""
        self.adapter.check(spec)  # a live switch is refused where a fresh cache would be
        old = self.cache
        before, old_spec = sum(old.bytes_by_tier().values()), old.spec
        try:
            new, lossy, note = (None, False, "") if reprefill else convert(old, self.adapter.info, spec)
        except BaseException as e:
            if not is_oom(e):
                if any(l is None for l in old.layers):  # convert freed some old layers: re-read next turn
                    self.reset(old_spec)
                raise
            new, note = None, "out of memory while converting"
        if new is None:
            text = self._conversation()
            self.reset(spec)
            if text:
                try:
                    self._read_anew(text, progress, stop, choose=False)
                except (Stopped, VramchatError) as e:
                    raise VramchatError(f"switched to `{self.cache.spec}` but re-reading the conversation "
                                        f"failed: {e}. It is re-read on the next question.") from e
            after = sum(self.cache.bytes_by_tier().values())
            why = note or "this conversion needs the original tokens"
            return ConversionResult(old_spec, self.cache.spec, before, after, True, False,
                                    f"re-read the conversation under `{self.cache.spec}` ({why})")
        self.cache = new
        self.cache.give_tokens(lambda: self._tokens(self.held.text))
        self.cache.track_peak()
        del old
        free_cached(self.device)
        after = sum(self.cache.bytes_by_tier().values())
        return ConversionResult(old_spec, self.cache.spec, before, after, False, lossy, note)

    # ---- cache files ----------------------------------------------------------------
    def open(self, path, messages: list | None = None):
        """Hold the cache saved at `path` and the text it encodes (the next sync reads what
        differs; `messages`: see `Held.replace`). -> (the snapshot, "") or (None, one line why not); a file that fails after
        the old cache was dropped leaves an empty cache (the caller reads)."""
        from . import snapshot
        try:
            snap = snapshot.read(path, self.adapter, None if self.auto else self.cache.spec)
            self.reset()
            self.cache = snap.build(self.adapter)
        except snapshot.SnapshotError as e:
            return None, str(e)
        self.held.replace(snap.held, messages)
        return snap, ""

    def restore(self, target: str, cache_file, messages: list, progress=None, stop=None) -> str:
        """Hold `target` (a saved conversation's rendering; the cache is empty): from `cache_file`
        where it fits, else read. -> one line saying which, and why."""
        t0 = time.perf_counter()
        snap, why = self.open(cache_file, messages) if cache_file is not None else (None, "")
        if snap is None:
            self.sync(target, progress, stop)
            return f"re-read the conversation ({why})" if why else "re-read the conversation"
        # NOTE: what the cache lacks or holds otherwise (a chat template's end of the last
        # answer; an edited chat) is synced by the next turn, as the saved runtime would
        # have done it: the same chunks, the same evictions
        changed = "" if self.held.covers(target) else (
            "; the conversation changed after it was saved: the next turn reads it from the change")
        return (f"restored its cache from {snap.path.name} ({snap.bytes / 2**20:,.1f} MiB, "
                f"{self.cache.seen:,} tokens) in {time.perf_counter() - t0:.2f} s{changed}")

    def save(self, path, answer: str | None, extra: dict | None = None) -> int:
        """Write the cache and its record to `path` (snapshot.py). -> bytes on disk."""
        from . import snapshot
        return snapshot.write(path, self.cache, self.held.saved(answer), self.adapter, extra)
