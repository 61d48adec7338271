"""`bench soak`: many turns against one long document under evicting policies.

One conversation per policy: a real-prose document (`data/haystack/licenses.txt`, the
benchmark haystack, cut to ~8K tokens) with a pass key inserted, read with
`Runtime.load_document`; turn 1 asks for the pass key, turns 2..N-1 ask short questions
about the document, turn N asks for the pass key again. After every turn: the cache's
bytes by tier, its length, the process RSS and (on CUDA) `torch.cuda.memory_allocated`.

The bound, turns 3..N against turn 2 (turn 1 is the one that read the document):
- the device K/V buffers (the store's keys and values or codes, scales and zeros, and
  offload's recall buffer) do not change at all: they grow in 256-token blocks and an
  evicting policy holds the same budget after every turn;
- held tokens after each turn are at most budget + that turn's question (up to `local`)
  + its answer, locret's definition (a policy without a budget may not grow at all); the
  per-token index and score (12 B per token, KV head and layer) follow that length, so
  device KV bytes move by a few KB with the question's length, not with the turn count;
- RSS (and CUDA allocated memory) grows at most by what the cache itself accounts for
  (offload's host tier and labels, which keep every evicted token by design; zero for
  the others) plus `RSS_SLACK`. RSS is read after `malloc_trim(0)` (glibc), so it counts
  what the process holds: glibc otherwise keeps freed heap, e.g. up to a whole host
  buffer that an offload growth step replaced, and that retention depends on the order
  of allocations, not on a leak (`rss_raw` is the value before the trim). 64 MiB is
  more than ten times the most trimmed RSS grew beyond the cache in 100 turns on the
  default model (5.5 MiB, `locret+offload`; BENCHMARKS.md, "Reliability") and half of
  what keeping one turn's K/V (~1.3 MB) every turn would add over 100 turns.
"""
from __future__ import annotations

import ctypes
import random
import tempfile
import time
from pathlib import Path

import psutil
import torch

from .common import Bar, plot, table, write_json
from .locret import HAYSTACK, NEEDLE, QUESTION

DEFAULT_POLICIES = ("locret", "locret+kivi", "locret+offload")
NEEDLE_Q = QUESTION  # the pass-key question of the locret bench, asked at turns 1 and N
QUESTIONS = (  # short questions about the licence text; cycled over turns 2..N-1
    "Which license is this document?", "Who publishes this license?", "What version is it?",
    "What does the preamble say?", "What is copyleft?", "What is the Corresponding Source?",
    "Can I charge a fee for copies?", "Is there a warranty?", "What is a User Product?",
    "What does the license say about patents?", "What happens if I violate the license?",
    "What is a covered work?", "Can I add terms to the license?", "What is Installation Information?",
    "May I convey object code?", "Who is the licensor?", "What does propagate mean here?",
    "Summarise section 2 in one line.", "Does it mention anti-circumvention law?",
    "What is an Appropriate Legal Notice?",
)
RSS_SLACK = 64 * 2**20
MiB = 2**20
try:
    _LIBC = ctypes.CDLL("libc.so.6")  # glibc: malloc_trim returns the free heap to the OS
except OSError:
    _LIBC = None


def write_document(rt, path: Path, n_tokens: int = 8192, depth: float = 0.9, seed: int = 0) -> str:
    """Write ~n_tokens of the haystack with the pass key at `depth` (at a paragraph break)
    to `path`. -> the key."""
    key = str(random.Random(seed).randint(10000, 99999))
    ids = rt.tokens(HAYSTACK.read_text())
    if n_tokens > len(ids):
        raise ValueError(f"soak document: {n_tokens:,} tokens asked, {HAYSTACK} has {len(ids):,}")
    body = rt.tok.decode(ids[:n_tokens])
    end = body.rfind("\n\n")
    body = body[:end] if end > len(body) // 2 else body  # end at a paragraph break
    at = body.rfind("\n\n", 0, int(len(body) * depth))
    at = at if at > 0 else int(len(body) * depth)
    path.write_text(body[:at] + "\n\n" + NEEDLE.format(key=key) + body[at:] + "\n")
    return key


def _sample(rt, proc) -> dict:
    """The memory a turn leaves behind: cache bytes by tier, length, RSS, CUDA allocated."""
    nb = rt.cache.nbytes()
    dev = {kind: n for (tier, kind), n in nb.items() if tier == "gpu"}
    labels = dev.pop("labels", 0)
    meta = dev.get("index", 0) + dev.get("scores", 0)  # exact-sized: they follow the held length
    host = sum(n for (tier, _), n in nb.items() if tier == "host")
    cuda = torch.cuda.memory_allocated(rt.device) if rt.device.type == "cuda" else None
    rss_raw = proc.memory_info().rss
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # NOTE: so RSS counts what the process holds, not free memory glibc keeps
    return {"length": rt.cache.length, "seen": rt.cache.seen, "kv_device": sum(dev.values()),
            "kv_buffers": sum(dev.values()) - meta, "kv_labels": labels, "kv_host": host,
            "kv_total": sum(dev.values()) + labels + host, "rss": proc.memory_info().rss, "rss_raw": rss_raw,
            "cuda_allocated": cuda}


def soak(rt, spec: str, doc: Path, key: str, turns: int = 100, max_new: int = 16, bar: Bar | None = None):
    """One conversation of `turns` turns about `doc` under `spec`. -> per-turn records."""
    rt.clear()
    rt.set_policy(spec, reprefill=True)  # an empty conversation: just a fresh cache
    rt.load_document(str(doc))
    proc = psutil.Process()
    sel = rt.cache.layers[0].selector
    budget, local = sel.budget, sel.local
    records = []
    for i in range(1, turns + 1):
        needle = i in (1, turns)
        q = NEEDLE_Q if needle else QUESTIONS[(i - 2) % len(QUESTIONS)]
        t0 = time.perf_counter()
        res = rt.ask(q, max_new_tokens=max_new)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        rec = {"policy": spec, "turn": i, "question": q, "answer": res.answer.strip(),
               "prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens,
               "turn_s": round(time.perf_counter() - t0, 3), **_sample(rt, proc),
               # NOTE: locret's definition: after a prefill a layer holds budget + its final chunk
               # (the question, up to `local` tokens), then the answer is appended
               "held_bound": None if budget is None else budget + min(res.prompt_tokens, local) + res.new_tokens}
        if needle:
            rec["correct"] = key in res.answer
        records.append(rec)
        if bar is not None:
            bar.step(f"turn {i}: {rec['length']} tok held, {spec}")
    return records


def summarize(records: list[dict], rss_slack: int = RSS_SLACK) -> dict:
    """Turn 2 against the max over turns 3..N, and whether that is within the bound."""
    if len(records) < 3:
        raise ValueError(f"soak: {len(records)} turns; the bound compares turn 2 with turns 3..N, so give at least 3")
    t2, later = records[1], records[2:]

    def growth(k):
        return max(r[k] for r in later) - t2[k]

    out = {"policy": records[0]["policy"], "turns": len(records), "read": records[-1]["seen"],
           "length_t2": t2["length"], "length_max": max(r["length"] for r in later)}
    for k in ("kv_device", "kv_buffers", "kv_labels", "kv_host", "kv_total", "rss"):
        out[f"{k}_t2"], out[f"{k}_growth"] = t2[k], growth(k)
        out[f"{k}_growth_pct"] = round(100 * growth(k) / t2[k], 2) if t2[k] else None
    # held tokens: within the policy's own bound every turn; without one (no budget), no growth
    out["held_over"] = max(r["length"] - (r["held_bound"] if r.get("held_bound") is not None else t2["length"])
                           for r in later)
    if t2.get("rss_raw") is not None:  # before malloc_trim: what glibc had not returned yet too
        out["rss_raw_growth"] = growth("rss_raw")
    accounted = max(0, out["kv_total_growth"])  # offload keeps every evicted token: host tier + labels
    out["rss_allowed"] = accounted + rss_slack
    ok = out["kv_buffers_growth"] <= 0 and out["held_over"] <= 0 and out["rss_growth"] <= out["rss_allowed"]
    if t2.get("cuda_allocated") is not None:
        out["cuda_t2"], out["cuda_growth"] = t2["cuda_allocated"], growth("cuda_allocated")
        # the card holds the device tier: its index/scores follow the held length, labels grow
        out["cuda_allowed"] = max(0, growth("kv_device")) + max(0, growth("kv_labels")) + rss_slack
        ok = ok and out["cuda_growth"] <= out["cuda_allowed"]
    out["within_bound"] = ok
    first, last = records[0], records[-1]
    out.update(first_answer=first["answer"], first_correct=first.get("correct"), last_answer=last["answer"],
               last_correct=last.get("correct"))
    out["needle_kept"] = bool(last.get("correct")) or not first.get("correct")  # as correct as the first
    return out


def _cell(text: str) -> str:
    """An answer as inline code in a table cell: `<` and `*` stay text, `|` does not end the cell."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`" if text else "(nothing)"


def report(rows: list[dict]) -> str:
    """The Markdown tables for stdout and BENCHMARKS.md: memory, then the pass-key answers."""
    mib = ("kv_device_t2", "kv_host_growth", "kv_labels_growth", "rss_t2", "rss_growth", "rss_allowed",
           "rss_raw_growth", "cuda_t2", "cuda_growth", "cuda_allowed")
    show = [{**r, **{f"{k}_MiB": round(r[k] / MiB, 2) for k in mib if k in r},
             **{k: _cell(r[k]) for k in ("first_answer", "last_answer") if k in r}} for r in rows]
    cols = ["policy", "read", "length_t2", "length_max", "held_over", "kv_device_t2_MiB", "kv_buffers_growth",
            "kv_device_growth", "kv_host_growth_MiB", "kv_labels_growth_MiB", "rss_t2_MiB", "rss_growth_MiB",
            "rss_allowed_MiB", "rss_raw_growth_MiB", "cuda_t2_MiB", "cuda_growth_MiB", "cuda_allowed_MiB",
            "within_bound", "first_correct", "last_correct", "wall_s", "error"]
    answers = [c for c in ("policy", "first_answer", "last_answer", "needle_kept") if any(c in r for r in show)]
    return table(show, [c for c in cols if any(c in r for r in show)]) + "\n\n" + table(show, answers)


def run(rt, policies=DEFAULT_POLICIES, turns: int = 100, max_new: int = 16, doc_tokens: int = 8192,
        depth: float = 0.9, rss_slack: int = RSS_SLACK, out_dir=None) -> list[dict]:
    """Per policy: a soak of `turns` turns. -> summary rows (per-turn records in soak.json)."""
    if turns < 3:
        raise SystemExit(f"bench soak --turns {turns}: the bound compares turn 2 with turns 3..N; give at least 3")
    rows, per_turn = [], []
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "soak-document.txt"
        key = write_document(rt, doc, doc_tokens, depth)
        doc_read = rt.tokens(doc.read_text())
        bar = Bar(len(policies) * turns, "bench soak")
        for spec in policies:
            t0 = time.perf_counter()
            try:
                recs = soak(rt, spec, doc, key, turns, max_new, bar)
            except Exception as e:  # one policy's failure (e.g. no heads for this model) is a result
                rows.append({"policy": spec, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                continue
            per_turn += recs
            rows.append({**summarize(recs, rss_slack), "wall_s": round(time.perf_counter() - t0, 1)})
    print(report(rows))
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir, "soak", rows, {"model": rt.model_id, "device": str(rt.device), "doc_tokens": len(doc_read),
                                           "needle_depth": depth, "max_new": max_new, "rss_slack": rss_slack,
                                           "per_turn": per_turn})
        kv = [{"turn": r["turn"], "MiB": r[k] / MiB, "series": f"{r['policy']} {name}"}
              for r in per_turn for k, name in (("kv_device", "device"), ("kv_host", "host"))
              if k == "kv_device" or r[k]]
        plot(out_dir / "soak_kv.png", kv, "turn", "MiB", "series", f"KV cache MiB per turn ({rt.model_id})")
        rss = [{"turn": r["turn"], "rss_MiB": r["rss"] / MiB, "policy": r["policy"]} for r in per_turn]
        plot(out_dir / "soak_rss.png", rss, "turn", "rss_MiB", "policy", f"process RSS per turn ({rt.model_id})")
    return rows
