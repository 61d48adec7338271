"""Cache files: a conversation's KV cache on disk, so reopening it skips re-reading it.

One safetensors file holds the cache's state (`policies.state`: every slot's tensors and
metadata, offload's host tier included), the text the cache encodes (the runtime's
rendering of the conversation) and its token ids. Its metadata names the format, the model
(id, shape key, dtype), the policy spec, the token count, a SHA-256 of the token ids and a
SHA-256 of every tensor. Written atomically (temporary file in the same folder, fsync,
os.replace), mode 0600.

Reading checks, in order: the file is there and whole (safetensors checks the header and
that the data covers every tensor), it is ours, it was made for this model and spec, its
tensors match their digest, its token log matches its hash, and the state fits a cache of
this spec. Whatever fails is a `SnapshotError` whose message is one line naming the file and
the reason; the caller then reads the conversation again -- a cache file is only ever a
shortcut.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from policies import state as cache_state
from policies.files import digest, model_key

from .files import atomic_write

from .held import Held

FORMAT = "vramchat-kv-1"
SUFFIX = ".cache.safetensors"


class SnapshotError(Exception):
    """A cache file that cannot be used; the message is one line: the file and why."""


@dataclass
class Snapshot:
    """A cache file read and checked, not yet applied (`build`)."""

    path: Path
    bytes: int  # on disk
    meta: dict  # the file's metadata (strings)
    tensors: dict
    held: Held

    @property
    def extra(self) -> dict:
        return json.loads(self.meta.get("extra", "{}"))

    def build(self, adapter):
        """-> a new KVCache on `adapter` holding the saved state."""
        cache = adapter.new_cache(self.meta["spec"])
        try:
            cache_state.restore(cache, cache_state.under(self.tensors, "cache"), json.loads(self.meta["state"]))
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise SnapshotError(f"{self.path.name}: its cache does not fit policy `{self.meta['spec']}` "
                                f"on this model ({first_line(e)})") from None
        return cache


def identity(adapter) -> dict:
    """The model a cache file must have been made with: its id, shape key, dtype and a
    fingerprint of its weights (another checkpoint of the same shape has other weights)."""
    info = adapter.info
    if "weights-fingerprint" not in info.resources:
        info.resources["weights-fingerprint"] = fingerprint(adapter.model)
    return {"model_id": info.model_id, "model_key": model_key(info), "dtype": str(info.dtype).replace("torch.", ""),
            "weights": info.resources["weights-fingerprint"]}


def fingerprint(model) -> str:
    """SHA-256 over every parameter's name, shape, dtype and first 256 values (hashing all of
    an 8B model's 16 GB would take seconds; checkpoints of one shape differ in every tensor)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.device.type != "meta":
                h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def ids_hash(ids) -> str:
    return hashlib.sha256(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def write(path, cache, held: Held, adapter, extra: dict | None = None) -> int:
    """Write `cache` and what it holds to `path` (atomic, 0600). -> bytes on disk."""
    if len(held.ids) != cache.seen:
        raise SnapshotError(f"{Path(path).name}: the cache holds {cache.seen:,} tokens but the conversation "
                            f"accounts for {len(held.ids):,}; not saved")
    from safetensors.torch import save_file
    t, meta = cache_state.state(cache)
    tensors = {f"cache.{k}": v.detach().to("cpu").contiguous() for k, v in t.items()}
    text = held.text.encode("utf-8")
    tensors["held.text"] = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else \
        torch.empty(0, dtype=torch.uint8)
    tensors["held.ids"] = torch.tensor(held.ids, dtype=torch.int64)
    md = {"format": FORMAT, **identity(adapter), "spec": cache.spec, "tokens": str(cache.seen),
          "tokens_sha256": ids_hash(held.ids), "sha256": digest(tensors), "state": json.dumps(meta),
          "held": json.dumps({"answer_start": held.answer_start, "marks": held.marks, "answer": held.answer}),
          "extra": json.dumps(extra or {})}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))
    return path.stat().st_size


def header(path) -> dict:
    """A cache file's metadata (no tensors read). Raises SnapshotError."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path.name}: no cache file was saved")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise SnapshotError(f"{path.name}: truncated or not a safetensors file ({first_line(e)})") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path.name}: not a vramchat cache file (format {meta.get('format')!r})")
    return meta


def _canonical(spec) -> str | None:
    """A spec's canonical form (a file written before it had one spells `terms=true`)."""
    from policies.registry import SpecError, canonical_spec
    try:
        return canonical_spec(spec)
    except SpecError:
        return None


def read(path, adapter, spec: str | None) -> Snapshot:
    """Read and check the cache file at `path` for a cache of `spec` (None: any, as `auto`
    takes) on `adapter`'s model. Raises SnapshotError (one line) for anything that cannot be used."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    meta = header(path)
    want = identity(adapter)
    for k, v in want.items():
        if meta.get(k) != v:
            other = "other weights" if k == "weights" else f"{meta.get('model_id')!r} ({meta.get('dtype')})"
            raise SnapshotError(f"{path.name}: made with {other}, not {want['model_id']!r} ({want['dtype']})")
    if spec is not None and _canonical(meta.get("spec")) != _canonical(spec):
        raise SnapshotError(f"{path.name}: made under policy `{meta.get('spec')}`, not `{spec}`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SnapshotError(f"{path.name}: unreadable ({first_line(e)})") from None
    if digest(tensors) != meta.get("sha256"):
        raise SnapshotError(f"{path.name}: checksum mismatch (the file changed after it was written)")
    try:
        ids = tensors["held.ids"].tolist()
        text = tensors["held.text"].numpy().tobytes().decode("utf-8")
        hm = json.loads(meta["held"])
        held = Held(text, hm["answer_start"], [tuple(m) for m in hm["marks"]], ids, hm.get("answer"))
        json.loads(meta["state"])
    except (KeyError, ValueError, TypeError) as e:
        raise SnapshotError(f"{path.name}: incomplete ({first_line(e)})") from None
    if ids_hash(ids) != meta.get("tokens_sha256") or str(len(ids)) != meta.get("tokens"):
        raise SnapshotError(f"{path.name}: its token log does not match its hash")
    return Snapshot(path, path.stat().st_size, meta, tensors, held)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
