"""Part `dense` of `bench quality`: facts of one shape in number-dense technical text.

The haystack is `data/dense/changelogs.txt` (Debian changelogs: versions, bug ids, dates on
every line; no source shared with the heads' training text or the pass-key haystack, see
data/dense/SOURCES.md). A document is a window of it that begins at a changelog entry,
~n_tokens long with the facts on lines of their own at spread depths. Kinds:

- `multikey` (RULER's MK-NIAH): n_facts facts of one shape ("The build number of Velgard
  is 48213.", invented names, distinct five-digit numbers), two asked in turn; consecutive
  seeds ask every fact;
- `multivalue` (RULER's MV-NIAH): one name with MV_VALUES numbers, asked for all of them;
- `after-turn`: one fact; the first turn asks which package the document begins with
  (unrelated to the fact, kept as `turn1`), the second asks the fact.

Scoring wants the exact digits: "4821" for "48213" is wrong, and so is an answer that also
names another fact's number. A document is read as a chat would read it (`load_document`,
then `ask` per turn) on a fresh conversation. Policies that keep every position run only
inside the model's window (their rows beyond it say so: nothing is ever truncated).

Under a policy whose cache has an `offload` spill, each question that asks facts also gets
its recall precision (app/bench/precision.py), read after the question's prefill and before
the first decode step: per question in `answers`, and per row `asked_recalled`, `precision`,
`heads_on_host`, `heads_kept` (means over the questions) and `asked_rank` (the median of
the questions' median ranks).
"""
from __future__ import annotations

import bisect
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import precision

HAYSTACK = Path(__file__).resolve().parents[2] / "data" / "dense" / "changelogs.txt"
KINDS = ("multikey", "multivalue", "after-turn")
LENGTHS = (3072, 12288, 32768)
DEFAULT = ("full", "locret", "locret+offload", "locret+offload:terms=on,rank=off",  # (auto's, with heads)
           "streaming:window=2048+offload:terms=on,rank=off", "locret+kivi")  # (auto's, without)
COLUMNS = ["task", "policy", "length", "trials", "correct", "turn1", "asked_recalled", "asked_rank", "precision",
           "heads_on_host", "heads_kept", "skipped"]
SHAPES = (("build number", "build numbers"), ("ticket number", "ticket numbers"), ("serial number", "serial numbers"))
MV_VALUES = 4  # values of the one name in `multivalue` (RULER's default)
ONE_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # `after-turn`: the fact's depth is ONE_DEPTHS[seed % 5]
ROOM = 256  # tokens for the chat template, the questions and the answers past the document
_HEAD = re.compile(r"^([a-z0-9][a-z0-9.+-]*) \([^)\s]+\) [^;\n]+; urgency=", re.M)
_SYL1 = ("Bra", "Cor", "Dav", "Fen", "Gri", "Hol", "Kes", "Lun", "Mor", "Nav", "Pel", "Quin", "Ros", "Tav", "Vel",
         "Wyn", "Zor")
_SYL2 = ("ak", "bly", "dorn", "ex", "fin", "gard", "ix", "lo", "mund", "nor", "pic", "rel", "sto", "tor", "vin")


@dataclass(frozen=True)
class Fact:
    name: str
    value: str  # five digits
    depth: float  # the asked-for depth; the line starts at the first line start past it
    at: int  # character offset of the statement in Doc.text
    statement: str


@dataclass(frozen=True)
class Turn:
    question: str
    want: tuple[str, ...]  # every one must be in the answer
    wrong: tuple[str, ...] = ()  # none may be in the answer
    max_new: int = 24
    scored: bool = True  # False: the unrelated first turn of `after-turn` (reported as turn1)


@dataclass(frozen=True)
class Doc:
    kind: str
    seed: int
    text: str
    facts: tuple[Fact, ...]
    turns: tuple[Turn, ...]
    start: int  # the window's first character in the haystack


_HAY: dict = {}


def _hay(tok, text: str):
    """-> (token start offsets [chars], digit runs, lower-cased text, entry-header char offsets) of text."""
    key = (id(tok), len(text), hash(text))
    if key not in _HAY:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        _HAY.clear()  # one haystack per tokenizer at a time
        _HAY[key] = ([o[0] for o in enc["offset_mapping"]], set(re.findall(r"\d+", text)), text.lower(),
                     [m.start() for m in _HEAD.finditer(text)])
    return _HAY[key]


def spread(n: int) -> list[float]:
    """n depths evenly over 0.1..0.9 (the middle for one)."""
    return [0.1 + 0.8 * i / (n - 1) for i in range(n)] if n > 1 else [0.5]


def _names(rng, n: int, lower: str) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = rng.choice(_SYL1) + rng.choice(_SYL2)
        if name.lower() not in lower and not any(name in o or o in name for o in out):
            out.append(name)
    return out


def _values(rng, n: int, runs: set) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(10000, 99999))
        if v not in runs and v not in out:
            out.append(v)
    return out


def build(tok, text: str, n_tokens: int, kind: str, seed: int, n_facts: int = 6) -> Doc:
    """A document of ~n_tokens tokens of `text` with the facts of `kind` placed, and the turns
    that ask them. Deterministic for (text, n_tokens, kind, seed, n_facts)."""
    if kind not in KINDS:
        raise ValueError(f"dense: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind != "after-turn" and n_facts < 2:
        raise ValueError(f"dense: n_facts={n_facts}; `{kind}` needs at least 2")
    starts, runs, lower, heads = _hay(tok, text)
    rng = random.Random(f"{kind}:{seed}:{n_facts}")
    noun, plural = SHAPES[rng.randrange(len(SHAPES))]
    n = {"multikey": n_facts, "multivalue": min(MV_VALUES, n_facts), "after-turn": 1}[kind]
    depths = spread(n) if kind != "after-turn" else [ONE_DEPTHS[seed % len(ONE_DEPTHS)]]
    names = _names(rng, n if kind == "multikey" else 1, lower)
    values = _values(rng, n, runs)
    if kind == "multivalue":
        stmts = [f"One of the {plural} of {names[0]} is {v}." for v in values]
    else:
        stmts = [f"The {noun} of {a} is {v}." for a, v in zip(names, values)]
    lens = [len(tok(s + "\n", add_special_tokens=False)["input_ids"]) for s in stmts]
    body = n_tokens - sum(lens)
    fits = [h for h in heads if bisect.bisect_left(starts, h) + body <= len(starts)]
    if body < 16 * n or not fits:
        raise ValueError(f"dense: {n_tokens:,} tokens cannot hold {n} facts in a haystack of {len(starts):,} "
                         f"tokens ({HAYSTACK.name}: documents from {16 * n + 32:,} to about {len(starts):,} tokens)")
    c0 = rng.choice(fits)  # NOTE: a window begins at an entry header (the first turn of after-turn asks it)
    s = bisect.bisect_left(starts, c0)
    end = starts[s + body] if s + body < len(starts) else len(text)
    window = text[c0:end]
    parts, facts, prev, off = [], [], 0, 0
    for i, (d, stmt) in enumerate(zip(depths, stmts)):
        p = starts[s + max(0, min(body - 1, int(n_tokens * d) - sum(lens[:i])))] - c0  # depth in the whole document
        if p > 0 and window[p - 1] != "\n":
            p = window.find("\n", p) + 1 or len(window)
        p = max(p, prev)
        parts.append(window[prev:p])
        off += p - prev
        facts.append(Fact(names[0] if kind == "multivalue" else names[i], values[i], d, off, stmt))
        parts.append(stmt + "\n")
        off += len(stmt) + 1
        prev = p
    parts.append(window[prev:])
    ask = " Answer with the number only."
    if kind == "multikey":
        k = (n + 1) // 2
        pair = [seed % k, (seed % k + k) % n]
        rng.shuffle(pair)
        turns = [Turn(f"What is the {noun} of {facts[i].name}?" + ask, (facts[i].value,),
                      tuple(f.value for f in facts if f is not facts[i])) for i in pair]
    elif kind == "multivalue":
        turns = [Turn(f"What are all the {plural} of {names[0]}? Answer with the numbers only.", tuple(values),
                      max_new=12 * n)]
    else:
        pkg = _HEAD.match(window).group(1)
        turns = [Turn("Which package does the first entry of this document describe? Answer with the package "
                      "name only.", (pkg,), max_new=16, scored=False),
                 Turn(f"What is the {noun} of {names[0]}?" + ask, (values[0],))]
    return Doc(kind, seed, "".join(parts), tuple(facts), tuple(turns), c0)


def score(answer: str, turn: Turn) -> bool:
    """Every wanted value in the answer and no wrong one: numbers as whole digit runs ("48,213"
    reads as 48213; "4821" or "148213" is not 48213), words case-insensitively."""
    runs = set(re.findall(r"\d+", re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)))
    low = answer.lower()

    def has(x: str) -> bool:
        if x.isdigit():
            return x in runs
        return re.search(rf"(?<![\w.+-]){re.escape(x.lower())}(?![\w+-])", low) is not None
    return all(has(w) for w in turn.want) and not any(has(w) for w in turn.wrong)


def trial(rt, spec: str, doc: Doc) -> tuple[list[str], list[dict | None]]:
    """Read doc as a document into a fresh conversation under `spec`, ask its turns in order.
    -> (the answers, each turn's recall precision: None where the cache has no offload spill
    or the turn asks no fact)."""
    rt.clear()
    rt.set_policy(spec, reprefill=True)  # an empty conversation: nothing to re-read (and `auto` is off)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "changelog.txt"
        path.write_text(doc.text)
        rt.load_document(str(path))
    spans = precision.fact_spans(rt, doc.facts) if precision.has_offload(rt.cache) else {}
    answers, recalls = [], []
    for t in doc.turns:
        names = {f.name for f in doc.facts if f.value in t.want}
        where = (set().union(*(spans[a] for a in names)), [s for a, s in spans.items() if a not in names]
                 ) if spans and names else None  # (asked, others) positions
        got: list[dict] = []

        def read(done: int, total: int) -> None:
            # NOTE: after the question's last chunk (its recall made, its evictions done) and
            # before the first decode step; on_token can come later: a first token with no text
            # of its own (half a UTF-8 character, a special token) is decoded before it
            if where is not None and done == total:
                got[:] = [precision.recall_precision(rt, *where)]
        answers.append(rt.ask(t.question, max_new_tokens=t.max_new, progress=read).answer.strip())
        recalls.append(got[0] if got else None)
    rt.clear()
    return answers, recalls


def _why_not(rt, spec: str, n: int, known: dict) -> str:
    """"" where `spec` can read n tokens on this model; else why not (one line). `known`
    keeps each spec's (refusal, evicts) for the run."""
    from policies import SpecError
    if spec not in known:
        try:
            known[spec] = ("", rt.adapter.new_cache(spec).evicts)
        except SpecError as e:
            known[spec] = (str(e), True)
    why, evicts = known[spec]
    if why:
        return why
    if not evicts and rt.window and n + ROOM > rt.window:
        return (f"`{spec}` keeps every position: {n:,} tokens and the turns pass the model's {rt.window:,}-token "
                "window (not truncated; not run)")
    return ""


def run(rt, policies=DEFAULT, lengths=LENGTHS, trials: int = 8, kinds=KINDS, progress=None, seed: int = 0,
        n_facts: int = 6) -> list[dict]:
    """Rows {kind: "dense", task, policy, length, trials, correct "c/questions", accuracy,
    answers} per (task, length, policy); `turn1` (after-turn's first turn, "c/trials");
    `skipped` with the reason where a policy cannot run the cell. Trial t of a cell reads the
    document of seed `seed + t`, the same for every policy."""
    if trials < 1:
        raise ValueError(f"dense: --trials {trials}: at least 1 (every row is answers)")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"dense: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    text = HAYSTACK.read_text()
    rows, known = [], {}
    for kind in kinds:
        for n in lengths:
            docs = None
            for spec in policies:
                row = {"kind": "dense", "task": kind, "policy": spec, "length": n}
                why = _why_not(rt, spec, n, known)
                if why:
                    row["skipped"] = why
                else:
                    docs = docs or [build(rt.tok, text, n, kind, seed + t, n_facts) for t in range(trials)]
                    row |= _cell(rt, spec, docs)
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def _cell(rt, spec: str, docs: list[Doc]) -> dict:
    right = asked = first = 0
    answers, measured = [], []
    for doc in docs:
        got, recalls = trial(rt, spec, doc)
        answers.append([{"q": t.question, "want": list(t.want), "got": a} | ({"recall": r} if r else {})
                        for t, a, r in zip(doc.turns, got, recalls)])
        measured += [r for r in recalls if r]
        for t, a in zip(doc.turns, got):
            ok = score(a, t)
            if t.scored:
                right, asked = right + ok, asked + 1
            else:
                first += ok
    out = {"trials": len(docs), "correct": f"{right}/{asked}", "accuracy": round(right / max(asked, 1), 3)}
    if any(not t.scored for t in docs[0].turns):
        out["turn1"] = f"{first}/{len(docs)}"
    if measured:
        out |= precision.average(measured)
    return out | {"answers": answers}
