"""Locret measurements: pass key retrieval far past the model's window in a fixed budget,
against a StreamingLLM-like scorer (4 sinks + the newest tokens), random heads and an
oracle (the needle's tokens kept, then recency: the bound the scorer could reach), with
the same budget, documents and chunking; prefill speed and peak KV bytes.

The haystack is `data/haystack/licenses.txt` (never used in training) and the needle's
wording ("pass key") appears in no training template of `app/heads/data.py`.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

from policies.locret import RetainingHeads, model_key, save_heads

from .common import greedy

HAYSTACK = Path(__file__).resolve().parents[2] / "data" / "haystack" / "licenses.txt"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
_HAY: dict = {}


def find_all(seq: list, sub: list) -> list[int]:
    """Every index where the token list `sub` starts in `seq`."""
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def _hay_ids(tok, n):
    if id(tok) not in _HAY:
        _HAY[id(tok)] = tok(HAYSTACK.read_text(), add_special_tokens=False)["input_ids"]
    ids = _HAY[id(tok)]
    return (ids * (n // len(ids) + 1))[:n]


def passkey_prompt(rt, n_tokens: int, depth: float, seed: int):
    """-> (ids of a chat prompt ~n_tokens long with the needle at `depth`, the key)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    marker = "@@HAYSTACK@@"
    text = rt.tok.apply_chat_template([{"role": "user", "content": marker + "\n\n" + QUESTION}],
                                      tokenize=False, add_generation_prompt=True)
    pre, post = text.split(marker)
    enc = lambda s: rt.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pre_ids, post_ids, needle = enc(pre), enc(post), enc(" " + NEEDLE.format(key=key) + " ")
    hay = _hay_ids(rt.tok, max(16, n_tokens - len(pre_ids) - len(post_ids) - len(needle)))
    at = int(len(hay) * depth)
    return pre_ids + hay[:at] + needle + hay[at:] + post_ids, key


def _streaming(layer_sel, sinks=4):
    """Replace a selector's scorer: sinks first, then recency (StreamingLLM's keep set)."""
    def score(cache, chunk, k, v):
        idx = torch.arange(cache.seen, cache.seen + k.shape[1], device=k.device, dtype=torch.float32)
        s = torch.where(idx < sinks, torch.full_like(idx, 1e9), idx)
        return s.expand(k.shape[0], -1).contiguous()
    layer_sel.score = score


def _oracle(layer_sel, keep: set[int]):
    """Replace a selector's scorer: the needle's tokens first, then recency. Not a policy:
    the upper bound that tells the positions/eviction machinery from the scorer."""
    def score(cache, chunk, k, v):
        idx = torch.arange(cache.seen, cache.seen + k.shape[1], device=k.device, dtype=torch.float32)
        hit = torch.tensor([t in keep for t in range(cache.seen, cache.seen + k.shape[1])], device=k.device)
        return torch.where(hit, torch.full_like(idx, 1e9), idx).expand(k.shape[0], -1).contiguous()
    layer_sel.score = score


def _random_heads(info, folder):
    torch.manual_seed(1234)
    heads = RetainingHeads(info.n_layers, info.hidden_size, 128, info.n_kv_heads)
    f = Path(folder) / "random.safetensors"
    save_heads(heads, f, model_key(info), ["random"])
    return f


def trial(rt, spec: str, n_tokens: int, depth: float, seed: int, scorer: str = "heads", max_new: int = 10):
    """One pass-key trial on a fresh cache -> dict(correct, answer, prefill_tok_s, kv_peak_bytes)."""
    r = rt
    r.reset_cache(spec)  # a fresh cache on the same model (no second adapter and hooks)
    ids, key = passkey_prompt(r, n_tokens, depth, seed)
    if scorer == "streaming":
        for layer in r.cache.layers:
            _streaming(layer.selector)
    elif scorer == "oracle":
        needle = r.tok(" " + NEEDLE.format(key=key) + " ", add_special_tokens=False)["input_ids"]
        at = find_all(ids, needle)[0]
        for layer in r.cache.layers:
            _oracle(layer.selector, set(range(at, at + len(needle))))
    t0 = time.perf_counter()
    logits = r.prefill(ids)
    dt = time.perf_counter() - t0
    answer = greedy(r, logits, max_new)
    return {"correct": key in answer, "answer": answer, "tokens": len(ids),
            "prefill_tok_s": len(ids) / dt, "kv_peak_bytes": r.cache.peak_bytes}


def run(rt=None, lengths=(16384,), trials: int = 10, budget: int = 1024, scorers=("heads", "streaming", "random"),
        baseline_trials: int | None = None, threads: int = 2, chunk: int = 512, seed: int = 0,
        progress=None, heads: str = "") -> list[dict]:
    """Rows, one per (scorer, length): accuracy over depths 0.1..0.9, prefill tok/s, KV peak."""
    torch.set_num_threads(threads)
    if rt is None:
        from app.runtime.engine import Runtime
        rt = Runtime.load(None, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scorer in scorers:
            # streaming/oracle replace the scorer: any heads file will do, random ones are scored as such
            use = heads if scorer == "heads" else _random_heads(rt.adapter.info, tmp)
            spec = f"locret:budget={budget},chunk={chunk}" + (f",heads={use}" if use else "")
            n_trials = trials if scorer == "heads" or baseline_trials is None else baseline_trials
            for n in lengths:
                depths = [0.1 + 0.8 * i / max(1, n_trials - 1) for i in range(n_trials)]
                res = [trial(rt, spec, n, d, seed=1000 * i + n + seed, scorer=scorer) for i, d in enumerate(depths)]
                row = {"scorer": scorer, "policy": spec, "length": n, "trials": n_trials,
                       "correct": sum(r["correct"] for r in res),
                       "accuracy": sum(r["correct"] for r in res) / n_trials,
                       "prefill_tok_s": round(sum(r["prefill_tok_s"] for r in res) / n_trials, 1),
                       "kv_peak_bytes": max(r["kv_peak_bytes"] for r in res), "threads": threads,
                       "seed": seed, "answers": [r["answer"] for r in res]}
                rows.append(row)
                if progress:
                    progress(row)
    return rows
