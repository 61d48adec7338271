"""`bench reopen`: reopening a saved conversation from its cache file against reading it
again (what `/open` did before cache files), per policy.

Per policy: a document of N tokens (the licence haystack, never used for training) is read
into an empty conversation and one question is answered -- the conversation a person
saves. Its cache file is written (`Runtime.save_cache`, timed), then the conversation is
reopened `trials` times from it (`Runtime.restore(..., cache_file=)`: the file read, its
digest checked, the cache rebuilt) and once without it (read again, chunk by chunk, as
before). Every reopened cache must give the live cache's next logits bit for bit (`exact`).
Reported: both times (reopen: the median), the speed-up, the file's bytes and the cache's
bytes in memory.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.runtime.decode import Decoder

from .common import Bar, table, write_json
from .serve import document

POLICIES = (("locret", 16384), ("locret+kivi", 16384), ("full", 8000))  # full: inside the 8K window
QUESTION = "Who may copy and distribute this licence, and on what condition?"


def _next(rt) -> torch.Tensor:
    """Logits of one decode step after what the cache holds (token 13): what it gives next."""
    with Decoder(rt.adapter, rt.cache) as dec:
        return dec.step(13).clone()


def one(rt, spec: str, n_tokens: int, trials: int, decode: int, folder: Path) -> dict:
    doc = folder / f"doc-{n_tokens}.txt"
    if not doc.exists():
        doc.write_text(document(rt, n_tokens))
    rt.clear()
    rt.set_system(None)
    rt.set_policy(spec)
    t0 = time.perf_counter()
    info = rt.load_document(str(doc))
    rt.ask(QUESTION, max_new_tokens=decode)
    first_s = time.perf_counter() - t0
    data, path = rt.to_json(), folder / "conversation.cache.safetensors"
    t0 = time.perf_counter()
    size = rt.save_cache(path)
    save_s = time.perf_counter() - t0
    kv = sum(rt.cache.bytes_by_tier().values())
    want = _next(rt)
    reopen, exact = [], True
    for _ in range(trials):
        t0 = time.perf_counter()
        how = rt.restore(data, cache_file=path)
        reopen.append(time.perf_counter() - t0)
        if not how.startswith("restored its cache"):
            raise SystemExit(f"bench reopen: `{spec}` did not restore its cache: {how}")
        exact = exact and torch.equal(_next(rt), want)
    t0 = time.perf_counter()
    rt.restore(data)
    reread_s = time.perf_counter() - t0
    med = statistics.median(reopen)
    return {"policy": spec, "doc_tokens": info.tokens, "context": rt.cache.seen, "first_read_s": first_s,
            "reread_s": reread_s, "reopen_s": med, "speedup": reread_s / med, "save_s": save_s,
            "file_mib": size / 2**20, "kv_mib": kv / 2**20, "exact": exact}


def run(rt, policies=None, lengths=None, trials: int = 3, decode: int = 16, out_dir: Path | None = None) -> list[dict]:
    """policies: specs (default: POLICIES, each at its length); lengths: document tokens, the
    i-th for the i-th policy (the last for the rest)."""
    specs = policies or [p for p, _ in POLICIES]
    plan = [(p, lengths[min(i, len(lengths) - 1)] if lengths else dict(POLICIES).get(p, 16384))
            for i, p in enumerate(specs)]
    folder = Path(tempfile.mkdtemp(prefix="vramchat-reopen-"))
    rows, bar = [], Bar(len(plan), "reopen")
    try:
        for spec, n in plan:
            rows.append(one(rt, spec, n, trials, decode, folder))
            bar.step(spec)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cols = ["policy", "doc_tokens", "context", "reread_s", "reopen_s", "speedup", "save_s", "file_mib", "kv_mib",
            "exact"]
    print(table(rows, cols))
    if out_dir is not None:
        write_json(Path(out_dir), "reopen", rows, {"model": rt.model_id, "device": str(rt.device),
                                                    "trials": trials, "decode": decode})
    return rows
