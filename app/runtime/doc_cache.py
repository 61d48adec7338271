"""Read documents kept: the cache right after a document was read, as a cache file
(snapshot.py) in the user cache dir, found again by (model, policy spec, the file's
content hash, the conversation before it).

Reading the same file into the same conversation start under the same model and spec
gives the same cache, so `load_document` looks here first and restores instead of
reading. Entries are one file each, named by the key; the least recently used go first
once their total passes the size cap (a hit touches its file's mtime). Nothing else is
stored: `entries()` reads each file's header.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import partial, snapshot


@dataclass
class Entry:
    path: Path
    bytes: int
    used: float  # mtime: last written or used
    meta: dict  # the cache file's header (model_id, spec, tokens, extra: name, file_sha256, ...)

    @property
    def document(self) -> str:
        return json.loads(self.meta.get("extra", "{}")).get("name", "?")


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DocCache:
    def __init__(self, folder: str | Path, cap_bytes: int, checkpoint_s: float = 60.0, checkpoint_share: float = 0.05):
        """checkpoint_s, checkpoint_share: when a long read keeps what it has read so far
        (partial.py; checkpoint_s 0: after every chunk)."""
        if checkpoint_s < 0 or not 0 < checkpoint_share <= 1:
            raise ValueError(f"checkpoint_s {checkpoint_s} must be >= 0 and checkpoint_share "
                             f"{checkpoint_share} in (0, 1]")
        self.folder, self.cap = Path(folder), int(cap_bytes)
        self.checkpoint_s, self.checkpoint_share = float(checkpoint_s), float(checkpoint_share)

    @staticmethod
    def key(identity: dict, spec: str, file_sha: str, target: str) -> str:
        """The entry for a document read under `spec` on a model (`snapshot.identity`) into a
        conversation whose rendering becomes `target` (it holds what came before the document:
        another system prompt is another cache)."""
        parts = [identity["model_id"], identity["model_key"], identity["dtype"], identity["weights"], spec, file_sha,
                 hashlib.sha256(target.encode("utf-8")).hexdigest()]
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{snapshot.SUFFIX}"

    def find(self, key: str) -> Path | None:
        """The entry's file, marked used now; None if there is none."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            os.utime(p)
        except OSError:
            pass
        return p

    def put(self, key: str, write, cache=None) -> str:
        """Keep a new entry: write(path) -> bytes writes it. Then least recently used entries
        go until the total fits the cap. cache: the KVCache it writes; one holding more than
        the cap is refused before anything is written (a million-token cache is ~10 GiB on disk).
        -> "" or one line saying why it was not kept."""
        if self.cap <= 0:
            return ""
        held = sum(cache.bytes_by_tier().values()) if cache is not None else 0
        if held > self.cap:
            return (f"not kept in the document cache: the cache holds {held / 2**30:.2f} GiB, over its cap of "
                    f"{self.cap / 2**30:.2f} GiB (doc_cache_gib in the config file)")
        p = self.path(key)
        try:
            size = write(p)
        except (OSError, ValueError, RuntimeError, snapshot.SnapshotError) as e:
            return f"not kept in the document cache: {snapshot.first_line(e)}"
        if size > self.cap:
            p.unlink(missing_ok=True)
            return (f"not kept in the document cache: {size / 2**30:.2f} GiB is over its cap of "
                    f"{self.cap / 2**30:.2f} GiB (doc_cache_gib in the config file)")
        self.trim(keep=p)
        return ""

    def trim(self, keep: Path | None = None) -> int:
        """Remove least recently used entries (never `keep`) until the total fits. -> bytes freed."""
        entries = sorted(self._files(), key=lambda e: e[2])  # oldest first
        total, freed = sum(e[1] for e in entries), 0
        for path, size, _ in entries:
            if total <= self.cap:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total, freed = total - size, freed + size
        return freed

    def _files(self) -> list[tuple[Path, int, float]]:
        if not self.folder.is_dir():
            return []
        out = []
        for p in self.folder.glob(f"*{snapshot.SUFFIX}"):
            try:
                st = p.stat()
            except OSError:  # removed meanwhile
                continue
            out.append((p, st.st_size, st.st_mtime))
        return out

    def entries(self) -> list[Entry]:
        """Every entry, most recently used first; an unreadable one with its reason as `spec`."""
        out = []
        for p, size, used in self._files():
            try:
                meta = snapshot.header(p)
            except snapshot.SnapshotError as e:
                meta = {"spec": f"unreadable: {e}"}
            out.append(Entry(p, size, used, meta))
        return sorted(out, key=lambda e: e.used, reverse=True)

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and temporary files a crash left). -> (files, bytes)."""
        n = size = 0
        if not self.folder.is_dir():
            return 0, 0
        for p in list(self.folder.glob(f"*{snapshot.SUFFIX}")) + list(self.folder.glob(".*.tmp")):
            try:
                size += p.stat().st_size
                p.unlink()
                n += 1
            except OSError:
                pass
        return n, size


def read_document(cache: DocCache | None, reader, path, target: str, spec: str, save, progress=None,
                  stop=None) -> tuple[int, bool, str]:
    """Make `reader` (a Reader) hold `target`, the conversation with the document at `path`
    read: restored from `cache` where that file was read before under `spec` into the same
    conversation start, else read, then kept there (`save(path, extra) -> bytes`: the
    runtime's `save_cache`). A read stopped part way before is resumed where it stopped, and
    one stopped now keeps what it read (partial.py).
    -> (the document's tokens, restored, one line about the cache or "")."""
    if cache is None:
        return reader.sync(target, progress, stop)[1], False, ""
    sha = file_hash(path)
    key = cache.key(snapshot.identity(reader.adapter), spec, sha, target)
    found = cache.find(key)
    snap, why = reader.open(found) if found is not None else (None, "")
    notes = [f"document cache: {why}; read it again"] if why else []
    keeper = partial.Keeper(cache, key, Path(path).name, sha)
    if snap is not None:
        reader.sync(target, progress, stop)
        keeper.drop()
        return int(snap.extra.get("doc_tokens", 0)), True, "; ".join(notes)
    resumed, why = partial.resume(keeper, reader, target, reader.tokens, progress, stop)
    notes += [why] if why else []
    if resumed is not None:
        n_new = resumed[1]
        notes.append(f"resumed at {resumed[2]:,} of {n_new:,} tokens, where the last read of it stopped")
    else:
        n_new = reader.sync(target, progress, stop, keeper)[1]
    if n_new:
        extra = {"name": Path(path).name, "doc_tokens": n_new, "file_sha256": sha}
        notes.append(cache.put(key, lambda p: save(p, extra), reader.cache))
    keeper.drop()
    return n_new, False, "; ".join(n for n in notes if n)


def describe(entry: Entry, now: float | None = None) -> str:
    """One line for `main.py cache list`."""
    age = (now or time.time()) - entry.used
    when = f"{age / 86400:.0f} d" if age >= 86400 else f"{age / 3600:.0f} h" if age >= 3600 else f"{age / 60:.0f} min"
    tokens = entry.meta.get("tokens", "?")
    tokens = f"{int(tokens):,}" if tokens.isdigit() else tokens
    part = json.loads(entry.meta.get("extra", "{}")).get("partial")
    if part:  # the cache holds the conversation before it too
        tokens = f"part: {part.get('done', 0):,}/{part.get('tokens', 0):,}"
    return (f"{entry.document[:32]:<32} {tokens:>9} tok {entry.bytes / 2**20:>9.1f} MiB  used {when:>6} ago  "
            f"{entry.meta.get('spec', '?')}  {entry.meta.get('model_id', '?')}")
