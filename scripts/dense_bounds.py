"""Bounds for `locret` on part `dense` (multikey): what a better query-agnostic scorer could reach.

    .venv/bin/python scripts/dense_bounds.py [--length 12288] [--seeds 0,1,2,3] [--budget 1024]
        [--modes heads,facts+heads,facts+recent]

The documents are the bench's (`app/bench/dense.py`, seed s = trial s). Each mode replaces the
scores the selector gives a prefill chunk's tokens, as `app/bench/locret.py`'s oracle does:

- `heads`: the retaining heads unchanged (the `locret` row of the bench);
- `facts+heads`: the heads' scores, and the six facts' statements (the value's digits and the
  8 tokens before them: "number of <name> is") above every other token;
- `facts+recent`: the statements first, then the newest tokens (no heads at all).

Per document it prints, for each fact, whether all its value digits are still held after the
document's prefill (layer 0; `share=on` keeps the same tokens in every layer), then the answers.
An experiment, not a policy: the oracle knows where the facts are.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.bench import dense  # noqa: E402
from app.bench.locret import find_all  # noqa: E402
from app.runtime.engine import Runtime  # noqa: E402

BEFORE = 8  # tokens before the digits that belong to the statement ("number of Lunsto is ")


def _override(sel, mode: str, state: dict) -> None:
    heads = sel.score

    def score(cache, chunk, k, v):
        a, n = cache.seen, chunk.n
        if chunk.phase == "prefill" and sel.layer == 0:  # every layer sees the same chunk
            state["ids"][a:a + n] = chunk.input_ids.tolist()
            lo = max(0, a - 64)  # a statement cut by the chunk's start
            for d in state["digits"]:
                for j in find_all(state["ids"][lo:a + n], d):
                    state["hits"].update(range(lo + j - BEFORE, lo + j + len(d) + 1))
        hit = torch.tensor([p in state["hits"] for p in range(a, a + n)], device=k.device)
        if mode == "heads":
            return heads(cache, chunk, k, v)
        if mode == "facts+heads":
            return heads(cache, chunk, k, v) + hit.float() * 1e6
        idx = torch.arange(a, a + n, device=k.device, dtype=torch.float32)
        return torch.where(hit, torch.full_like(idx, 1e9), idx).expand(k.shape[0], -1).contiguous()
    sel.score = score


def run(rt, mode: str, doc, budget: int) -> tuple[list[bool], list[str], int]:
    """-> (each fact's digits held after the document, answers, right answers)."""
    digits = [rt.tok(f.value, add_special_tokens=False)["input_ids"] for f in doc.facts]
    state = {"ids": [], "hits": set(), "digits": digits}
    rt.clear()
    rt.set_policy(f"locret:budget={budget}", reprefill=True)
    for layer in rt.cache.layers:
        _override(layer.selector, mode, state)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "changelog.txt"
        path.write_text(doc.text)
        rt.load_document(str(path))
    held = set(rt.cache.layers[0].positions()[0].tolist())
    kept = [all(p in held for j in find_all(state["ids"], d) for p in range(j, j + len(d))) for d in digits]
    answers = [rt.ask(t.question, max_new_tokens=t.max_new).answer.strip() for t in doc.turns]
    right = sum(dense.score(a, t) for a, t in zip(answers, doc.turns))
    rt.clear()
    return kept, answers, right


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=12288)
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--modes", default="heads,facts+heads,facts+recent")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rt = Runtime.load()
    text = dense.HAYSTACK.read_text()
    docs = [dense.build(rt.tok, text, a.length, "multikey", int(s)) for s in a.seeds.split(",")]
    for mode in a.modes.split(","):
        if mode not in ("heads", "facts+heads", "facts+recent"):
            p.error(f"--modes: unknown mode {mode!r}; choose from heads, facts+heads, facts+recent")
        total = 0
        for doc in docs:
            kept, answers, right = run(rt, mode, doc, a.budget)
            total += right
            print(f"{mode} seed {doc.seed}: digits held {sum(kept)}/{len(kept)}; answers {answers}", flush=True)
        print(f"{mode}: {total}/{2 * len(docs)}", flush=True)


if __name__ == "__main__":
    main()
