"""Training documents for `train-heads`: a window of real prose with facts inserted.

Each fact is a statement of one kind (numbers, codes, words, cities, dates, names, in
varied phrasing) about an entity, with the question that asks for it and its answer. A
document asks about every inserted fact, so its labels (app/heads/labels.py) say what a
question could need, not what one question happened to ask.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = (ROOT / "data" / "train" / "python_topics.txt",)
# Several genres (`--data` with all of them): prose, code, number-dense change logs, tables
GENRES = tuple(ROOT / "data" / "train" / f for f in ("python_topics.txt", "code.txt", "changelogs.txt",
                                                      "tables.txt"))

_NAMES = ["Amara", "Bruno", "Chen Wei", "Dagny", "Esteban", "Farah", "Gustav", "Hiroko", "Ines", "Jonas",
          "Kofi", "Leila", "Marek", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Soren", "Tamsin"]
_PLACES = ["Lisbon", "Tromso", "Nairobi", "Osaka", "Quito", "Tbilisi", "Halifax", "Perth", "Ghent", "Leon"]
_THINGS = ["the blue ledger", "the north tower", "crate eleven", "the observatory", "the spare laptop",
           "the archive room", "the red bicycle", "the greenhouse", "locker nine", "the harbour office"]
_WORDS = ["copper", "lantern", "marigold", "falcon", "quartz", "meadow", "tundra", "violet", "saffron",
          "glacier", "orchid", "thistle", "cobalt", "juniper", "harbor", "ember"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]


def _value(rng: random.Random, kind: str) -> str:
    if kind == "num":
        return str(rng.randint(10 ** (rng.randint(2, 6)), 10 ** 7 - 1))
    if kind == "code":
        return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(rng.randint(4, 7)))
    if kind == "word":
        return rng.choice(_WORDS)
    if kind == "city":
        return rng.choice(_PLACES)
    if kind == "date":
        return f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1850, 2040)}"
    return rng.choice(_NAMES)


# (value kind, statements, question, answer); {e} an entity, {x} the value.
_FACTS = [
    ("num", ["The combination for {e} is {x}.", "Note that {e} opens with the combination {x}.",
             "{e}: combination {x}. Do not lose it."],
     "What is the combination for {e}?", "The combination for {e} is {x}."),
    ("code", ["The access code of {e} is {x}.", "To enter {e}, type the access code {x}.",
              "Remember this: the access code for {e} is {x}."],
     "Which access code opens {e}?", "The access code of {e} is {x}."),
    ("word", ["The secret word chosen for {e} is \"{x}\".", "Everyone guarding {e} must say the word {x}.",
              "For {e} the agreed secret word is {x}."],
     "What is the secret word for {e}?", "The secret word for {e} is {x}."),
    ("city", ["{e} was moved to {x} last winter.", "After the audit, {e} ended up in {x}.",
              "The records say {e} is now kept in {x}."],
     "In which city is {e} kept now?", "{e} is kept in {x}."),
    ("date", ["The inspection of {e} is scheduled for {x}.", "{e} will be inspected on {x}.",
              "Mark the calendar: {e} gets inspected on {x}."],
     "When is {e} going to be inspected?", "{e} is inspected on {x}."),
    ("name", ["The person responsible for {e} is {x}.", "{x} alone holds the keys to {e}.",
              "If anything happens to {e}, call {x}."],
     "Who is responsible for {e}?", "{x} is responsible for {e}."),
    ("num", ["The invoice number for {e} is {x}.", "{e} was billed under invoice {x}.",
             "Invoice {x} covers {e}."],
     "What invoice number covers {e}?", "The invoice for {e} is number {x}."),
    ("num", ["There are exactly {x} bolts holding {e} together.", "{e} needed {x} bolts in total.",
             "Someone counted {x} bolts in {e}."],
     "How many bolts hold {e} together?", "{e} has {x} bolts."),
    ("code", ["The wifi password at {e} is {x}.", "Log in at {e} with the password {x}.",
              "Password for {e}'s network: {x}."],
     "What is the wifi password at {e}?", "The wifi password at {e} is {x}."),
]


# Fact-shaped sentences that no question asks about (`--distractors`, off by default):
# numbered headings, dates, versions, references, counts, from their own pools of subjects,
# names and places, so no question's entity appears in them. They test whether heads that
# see every fact-shaped sentence asked about learn "anything with a date or number is
# important"; BENCHMARKS.md has what they did to pass key (a needle is itself an unasked
# fact-shaped sentence to a query-agnostic scorer).
_D_SUBJECTS = ["the committee", "the survey", "the second edition", "the old mill", "the museum",
               "the village school", "the ferry service", "the choir", "the bakery", "the research group"]
_D_NAMES = ["Abel", "Beatrix", "Cyril", "Delphine", "Emil", "Flora", "Gideon", "Hester", "Ivo", "Judith"]
_D_PLACES = ["Bergen", "Cordoba", "Dundee", "Graz", "Kyoto", "Lyon", "Porto", "Tartu", "Utrecht", "Zagreb"]
_D_HEADINGS = ["Overview", "Definitions", "Background", "Methods", "Results", "Discussion", "Installation",
               "Configuration", "Troubleshooting", "Acknowledgements", "Further reading", "Change log"]
_DISTRACTORS = [
    "{n}. {h}", "Section {n}.{m}: {h}", "Part {n}, {h}",
    "{s} met on {day} in {p}.", "Revised on {day} by {a}.", "Version {n}.{m}.{k} came out on {day}.",
    "See page {num} of the {year} edition.", "About {pct} percent of {s} agreed in {year}.",
    "Reference {code} was filed on {day}.", "{a} joined {s} in {year} and left in {year2}.",
    "{s} moved from {p} to {p2} in {year}.", "Order {num} left {p} on {day} with {n} parcels.",
]


def _distractor(rng):
    s = rng.choice(_DISTRACTORS).format(
        n=rng.randint(1, 19), m=rng.randint(0, 9), k=rng.randint(0, 30), h=rng.choice(_D_HEADINGS),
        s=rng.choice(_D_SUBJECTS), a=rng.choice(_D_NAMES), p=rng.choice(_D_PLACES), p2=rng.choice(_D_PLACES),
        day=f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1850, 2040)}",
        num=rng.randint(100, 9999), pct=rng.randint(2, 98), year=rng.randint(1850, 2040),
        year2=rng.randint(1850, 2040),
        code="-".join(_value(rng, "code") for _ in range(2)))
    return s[0].upper() + s[1:]


def _statement(rng, fam):
    kind, stmts, q, a = fam
    e, x = rng.choice(_THINGS), _value(rng, kind)
    s = rng.choice(stmts).format(e=e, x=x)
    a = a.format(e=e, x=x)
    return s[0].upper() + s[1:], q.format(e=e, x=x), a[0].upper() + a[1:]


def _same_shape(rng, n_facts):
    """n_facts statements of one family about distinct entities with distinct values: the
    facts a question must tell apart ("the invoice for X" among five invoices)."""
    fam = rng.choice(_FACTS)
    kind, stmts, q, a = fam
    out, values = [], set()
    for e in rng.sample(_THINGS, n_facts):
        x = _value(rng, kind)
        while x in values:  # (every pool holds more values than a document has facts)
            x = _value(rng, kind)
        values.add(x)
        s, a1 = rng.choice(stmts).format(e=e, x=x), a.format(e=e, x=x)
        out.append((s[0].upper() + s[1:], q.format(e=e, x=x), a1[0].upper() + a1[1:]))
    return out


def build_document(rng: random.Random, text: str, n_chars: int, n_facts: int = 4, n_distractors: int = 0,
                   same_shape: bool = False):
    """-> (text window with facts and distractors inserted, [(question, answer)] one per
    fact, shuffled). same_shape: every fact of one family (distinct entities and values).
    NOTE: distractors draw from `rng` after everything else, so the same seed gives the same
    facts, questions and order with any n_distractors."""
    start = rng.randrange(0, max(1, len(text) - n_chars))
    window = text[start:start + n_chars]
    paras = [p for p in window.split("\n\n") if p.strip()] or [window]
    if same_shape:
        facts = _same_shape(rng, n_facts)
    else:
        facts = [_statement(rng, rng.choice(_FACTS)) for _ in range(n_facts)]
    for s, _, _ in facts:
        paras.insert(rng.randrange(1, len(paras) + 1), s)
    qa = [(q, a) for _, q, a in facts]
    rng.shuffle(qa)
    for _ in range(n_distractors):
        paras.insert(rng.randrange(1, len(paras) + 1), _distractor(rng))
    return "\n\n".join(paras), qa


def _tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def make_example(tok, rng, text, n_tokens, n_distractors=0, same_shape: float = 0.0):
    """-> (ids [T] LongTensor, n_ctx): the document as a user message ending in a question
    about one inserted fact, the answer, then one more user turn + answer per other fact;
    the tail (every question and answer) starts at n_ctx. Asking about every fact makes the
    labels say what a question could need (retention is query-agnostic), not what the one
    question asked happened to; the distractors, asked about by none, say what it does not.
    same_shape: the share of documents whose facts are all of one family (several similar
    facts, each asked); 0 draws nothing more from `rng` (the documents of a run without it)."""
    n_chars, n_facts = int(n_tokens * rng.uniform(1.6, 3.2)), rng.randint(2, 6)
    one_family = same_shape > 0 and rng.random() < same_shape
    body, qa = build_document(rng, text, n_chars, n_facts, n_distractors, same_shape=one_family)
    msgs = [{"role": "user", "content": body + "\n\n" + qa[0][0]}, {"role": "assistant", "content": qa[0][1]}]
    for q, a in qa[1:]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    cut = full.index(body) + len(body)
    ctx, tail = _tokens(tok, full[:cut]), _tokens(tok, full[cut:])
    return torch.tensor(ctx + tail), len(ctx)


def load_texts(files) -> tuple[list[str], list[dict]]:
    """-> (each file's text, provenance per file: path, characters, sha256 prefix)."""
    files = [Path(f) for f in (files or DEFAULT_DATA)]
    texts, prov = [], []
    for f in files:
        t = f.read_text(encoding="utf-8", errors="replace")
        if len(t) < 2000:
            raise ValueError(f"{f}: only {len(t)} characters; training needs real prose (a few KB at least)")
        texts.append(t)
        full = f.resolve()
        prov.append({"file": str(full.relative_to(ROOT) if full.is_relative_to(ROOT) else full),
                     "chars": len(t), "sha256": hashlib.sha256(t.encode()).hexdigest()[:16]})
    return texts, prov
