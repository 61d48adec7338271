"""`bench ruler`: RULER's synthetic long-context tasks as lm-eval ships them, run by lm-eval's
stock `local-chat-completions` client against `serve` (HTTP on loopback, one server per policy
spec, the runtime of this process behind it).

The task definitions are lm-eval's, unmodified (the version is pinned in the `bench` extra).
Each generates its haystack with the model's own tokenizer to the target length, so no data
is downloaded; the tasks whose haystack is Paul Graham's essays (`niah_single_2/3`,
`niah_multikey_1`, `niah_multivalue`, `niah_multiquery`) fetch them from the Hugging Face hub
and run only where it is reachable or cached. A cell past the model's native window under a
policy that keeps every position is run like any other and marked `past window`: it shows
what that policy does there, not a fair score.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from .common import Bar, plot, table, write_json

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")
DEFAULT_POLICIES = ("full", "auto", "locret", "locret+kivi")
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)
TIMEOUT_S = 3 * 3600  # one request: a 32K read on a 2-core CPU takes minutes


def check_tasks(tasks) -> None:
    """Refuse a name that is not a RULER task lm-eval ships (before the model loads)."""
    unknown = [t for t in tasks if t not in OFFLINE_TASKS + ESSAY_TASKS]
    if unknown:
        raise SystemExit(f"bench ruler: unknown task(s) {', '.join(unknown)}; RULER's tasks in lm-eval: "
                         f"{', '.join(OFFLINE_TASKS)} (generated here) and {', '.join(ESSAY_TASKS)} (need the "
                         "essays from the Hugging Face hub)")


def save_tokenizer(rt, folder: Path) -> Path:
    """lm-eval sizes every haystack with the model's tokenizer, loaded from a folder."""
    rt.tok.save_pretrained(folder)
    return folder


def score(rt, url: str, task: str, length: int, limit: int, tokenizer: Path) -> float:
    """One cell: lm-eval's stock client, the task at one length, `limit` samples. -> score in %."""
    import lm_eval
    res = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={"model": rt.model_id, "base_url": f"{url}/chat/completions", "tokenizer": str(tokenizer),
                    "timeout": TIMEOUT_S, "max_retries": 1, "num_concurrent": 1},
        tasks=[task], limit=limit, apply_chat_template=True, log_samples=False,
        metadata={"max_seq_lengths": [length], "tokenizer": str(tokenizer)}, verbosity="ERROR")
    value = res["results"][task][f"{length},none"]
    return 100.0 * value


def run(rt, policies=DEFAULT_POLICIES, lengths=DEFAULT_LENGTHS, tasks=DEFAULT_TASKS, limit: int = 5,
        out_dir=None) -> list[dict]:
    from app.server import Background, Serving
    check_tasks(tasks)
    for name in ("lm-eval", "lm_eval", "httpx", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    bar = Bar(len(policies) * len(lengths) * len(tasks), "bench ruler")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_tokenizer(rt, Path(tmp) / "tokenizer")
        for spec in policies:
            rt.clear()
            serving = Serving(rt, policy=spec, max_queue=1).start()
            with Background(serving) as url:
                for length in lengths:
                    for task in tasks:
                        t0 = time.perf_counter()
                        try:
                            cell = score(rt, url, task, length, limit, tokenizer)
                            error = None
                        except Exception as e:  # noqa: BLE001 -- one cell's failure is reported, the rest run
                            cell, error = None, f"{type(e).__name__}: {str(e)[:200]}"
                            print(f"\nbench ruler: {spec} {task} {length}: {error}", file=sys.stderr, flush=True)
                        past = bool(rt.window) and length > rt.window and not rt.cache.evicts
                        rows.append({"policy": spec, "task": task, "length": length, "limit": limit,
                                     "score": cell, "note": error or ("past window" if past else ""),
                                     "s_per_sample": (time.perf_counter() - t0) / limit})
                        bar.step(f"{spec} {task} {length}")
    print(table(rows, ["policy", "task", "length", "limit", "score", "s_per_sample", "note"]))
    print(table(summary(rows), ["policy", "length", "mean_score", "tasks"]))
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out, "ruler", rows, {"model": rt.model_id, "device": str(rt.device), "window": rt.window,
                                        "tasks": list(tasks), "client": "lm-eval local-chat-completions"})
        plot(out / "ruler.png", summary(rows), "length", "mean_score", "policy",
             f"RULER ({', '.join(tasks)}), {limit} samples per cell")
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean score over the tasks, per policy and length (cells that failed are left out and counted)."""
    out = []
    for key in dict.fromkeys((r["policy"], r["length"]) for r in rows):
        cells = [r for r in rows if (r["policy"], r["length"]) == key]
        done = [r["score"] for r in cells if r["score"] is not None]
        out.append({"policy": key[0], "length": key[1], "mean_score": sum(done) / len(done) if done else None,
                    "tasks": f"{len(done)}/{len(cells)}"})
    return out
