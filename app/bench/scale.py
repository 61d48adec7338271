"""`bench scale`: what reading costs as a document grows (16K, 64K, 256K tokens; 1M when
asked with --lengths), per policy.

Per (length, policy): a document of N tokens -- the licence haystack, repeated, with the
pass key at half depth and three needles (a city, a colour, a ship's name at 15, 35 and 85 %
depth; their values and the key picked by `--seed`) -- is read by `Runtime.load_document`,
the app's own path (chunk by chunk, the cache's state published after each), then the pass
key is asked for, then each needle in turn.
Reported per row:
- prefill tok/s over the whole read, and the median time of a chunk at the start of the
  read (chunks 2-11: the budget is full from there) and at its end (the last 10 before the
  final chunk): `end/start` near 1 means nothing per chunk grows with the document; and the
  median of each tenth of the read between them (`chunk_ms_tenths`, plotted per row in
  `scale_read.png`): a cost that grows climbs through the tenths, a blip beside the bench
  (another process for a minute) sits in one;
- RSS after the read (after glibc's malloc_trim: what the process holds), device KV (less
  `offload`'s recall buffer, shown apart: its allocated part beside plan's full one) and
  host KV (`bytes_by_tier`) beside what `main.py plan` estimates for the same read;
- the first answer: the seconds its recall took (every layer's `OffloadSpill._recall`
  while it was asked), its time to first token, decode tok/s, the whole turn's seconds
  (`answer_s`: with its sources found), and whether it gave the pass key; then how
  many of the three needles were answered (`needles`).
"""
from __future__ import annotations

import contextlib
import gc
import random
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from .common import Bar, plot, table, write_json
from .locret import HAYSTACK, NEEDLE, QUESTION

STACK = "locret+offload:terms=on,rank=off"  # auto's stack past the window on the default model
POLICIES = ("locret", "locret+kivi", STACK, STACK + ",kbits=8,vbits=4")
LENGTHS = (16384, 65536, 262144)
EDGE = 10  # chunks in the start / end medians
PARTS = 10  # the read's chunks in tenths, a median each


# three needles besides the pass key: (statement, question, values the seed picks from, depth)
NEEDLES = (("The secret city is {x}.", "What is the secret city?", ("Tbilisi", "Valparaiso", "Trondheim", "Mandalay"),
            0.15),
           ("The colour of the door is {x}.", "What is the colour of the door?",
            ("turquoise", "crimson", "saffron", "indigo"), 0.35),
           ("The name of the ship is {x}.", "What is the name of the ship?", ("Albatross", "Meridian", "Kestrel",
                                                                                "Halcyon"), 0.85))


def document(rt, n_tokens: int, seed: int = 0) -> tuple[str, str, list]:
    """-> (~n_tokens of the haystack repeated, ending at a line break, with the pass key at
    half depth and the three NEEDLES at theirs (each at a paragraph break); the key;
    [(question, answer)] of the needles)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    facts = [(0.5, NEEDLE.format(key=key), None)]
    for stmt, q, values, depth in NEEDLES:
        x = rng.choice(values)
        facts.append((depth, stmt.format(x=x), (q, x)))
    room = n_tokens - sum(len(rt.tokens("\n\n" + f[1])) for f in facts)  # the haystack's share
    hay = HAYSTACK.read_text()
    per = len(rt.tokens(hay))
    body = "\n\n".join([hay] * (room // per + 1))
    ids = rt.tokens(body)[:room]
    body = rt.tok.decode(ids)
    end = body.rfind("\n")
    body = body[:end] if end > len(body) // 2 else body
    for depth, stmt, _ in sorted(facts, key=lambda f: -f[0]):  # deepest first: earlier cuts stay where they were
        at = body.rfind("\n\n", 0, int(len(body) * depth))
        at = at if at > 0 else int(len(body) * depth)
        body = body[:at] + "\n\n" + stmt + body[at:]
    return body, key, [f[2] for f in facts if f[2] is not None]


@contextlib.contextmanager
def timed_recalls():
    """Seconds spent in `OffloadSpill._recall` (every layer's) while inside: -> [seconds]."""
    from offload.spill import OffloadSpill
    spent, real = [0.0], OffloadSpill._recall

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t0
    OffloadSpill._recall = timed
    try:
        yield spent
    finally:
        OffloadSpill._recall = real


def rss() -> int:
    """Resident bytes after glibc returns its free heap (soak.py does the same)."""
    gc.collect()
    from .soak import _LIBC
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return psutil.Process().memory_info().rss


def _planned(rt, n: int) -> dict:
    """`main.py plan`'s KV after reading n tokens under the runtime's policy (no answer; the
    estimate that replays the cache's own rule, as `plan` prints it), the device's apart from
    `offload`'s recall buffer, which plan counts at its full size (`recall` tokens in every
    layer: `plan_recall_mib`)."""
    from app.runtime import describe, estimate
    choice = rt.weights if rt.weights in describe.CHOICES else "fp32"
    e = estimate.estimate(describe.model_of(rt), rt.policy, n, rt.chunk_size, 0, choice, rt.device.type)
    info = rt.adapter.info  # NOTE: kv_bytes_per_token is one layer's
    buf = rt.cache.slots["spill"].opts["recall"] * info.kv_bytes_per_token() * info.n_layers \
        if "spill" in rt.cache.slots else 0
    return {"plan_device_mib": (e["kv_gpu_end"] - buf) / 2**20, "plan_recall_mib": buf / 2**20,
            "plan_host_mib": e["kv_host_end"] / 2**20}


def recall_buffer(cache) -> int:
    """Bytes of `offload`'s recall buffers (every layer's, as allocated now: quote following
    recalls spans while a repeated text is read, so part may be in use before a question)."""
    return sum(n for layer in cache.layers if layer.spill is not None
               for (tier, kind), n in layer.spill.nbytes().items() if tier == "gpu" and kind in ("keys", "values"))


def tenths(times: list[float], parts: int = PARTS) -> list[float]:
    """The median of each of `parts` consecutive runs of `times`, their lengths at most one
    apart; fewer times than parts: each time its own run."""
    n = len(times)
    cuts = [i * n // parts for i in range(parts + 1)] if n >= parts else list(range(n + 1))
    return [statistics.median(times[a:b]) for a, b in zip(cuts, cuts[1:])]


def one(rt, spec: str, path: Path, key: str, decode: int, needles=()) -> dict:
    rt.clear()
    rt.set_system(None)
    rt.set_policy(spec, reprefill=True)  # an empty conversation: just a fresh cache
    stamps = []
    t0 = time.perf_counter()
    info = rt.load_document(str(path), progress=lambda done, total: stamps.append((time.perf_counter(), done)))
    read_s = time.perf_counter() - t0
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])][:-1]  # (s, tokens); the final apart
    start = [s for s, _ in steps[2:2 + EDGE]]
    end = [s for s, _ in steps[-EDGE:]]
    tiers, buf = rt.cache.bytes_by_tier(), recall_buffer(rt.cache)
    row = {"policy": spec, "tokens": info.tokens, "chunks": len(stamps), "prefill_tok_s": info.tokens / read_s,
           "chunk_start_ms": 1e3 * statistics.median(start) if start else None,
           "chunk_end_ms": 1e3 * statistics.median(end) if end else None,
           "chunk_ms_tenths": [1e3 * t for t in tenths([s for s, _ in steps[2:]])],
           "rss_mib": rss() / 2**20, "device_kv_mib": (tiers["gpu"] - buf) / 2**20,
           "recall_mib": buf / 2**20, "host_kv_mib": tiers["host"] / 2**20,
           **_planned(rt, rt.cache.seen)}
    if row["chunk_start_ms"]:
        row["end_over_start"] = row["chunk_end_ms"] / row["chunk_start_ms"]
    with timed_recalls() as spent:
        t0 = time.perf_counter()
        res = rt.ask(QUESTION, max_new_tokens=decode)
        answer_s = time.perf_counter() - t0  # the whole turn: read the question, decode, find the sources
    after = rt.cache.bytes_by_tier()
    row.update(recall_s=spent[0], ttft_s=res.ttft_s, decode_tok_s=res.decode_tok_s, answer_s=answer_s,
               answer=res.answer.strip(),
               correct=key in res.answer, device_kv_answered_mib=after["gpu"] / 2**20,
               host_kv_answered_mib=after["host"] / 2**20)
    got = []
    for q, x in needles:  # asked in turn after the pass key, each on the conversation so far
        a = rt.ask(q + " Answer with the value only.", max_new_tokens=decode).answer.strip()
        got.append({"question": q, "want": x, "answer": a, "correct": x.lower() in a.lower()})
    if needles:
        row.update(needles=f"{sum(g['correct'] for g in got)}/{len(got)}", needle_answers=got)
    return row


def run(rt, policies=None, lengths=None, decode: int = 12, out_dir: Path | None = None, seed: int = 0) -> list[dict]:
    """A row per (length, policy); `seed` picks the document's pass key and needle values (a
    trial: run again with other seeds for more)."""
    policies, lengths = policies or POLICIES, lengths or LENGTHS
    rows, bar = [], Bar(len(policies) * len(lengths), "scale")
    cols = ["policy", "tokens", "prefill_tok_s", "chunk_start_ms", "chunk_end_ms", "end_over_start", "rss_mib",
            "device_kv_mib", "plan_device_mib", "recall_mib", "plan_recall_mib", "host_kv_mib", "plan_host_mib", "recall_s", "ttft_s",
            "decode_tok_s", "answer_s", "correct", "needles"]
    extra = {"model": rt.model_id, "device": str(rt.device), "chunk": rt.chunk_size, "decode": decode}
    with tempfile.TemporaryDirectory(prefix="vramchat-scale-") as tmp:
        for n in lengths:
            path = Path(tmp) / f"doc-{n}.txt"
            text, key, needles = document(rt, n, seed)
            path.write_text(text)
            del text
            for spec in policies:
                rows.append(one(rt, spec, path, key, decode, needles) | {"seed": seed})
                bar.step(f"{n:,} {spec}")
                print(table(rows[-1:], cols).splitlines()[-1], flush=True)
                if out_dir is not None:  # row by row: an hour-long run keeps what it measured
                    write_json(Path(out_dir), "scale", rows, extra)
            rt.clear()
    print(table(rows, cols))
    if out_dir is not None:
        out = Path(out_dir)
        plot(out / "scale_prefill.png", rows, "tokens", "prefill_tok_s", "policy", "prefill tok/s as documents grow", zero=True)
        plot(out / "scale_chunk.png", rows, "tokens", "chunk_end_ms", "policy", "ms per chunk at the end of the read", zero=True)
        through = [{"read": f"{r['policy']} {r['tokens']:,}", "tenth": i + 1, "ms": ms}
                   for r in rows for i, ms in enumerate(r["chunk_ms_tenths"])]
        plot(out / "scale_read.png", through, "tenth", "ms", "read", "ms per chunk through the read (median of each tenth)",
             zero=True)
    return rows
