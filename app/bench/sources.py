"""Parts `sources` and `sources-depths` of `bench quality`: is an answer's top source the
passage that holds the fact it asks?

Cases are the needle and multikey parts' own, each fact on a line of its own (so the fact's
passage is that line, `evidence.split_passages`):
- `needle`: the pass key sentence of `locret.NEEDLE` on its own line of the licence haystack,
  at depth `dense.ONE_DEPTHS[seed % 5]`, asked with `locret.QUESTION`;
- `multikey`: `dense.build(kind="multikey")`, six facts of one shape in Debian changelogs,
  two asked in turn.
Answers are scored by `dense.score` (the exact digits, no other fact's number). A document is
read as a chat reads it (`load_document`, then `ask` per turn) on a fresh conversation.

`sources` (per task and policy, and both tasks pooled): answer accuracy; the fact passage's
rank among the answer's sources (`evidence.TOP` of them: beyond that it has none); top-1 and
top-3 over all questions and over the correctly answered ones; and the four-way split by
answer right/wrong and top source right/wrong. Then the decode cost of the tracking: one
question answered alternately with `rt.sources` on and off on the same cache (same greedy
tokens), decode tok/s on/off per pair, the median ratio, and the seconds after decoding.

`sources-depths`: the same cases under `full` answered once with queries recorded at every
layer; each candidate set of evidence depths (`CANDIDATES`) ranks the passages from those
same queries, so every candidate is judged on identical answers. `evidence.DEPTHS` is the
one this part picks (BENCHMARKS.md).
"""
from __future__ import annotations

import random
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from app.runtime import evidence

from . import dense, locret

KINDS = ("needle", "multikey")
DEFAULT = (("full", 4096), ("auto", 12288), ("locret", 12288), ("locret+kivi", 12288))  # (spec, tokens)
TRIALS = 3  # documents per task and policy
CANDIDATES = ((0.62, 0.7, 0.8), (0.5, 0.65, 0.8), (0.6, 0.7, 0.8), (0.3, 0.5, 0.7), (0.7, 0.85, 0.95),
              (0.2, 0.35, 0.5), (0.62, 0.8), (0.2,), (0.35,), (0.5,), (0.6,), (0.62,), (0.65,), (0.7,), (0.8,),
              (0.9,), "every")
COST_QUESTION = "Copy out the first ten lines of the document, word for word."
COLUMNS = ["task", "policy", "length", "chosen", "questions", "correct", "top1", "top3", "top1_correct",
           "top3_correct", "right_right", "right_wrong", "wrong_right", "wrong_wrong", "fact_recalled", "sources_s",
           "skipped"]
DEPTH_COLUMNS = ["depths", "layers", "questions", "correct", "top1", "top3", "top1_correct", "top3_correct",
                 "median_rank"]
COST_COLUMNS = ["policy", "length", "pairs", "new_tokens", "same_answer", "tok_s_on", "tok_s_off", "ratio",
                "sources_s"]


def needle_doc(tok, n_tokens: int, seed: int) -> dense.Doc:
    """~n_tokens of the licence haystack from a line start the seed picks, with the pass key
    sentence on a line of its own."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    stmt = locret.NEEDLE.format(key=key)
    text = locret.HAYSTACK.read_text()
    starts = dense._hay(tok, text)[0]
    body = n_tokens - len(tok(stmt + "\n", add_special_tokens=False)["input_ids"])
    if not 16 <= body <= len(starts):
        raise ValueError(f"sources: a needle document of {n_tokens:,} tokens does not fit the haystack "
                         f"({locret.HAYSTACK.name}: {len(starts):,} tokens)")
    heads = [i for i in range(len(starts) - body + 1) if starts[i] == 0 or text[starts[i] - 1] == "\n"]
    s = rng.choice(heads)
    window = text[starts[s]:starts[s + body] if s + body < len(starts) else len(text)]
    depth = dense.ONE_DEPTHS[seed % len(dense.ONE_DEPTHS)]
    at = window.find("\n", int(len(window) * depth)) + 1 or len(window)
    fact = dense.Fact("pass key", key, depth, at, stmt)
    return dense.Doc("needle", seed, window[:at] + stmt + "\n" + window[at:], (fact,),
                     (dense.Turn(locret.QUESTION, (key,), max_new=12),), starts[s])


def build(tok, kind: str, n_tokens: int, seed: int) -> dense.Doc:
    if kind == "needle":
        return needle_doc(tok, n_tokens, seed)
    return dense.build(tok, dense.HAYSTACK.read_text(), n_tokens, kind, seed)


def fact_line(doc: dense.Doc, turn: dense.Turn) -> int:
    """The 1-based line of the fact `turn` asks (one fact per question in these tasks)."""
    fact = next(f for f in doc.facts if f.value in turn.want)
    return doc.text.count("\n", 0, fact.at) + 1


def _read(rt, spec: str, doc: dense.Doc) -> None:
    rt.clear()
    rt.set_policy(spec, reprefill=True)  # an empty conversation: a fresh cache (`auto`: chooses on the read)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{doc.kind}.txt"
        path.write_text(doc.text)
        rt.load_document(str(path))


def trial(rt, spec: str, doc: dense.Doc) -> list[dict]:
    """Read doc under `spec`, ask its turns in order. -> one record per question: answer,
    correct, the fact passage's rank among the sources (None: not among them), its tier."""
    _read(rt, spec, doc)
    out = []
    for t in doc.turns:
        res = rt.ask(t.question, max_new_tokens=t.max_new)
        line = fact_line(doc, t)
        rank = next((i + 1 for i, s in enumerate(res.sources) if s["line"] == line), None)
        out.append({"q": t.question, "want": list(t.want), "got": res.answer.strip(),
                    "correct": dense.score(res.answer, t), "fact_line": line, "rank": rank,
                    "tier": res.sources[rank - 1]["tier"] if rank else None,
                    "top": [(s["line"], s["weight"]) for s in res.sources], "note": res.sources_note,
                    "sources_s": round(res.sources_s, 3), "policy": rt.policy})
    rt.clear()
    return out


def summary(recs: list[dict]) -> dict:
    """Answer accuracy, attribution top-1 / top-3 over all and over correct answers, the split."""
    n, right = len(recs), [r for r in recs if r["correct"]]

    def share(rs, k):
        return round(sum(r["rank"] is not None and r["rank"] <= k for r in rs) / len(rs), 3) if rs else None
    top = lambda r: r["rank"] == 1  # noqa: E731
    return {"questions": n, "correct": f"{len(right)}/{n}", "accuracy": round(len(right) / max(n, 1), 3),
            "top1": share(recs, 1), "top3": share(recs, 3), "top1_correct": share(right, 1),
            "top3_correct": share(right, 3),
            "right_right": sum(r["correct"] and top(r) for r in recs),
            "right_wrong": sum(r["correct"] and not top(r) for r in recs),
            "wrong_right": sum(not r["correct"] and top(r) for r in recs),
            "wrong_wrong": sum(not r["correct"] and not top(r) for r in recs),
            "fact_recalled": sum(r["tier"] == "recalled" for r in recs),
            "sources_s": round(statistics.median(r["sources_s"] for r in recs), 3) if recs else None}


def cells(policies, lengths) -> list[tuple[str, int]]:
    """(spec, tokens) to run: the default pairs, or each given spec at each given length."""
    if not policies and not lengths:
        return list(DEFAULT)
    return [(p, n) for p in policies or dict.fromkeys(s for s, _ in DEFAULT) for n in lengths or (4096, 12288)]


def _why_not(rt, spec: str, n: int, known: dict) -> str:
    return "" if spec == "auto" else dense._why_not(rt, spec, n, known)


def run(rt, policies=None, lengths=None, trials: int = TRIALS, kinds=KINDS, progress=None, cost_pairs: int = 5,
        cost_new: int = 48, seed: int = 0) -> list[dict]:
    """Rows {kind: "sources", task, policy, length, ...} per task and (spec, length) and one
    pooled row per (spec, length) (task "all"); `skipped` where a spec cannot read the length;
    then the decode cost (`cost`, kind "sources-cost") under the first cell's spec and length
    (`cost_pairs` 0: none). Trial t of a task reads the document of seed `seed + t`."""
    rows, known, docs = [], {}, {}
    was = rt.sources
    rt.sources = True
    try:
        for spec, n in cells(policies, lengths):
            why = _why_not(rt, spec, n, known)
            pooled = []
            for kind in kinds:
                row = {"kind": "sources", "task": kind, "policy": spec, "length": n}
                if why:
                    rows.append(row | {"skipped": why})
                    continue
                recs = []
                for t in range(trials):
                    key = (kind, n, seed + t)
                    docs[key] = docs.get(key) or build(rt.tok, kind, n, seed + t)
                    recs += trial(rt, spec, docs[key])
                pooled += recs
                chosen = sorted({r["policy"] for r in recs})
                rows.append(row | {"chosen": ", ".join(chosen) if spec == "auto" else None} | summary(recs)
                            | {"answers": recs})
                if progress:
                    progress(rows[-1])
            if pooled and len(kinds) > 1:
                rows.append({"kind": "sources", "task": "all", "policy": spec, "length": n} | summary(pooled))
        if cost_pairs:
            spec, n = cells(policies, lengths)[0]
            rows.append(cost(rt, spec, n, cost_pairs, seed, cost_new))
            if progress:
                progress(rows[-1])
    finally:
        rt.sources = was
    return rows


def cost(rt, spec: str = "full", n_tokens: int = 4096, pairs: int = 5, seed: int = 0, max_new: int = 48) -> dict:
    """The decode cost of finding sources: COST_QUESTION on a needle document answered with
    sources on and off in alternating order (each pair's first flips), the turn taken back
    between answers so each reads the same cache. -> row with the median per-pair tok/s
    ratio on/off and the median seconds after decoding."""
    _read(rt, spec, needle_doc(rt.tok, n_tokens, seed))
    base = list(rt.messages)
    got: dict[bool, list] = {True: [], False: []}
    for i in range(pairs):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            rt.sources = on
            got[on].append(rt.ask(COST_QUESTION, max_new_tokens=max_new))
            rt.set_conversation(rt.system, base)  # NOTE: the cache keeps the document: only the question is read again
    rt.clear()
    on, off = got[True], got[False]
    ratios = [a.decode_tok_s / b.decode_tok_s for a, b in zip(on, off) if b.decode_tok_s > 0]
    return {"kind": "sources-cost", "policy": spec, "length": n_tokens, "pairs": pairs,
            "new_tokens": on[0].new_tokens, "same_answer": all(r.answer == on[0].answer for r in on + off),
            "tok_s_on": round(statistics.median(r.decode_tok_s for r in on), 2),
            "tok_s_off": round(statistics.median(r.decode_tok_s for r in off), 2),
            "ratio": round(statistics.median(ratios), 3) if ratios else None,
            "sources_s": round(statistics.median(r.sources_s for r in on), 3),
            "sources_s_first": round(on[0].sources_s, 3)}


def _layers(depths, n_layers: int) -> tuple[int, ...]:
    """The layers of a candidate, as `evidence.layers_for` maps DEPTHS."""
    if depths == "every":
        return tuple(range(n_layers))
    return tuple(sorted({min(n_layers - 1, int(round(d * (n_layers - 1)))) for d in depths}))


@contextmanager
def _every_layer(n_layers: int):
    """While inside, an answer's recorder records every layer; yields the list they go to."""
    made, real = [], evidence.Recorder

    def every(_layers):
        made.append(real(range(n_layers)))
        return made[-1]
    evidence.Recorder = every
    try:
        yield made
    finally:
        evidence.Recorder = real


class _Only:
    """A recorder's queries at one layer (evidence.mass sums over `layers`)."""

    def __init__(self, rec, layer: int):
        self.rec, self.layers = rec, frozenset({layer})

    def queries(self, i):
        return self.rec.queries(i)


def depths(rt, candidates=CANDIDATES, length: int = 4096, trials: int = TRIALS, kinds=KINDS, progress=None,
           seed: int = 0) -> list[dict]:
    """Rows {kind: "sources-depths", depths, layers, ...} per candidate: attribution under
    `full` at `length` when the sources come from that candidate's layers (ranked over every
    passage, not only the top 3: `median_rank`)."""
    n_layers = rt.adapter.info.n_layers
    found = {c: [] for c in candidates}
    for kind in kinds:
        for t in range(trials):
            doc = build(rt.tok, kind, length, seed + t)
            _read(rt, "full", doc)
            for turn in doc.turns:
                with _every_layer(n_layers) as made:
                    res = rt.ask(turn.question, max_new_tokens=turn.max_new)
                rec, line = made[-1], fact_line(doc, turn)
                # NOTE: a Passages of its own per answer: it keeps a read's offsets by char span
                got = evidence.Passages(rt.tok).of(rt.held, rt.messages)
                where = evidence.tiers(rt.cache, rt.cache.seen)
                per = [evidence.mass(rt.cache, _Only(rec, i), rt.adapter.attn_scale) for i in range(n_layers)]
                for c in candidates:
                    m = torch.stack([per[i] for i in _layers(c, n_layers)]).sum(0)
                    ranked = evidence.rank(got, m, where, top=len(got))
                    rank = next((i + 1 for i, s in enumerate(ranked) if s.line == line), None)
                    found[c].append({"correct": dense.score(res.answer, turn), "rank": rank, "sources_s": 0.0,
                                     "tier": None})
            rt.clear()
            if progress:
                progress({"kind": "sources-depths", "task": kind, "trial": t})
    rows = []
    for c, recs in found.items():
        ranks = [r["rank"] or 10**6 for r in recs]
        s = summary(recs)
        rows.append({"kind": "sources-depths", "depths": c if c == "every" else ",".join(map(str, c)),
                     "layers": ",".join(map(str, _layers(c, n_layers))) if c != "every" else "all",
                     "median_rank": statistics.median(ranks)} | {k: s[k] for k in DEPTH_COLUMNS if k in s})
    return rows
