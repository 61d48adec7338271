"""A document read that stops part way keeps what it read: the cache as it stood after its
last whole chunk, in the document cache beside the entry the whole read would make (the
same key + `.partial`), so reading the same file into the same conversation again resumes
there.

A partial entry is a cache file (snapshot.py) whose record is the one from before the read
plus the ids read so far; its `extra` says where the read stands: the document's ids
(their count and SHA-256, and the character of the conversation's rendering they begin at),
how many were read and the chunk plan. Resuming reads the rest with the tail of that plan,
so the cache ends equal to one read without a stop. It is written when the read is stopped,
and while a long read goes on (a crash keeps the last one): first after `checkpoint_s` of
reading, then once the time since the last write is `1 / share` times what that write took
(saving costs at most about `share` of the read). Each write replaces the last whole
(files.atomic_write); the whole read's entry replaces it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from . import snapshot
from .held import Held

SUFFIX = ".partial"


@dataclass
class Reading:
    """A read under way: ids [n] (the new text from character `start` of the target),
    read in chunks of lengths `plan`, `done` of them read."""
    ids: list
    plan: list
    start: int
    done: int = 0

    def resume_at(self) -> int:
        """The index in `plan` of the chunk that begins at `done` (ValueError if none does)."""
        at = 0
        for j, m in enumerate(self.plan):
            if at == self.done:
                return j
            at += m
        if at == self.done:
            return len(self.plan)
        raise ValueError(f"{self.done:,} tokens read is not a chunk end of the plan")


class Keeper:
    """Keeps one document read's partial cache in `docs` (a DocCache) under `key` + SUFFIX.
    The Reader tells it when the read begins, after every chunk and when it is stopped."""

    def __init__(self, docs, key: str, name: str, sha: str, *, clock: Callable[[], float] = time.monotonic):
        self.docs, self.key, self.name, self.sha, self.clock = docs, key + SUFFIX, name, sha, clock
        self.every, self.share = docs.checkpoint_s, docs.checkpoint_share
        self.last = self.took = 0.0  # when the last write ended (or the read began); seconds it took
        self.failed = ""  # why a checkpoint was not kept (then no more are tried)

    def begin(self) -> None:
        self.last, self.took = self.clock(), 0.0

    def due(self) -> bool:
        """Whether a checkpoint is due now (`checkpoint_s` 0: after every chunk)."""
        if self.failed:
            return False
        if self.every <= 0:
            return True
        return self.clock() - self.last >= max(self.every, self.took / self.share)

    def chunk(self, reader, reading: Reading) -> None:
        if self.due():
            self.failed = self.write(reader, reading)

    def stopped(self, reader, reading: Reading) -> str:
        """The read was stopped after `reading.done` tokens: keep them. -> what the person is told."""
        n = len(reading.ids)
        said = f"stopped after {reading.done:,} of {n:,} tokens"
        if reading.done == 0:
            return said
        why = self.write(reader, reading)
        return f"{said} ({why})" if why else f"{said}; kept: load {self.name} again to resume"

    def write(self, reader, reading: Reading) -> str:
        """Write the partial entry now. -> "" or why it was not kept."""
        if self.docs.cap <= 0:
            return "not kept: the document cache is off (doc_cache_gib 0 in the config file)"
        t0 = self.clock()
        h = reader.held
        held = Held(h.text, h.answer_start, list(h.marks), h.ids + [int(i) for i in reading.ids[:reading.done]])
        extra = {"name": self.name, "file_sha256": self.sha,
                 "partial": {"done": reading.done, "tokens": len(reading.ids), "start": reading.start,
                             "ids_sha256": snapshot.ids_hash(reading.ids), "plan": list(reading.plan)}}
        why = self.docs.put(self.key, lambda p: snapshot.write(p, reader.cache, held, reader.adapter, extra),
                            reader.cache)
        self.last = self.clock()
        self.took = self.last - t0
        return why

    def drop(self) -> None:
        """The read is whole (or kept whole elsewhere): its partial entry goes."""
        self.docs.path(self.key).unlink(missing_ok=True)


def resume(keeper: Keeper, reader, target: str, tokens, progress=None, stop=None):
    """Continue the read `keeper`'s partial entry kept, if there is one that fits `target`
    (tokens(text) -> ids). -> ((last logits, the read's tokens, tokens it had read) or None,
    "" or one line why an entry there was not used)."""
    path = keeper.docs.find(keeper.key)
    if path is None:
        return None, ""
    try:
        snap = snapshot.read(path, reader.adapter, None if reader.auto else reader.cache.spec)
        reading, held0 = _reading(snap, target, tokens)
        done = reading.done
        logits = reader.resume(snap, held0, reading, target, progress, stop, keeper)
    except snapshot.SnapshotError as e:  # NOTE: the cache is then empty or as it was: the caller reads anew
        return None, f"document cache: the part read before was not used ({e}); read from the start"
    return (logits, len(reading.ids), done), ""


def _reading(snap, target: str, tokens) -> tuple[Reading, Held]:
    """Where the kept read stands, and the record from before it. Raises SnapshotError (one line)
    where the entry is not a part of this read (another tokenizer, an edited conversation)."""
    name = snap.path.name
    try:
        p = snap.extra["partial"]
        start, done, n, plan = int(p["start"]), int(p["done"]), int(p["tokens"]), [int(m) for m in p["plan"]]
        want = str(p["ids_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise snapshot.SnapshotError(f"{name}: not a partial read ({snapshot.first_line(e)})") from None
    ids = tokens(target[start:]) if 0 <= start <= len(target) else []
    if len(ids) != n or snapshot.ids_hash(ids) != want:
        raise snapshot.SnapshotError(f"{name}: made for other text ({n:,} tokens from character {start:,})")
    h = snap.held
    seen0 = len(h.ids) - done
    if sum(plan) != n or not 0 < done < n or seen0 < 0 or h.ids[seen0:] != ids[:done]:
        raise snapshot.SnapshotError(f"{name}: its plan or its {done:,} tokens read do not match the text")
    reading = Reading(ids, plan, start, done)
    try:
        reading.resume_at()
    except ValueError as e:
        raise snapshot.SnapshotError(f"{name}: {e}") from None
    return reading, Held(h.text, h.answer_start, list(h.marks), h.ids[:seen0])
