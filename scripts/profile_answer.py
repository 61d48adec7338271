"""Where an answer's time goes on a long document: read `bench scale`'s document of N tokens
under auto's long-document stack once (kept in a document cache folder, so later runs
restore it in seconds), then ask the pass key and one needle under cProfile.

    .venv/bin/python scripts/profile_answer.py 262144 [--threads 1] [--cache DIR] [--code DIR]

--code DIR runs another checkout's code against the same cache (an A/B of two commits:
`git worktree add /tmp/old <commit>`). Prints each answer's time to first token, decode
tok/s and whole turn, and the functions that took the most time in it.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokens", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="/tmp/vramchat-profile", help="document cache folder (reused)")
    p.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout whose code runs")
    p.add_argument("--spec", default="locret+offload:terms=on,rank=off,kbits=8,vbits=4")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    sys.path.insert(0, args.code)
    import torch
    torch.set_num_threads(args.threads)
    from app.bench import scale
    from app.bench.locret import QUESTION
    from app.runtime.doc_cache import DocCache
    from app.runtime.engine import Runtime

    rt = Runtime.load(None)
    rt.doc_cache = DocCache(Path(args.cache) / "documents", 64 * 2**30)
    rt.set_policy(args.spec, reprefill=True)
    doc = Path(args.cache) / f"doc-{args.tokens}.txt"
    if not doc.exists():
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(scale.document(rt, args.tokens, 0)[0])
    t0 = time.perf_counter()
    info = rt.load_document(str(doc))
    print(f"document: {info.tokens:,} tokens in {time.perf_counter() - t0:.1f} s (code: {args.code})")
    for q in (QUESTION, scale.NEEDLES[0][1] + " Answer with the value only."):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        res = rt.ask(q, max_new_tokens=24)
        prof.disable()
        print(f"\n{res.answer.strip()!r}: first token {res.ttft_s:.2f} s, decode {res.decode_tok_s:.2f} tok/s, "
              f"turn {time.perf_counter() - t0:.2f} s")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
