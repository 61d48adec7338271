"""Part `hosttier` of `bench quality` (only when named): `offload`'s host tier at full
precision against the same stack with its host tier as KIVI codes (`kbits`/`vbits`), on
the same documents, task by task:
- `passkey`: kvbits' protocol (next-token KL from `full` after a 2K-token prefix, bytes, the
  pass key at each length, the passkey part's depths and seeds);
- `needles`: three facts in a 16K-token document asked in turn (`recall.needles`);
- `copy`: a ~300-token passage at 20, 30 and 40 % of a 16K-token document reproduced under
  teacher forcing (`recall.copy_fidelity`): tokens right / tokens;
- `dense`: six keys in Debian changelogs asked two in turn, 12K tokens (`dense`, multikey).
Every spec after the first is compared with the first (`delta`: its questions right less the
first's; `within`: whether that is within one trial's questions -- the issue's bar for a
coded host tier). Copy counts tokens, a trial is one passage: within means at most one
passage's share of its tokens lost."""
from __future__ import annotations

from . import dense, kvbits, recall

STACK = "locret+offload:terms=on,rank=off"  # auto's stack past the window on the default model
DEFAULT = (STACK, STACK + ",kbits=8,vbits=4")
COPY_DEPTHS = (0.2, 0.3, 0.4)
COLUMNS = ["task", "policy", "correct", "of", "accuracy", "delta", "within", "kl_nats", "bytes_per_token", "skipped"]


def run(rt, specs=DEFAULT, lengths=(12288, 16384), trials: int = 4, doc_tokens: int = 16384,
        dense_tokens: int = 12288, progress=None) -> list[dict]:
    """Rows {kind: "hosttier", task, policy, correct, of, accuracy[, kl_nats, bytes_per_token],
    per_trial (questions in one trial), answers}, then delta/within against specs[0]."""
    specs = list(specs)
    rows: list[dict] = []

    def add(row):
        rows.append(row)
        if progress:
            progress(row)

    for r in kvbits.run(rt, specs=specs, lengths=lengths, trials=trials):
        ran = [r[f"passkey_{n}"] for n in lengths if "/" in r[f"passkey_{n}"]]
        row = {"kind": "hosttier", "task": "passkey", "policy": r["policy"], "kl_nats": r["kl_nats"],
               "bytes_per_token": r["bytes_per_token"], "answers": r["answers"]}
        if len(ran) < len(lengths):  # a length the spec cannot read: said, not counted as wrong
            row["skipped"] = "; ".join(r[f"passkey_{n}"] for n in lengths if "/" not in r[f"passkey_{n}"])
        if ran:
            row |= {"correct": sum(int(g.split("/")[0]) for g in ran), "of": trials * len(ran), "per_trial": 1}
        add(row)
    for spec in specs:
        got = recall.needles(rt, doc_tokens=doc_tokens, specs=[spec])
        if any("skipped" in r for r in got):
            add({"kind": "hosttier", "task": "needles", "policy": spec, "skipped": got[0]["skipped"]})
            continue
        add({"kind": "hosttier", "task": "needles", "policy": spec, "correct": sum(r["correct"] for r in got),
             "of": len(got), "per_trial": len(got), "answers": [r["answer"] for r in got]})
    for spec in specs:
        got = [recall.copy_fidelity(rt, spec, doc_tokens=doc_tokens, depth=d) for d in COPY_DEPTHS]
        add({"kind": "hosttier", "task": "copy", "policy": spec, "correct": sum(r["correct"] for r in got),
             "of": sum(r["tokens"] for r in got), "per_trial": max(r["tokens"] for r in got),
             "answers": [r["accuracy"] for r in got]})
    for r in dense.run(rt, policies=specs, lengths=(dense_tokens,), trials=trials, kinds=("multikey",)):
        if "skipped" in r:
            add({"kind": "hosttier", "task": "dense", "policy": r["policy"], "skipped": r["skipped"]})
            continue
        right, asked = (int(x) for x in r["correct"].split("/"))
        add({"kind": "hosttier", "task": "dense", "policy": r["policy"], "correct": right, "of": asked,
             "per_trial": asked // r["trials"], "answers": r["answers"]})
    return compare(rows)


def compare(rows: list[dict]) -> list[dict]:
    """Accuracy per row; delta and within against the first row of the same task."""
    first: dict[str, dict] = {}
    for r in rows:
        if "correct" not in r:
            continue
        r["accuracy"] = round(r["correct"] / max(r["of"], 1), 3)
        base = first.setdefault(r["task"], r)
        if base is not r:
            r["delta"] = r["correct"] - base["correct"]
            r["within"] = r["delta"] >= -r["per_trial"]
    return rows
