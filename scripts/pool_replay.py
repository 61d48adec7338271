"""Replay `locret`'s selection offline, to try pooling windows in seconds instead of hours.

    .venv/bin/python scripts/pool_replay.py capture --out scores.pt [--seeds 0,...,7] [--passkey 16384,32768] [--trials 5]
    .venv/bin/python scripts/pool_replay.py replay scores.pt [--pools 9,17,9:2,13:2]

`capture` reads part `dense`'s multikey documents (12,288 tokens, seed s = the bench's trial s)
and the pass-key prompts of `bench quality --parts kvbits` (same depths and seeds) under
`locret:budget=1024` (pool=9), and saves per prompt the tokens, every chunk's raw shared score
(the mean over all layers' heads, before pooling), the chunk lengths, where the values sit
and what the live cache held at the end (`torch.save`; read back with weights_only=True).

`replay` runs the chunked eviction again on those scores with other pooling options (`P`:
`pool=P`; `P:B`: `pool=P,back=B`), through the policy's own `max_pool` and `LocretSelector.pick`, and
counts per option: the facts whose name, "is" and digits are all held ("named", the tokens from the
one after " of" to the digits' end), the facts whose digits are held, and the pass keys whose
digits are held. It first checks that replaying the captured `pool=9` gives back exactly the
live cache's tokens. The scores of a prefill depend a little on what was kept before (the
hidden states read the kept cache), so a replayed option is an estimate of its live run
(BENCHMARKS.md: `pool=17` replayed from `pool=9`'s scores held the same facts as a live run
in 7 of 8 documents). An experiment, not a policy.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.bench import dense  # noqa: E402
from app.bench.kvbits import depths  # noqa: E402
from app.bench.locret import NEEDLE, find_all, passkey_prompt  # noqa: E402
from policies.evict import cap_and_fixed, max_pool  # noqa: E402
from policies.locret import LocretSelector  # noqa: E402

BUDGET, STABILIZERS = 1024, 256  # locret's defaults
SPEC = f"locret:budget={BUDGET},stabilizers={STABILIZERS}"


def replay(rec: dict, pool: int, back: int | None = None, budget: int = BUDGET,
           stabilizers: int = STABILIZERS) -> set[int]:
    """The positions a `locret:pool=P,back=B` cache (share=on) holds after the prefill: the
    recorded chunks pooled by `max_pool` and picked by `LocretSelector.pick` itself."""
    pick = SimpleNamespace(stabilizers=stabilizers)
    pos, kept, a = torch.empty(0, dtype=torch.long), torch.empty(0), 0
    for i, n in enumerate(rec["chunks"]):
        cap, fixed = cap_and_fixed(budget, SimpleNamespace(n=n, final=i == len(rec["chunks"]) - 1))
        pos = torch.cat((pos, torch.arange(a, a + n)))
        kept = torch.cat((kept, max_pool(rec["raw"][None, a:a + n].float(), pool, back)[0]))
        if pos.numel() > cap:
            cache = SimpleNamespace(length=pos.numel(), scores=kept[None], positions=lambda: pos[None])
            idx = LocretSelector.pick(pick, cache, None, cap, fixed)[0]
            pos, kept = pos[idx], kept[idx]
        a += n
    return set(pos.tolist())


@contextlib.contextmanager
def recording(rt):
    """While on, every prefill chunk's tokens and raw shared scores are recorded:
    yields (start(), stop(kind, spans, **extra) -> the prompt's record)."""
    state = {"raw": [], "ids": [], "on": False}
    combine, score = LocretSelector.combine, LocretSelector.score

    def combine_(self, scores):
        if state["on"]:
            state["raw"].append(scores.mean((0, 1)).float().clone())
        return combine(self, scores)

    def score_(self, cache, chunk, k, v):
        if state["on"] and self.layer == 0:
            state["ids"].append(chunk.input_ids.reshape(-1).tolist())
        return score(self, cache, chunk, k, v)

    def start():
        state.update(raw=[], ids=[], on=True)

    def stop(kind, spans, **extra) -> dict:
        state["on"] = False
        return dict(kind=kind, ids=sum(state["ids"], []), raw=torch.cat(state["raw"]),
                    chunks=[len(c) for c in state["ids"]], spans=spans,
                    held=rt.cache.layers[0].positions()[0].tolist(), **extra)

    LocretSelector.combine, LocretSelector.score = combine_, score_
    try:
        yield start, stop
    finally:
        LocretSelector.combine, LocretSelector.score = combine, score


def capture(rt, seeds: list[int], lengths: list[int], trials: int) -> list[dict]:
    enc = lambda s: rt.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    with recording(rt) as (start, stop):
        text = dense.HAYSTACK.read_text()
        for seed in seeds:
            doc = dense.build(rt.tok, text, 12288, "multikey", seed)
            rt.clear()
            rt.set_policy(SPEC, reprefill=True)
            start()
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "changelog.txt"
                path.write_text(doc.text)
                rt.load_document(str(path))
            rec = stop("dense", [], seed=seed)
            rec["spans"] = [(j, j + len(enc(f.value))) for f in doc.facts for j in find_all(rec["ids"], enc(f.value))]
            out.append(rec)
            print(f"dense seed {seed}: {len(rec['ids'])} tokens", flush=True)
        for n in lengths:
            for i, d in enumerate(depths(trials)):
                rt.reset_cache(SPEC)
                ids, key = passkey_prompt(rt, n, d, seed=100 * i + n)
                start()
                rt.prefill(ids)
                needle = enc(" " + NEEDLE.format(key=key) + " ")
                at = find_all(ids, needle)[0]
                spans = [(at + j, at + j + len(enc(key))) for j in find_all(needle, enc(key))]
                out.append(stop("passkey", spans, length=n, depth=d))
                print(f"pass key {n} depth {d:.2f}", flush=True)
    return out


def count(recs: list[dict], held: list[set[int]], of_id: int) -> dict:
    """-> named / digits held over the dense facts, pass keys with their digits held."""
    named = digits = keys = 0
    for rec, h in zip(recs, held):
        whole = [all(p in h for p in range(j, e)) for j, e in rec["spans"]]
        if rec["kind"] == "passkey":
            keys += any(whole)
            continue
        digits += sum(whole)
        for j, e in rec["spans"]:
            start = max((p for p in range(max(0, j - 10), j) if rec["ids"][p] == of_id), default=j - 1) + 1
            named += all(p in h for p in range(start, e))
    n_facts = sum(len(r["spans"]) for r in recs if r["kind"] == "dense")
    n_keys = sum(r["kind"] == "passkey" for r in recs)
    return {"named": f"{named}/{n_facts}", "digits": f"{digits}/{n_facts}", "pass keys": f"{keys}/{n_keys}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--out", required=True)
    c.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    c.add_argument("--passkey", default="16384,32768")
    c.add_argument("--trials", type=int, default=5)
    c.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("replay")
    r.add_argument("scores")
    r.add_argument("--pools", default="9,13,17,9:2,13:2")
    a = p.parse_args()
    from app.runtime.engine import Runtime
    if a.cmd == "capture":
        torch.set_num_threads(a.threads)
        rt = Runtime.load()
        seeds = [int(s) for s in a.seeds.split(",") if s]
        lengths = [int(n) for n in a.passkey.split(",") if n]
        torch.save(capture(rt, seeds, lengths, a.trials), a.out)
        print(f"wrote {a.out}")
        return
    recs = torch.load(a.scores, weights_only=True)
    live = [replay(rec, 9) == set(rec["held"]) for rec in recs]
    if not all(live):
        sys.exit(f"replay: the captured pool=9 does not give back the live cache in {live.count(False)} "
                 "prompts; the capture and this replay disagree on locret's selection")
    of_id = Runtime.load().tok(" of", add_special_tokens=False)["input_ids"][0]
    for opt in a.pools.split(","):
        pool, _, back = opt.partition(":")
        got = count(recs, [replay(rec, int(pool), int(back) if back else None) for rec in recs], of_id)
        name = f"pool={pool}" + (f",back={back}" if back else "")
        print(f"{name:16s}  " + "  ".join(f"{k} {v}" for k, v in got.items()), flush=True)


if __name__ == "__main__":
    main()
