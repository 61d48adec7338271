"""`bench quality`: what each policy costs in answers, on the default model and real prose.

- `kl`: teacher-forced next-token KL divergence from `full` (and perplexity) after a
  2K-token prefix of real prose, with each policy's peak KV bytes; `kivi` at 2 and 4 bits
  against transformers' `QuantizedCache` (quanto), both with a one-pass prefill;
- `passkey`: a pass key hidden at depths 0.1..0.9 of a real-prose haystack (licence
  texts, never trained on), inside the model's 8K window and beyond it, every evicting
  policy at the same budget and chunking; with the default policies, one that misses a
  pass key inside the window is not run beyond it (its row says so; `full`, the reference,
  always is; `--policies` runs every cell); `locret` also against random heads;
- `needles`: three distinct facts in one document asked in turn, `locret` vs
  `locret+offload`;
- `copy`: a ~300-token passage at 20-40 % depth reproduced under teacher forcing
  (`recall.copy_fidelity`): `full` on a 5.6K-token document (inside the window),
  `locret` and `locret+offload` on a 16K-token one, budget as given;
- `ffnskip`: short factual questions `full` answers correctly, answered again with FFN
  skipping, with the skip ratio;
- `kvbits`: any specs (`--policies`; default `full` and `kivi` at K2V2, K4V2, K2V4, K4V4,
  K8V2, K8V4): KL from `full`, bytes per token and the pass key at each length (app/bench/kvbits.py);
- `labels`: offload's label cache stored as the cache dtype, fp16 or int8: what the
  question's recall ranks, at the longest length (app/bench/label_cache.py);
- `dense` (only when named: hours on a CPU): facts of one shape in Debian changelogs, six
  keys asked two in turn, one key's four values, one fact asked after an unrelated turn,
  at 3K, 12K and 32K tokens, 8 trials; any specs (`--policies`), `full` only inside the
  model's window (app/bench/dense.py);
- `hosttier` (only when named): `offload`'s host tier at full precision against KIVI codes,
  the same stack otherwise (default: auto's, K8V4), pass key, needles, copy and dense on the
  same documents, each coded spec against the first (app/bench/hosttier.py);
- `sources`, `sources-depths` (only when named): whether an answer's top source is the
  passage of the fact it asks, per policy, and the decode cost of finding sources; the
  evidence layers chosen by that attribution under `full` (app/bench/sources.py).
Defaults (pass key at 4K and 9K, 2 trials) fit in 15 minutes on a 2-core CPU; `--trials`
and `--lengths` scale it, `--parts` picks parts; the time of each part is printed and kept.
"""
from __future__ import annotations

import sys
import time

from . import baselines, dense, hosttier, kvbits, label_cache, locret, recall, sources
from .common import plot, table, write_json

KL_EXTRA = ("kivi", "doublesparse")  # (+ kivi 2/4-bit one-pass vs QuantizedCache: peer_bits)


COPY_DEPTHS = {1: (0.3,), 2: (0.25, 0.35), 3: (0.2, 0.3, 0.4)}


def copy_rows(rt, budget: int, trials: int, full_tokens: int = 5632, doc_tokens: int = 16384, progress=None):
    """Copy fidelity per policy at `trials` depths in 20-40 %."""
    depths = COPY_DEPTHS.get(trials) or tuple(0.2 + 0.2 * i / (trials - 1) for i in range(trials))
    out = []
    for spec, n in (("full", full_tokens), (f"locret:budget={budget}", doc_tokens),
                    (f"locret:budget={budget}+offload", doc_tokens)):
        for d in depths:
            row = recall.copy_fidelity(rt, spec, doc_tokens=n, depth=d)
            out.append(row)
            if progress:
                progress(row)
    return out


PARTS = ("kl", "lazy", "passkey", "ffnskip", "random-heads", "needles", "copy", "kvbits", "labels")  # the default
NAMED_ONLY = ("dense", "hosttier", "sources", "sources-depths")  # run only when --parts names them
NAMED = ("kl", "lazy", "passkey", "ffnskip")  # parts whose --policies are names of baselines.policies_at


def check_parts(parts, policies=None, kinds=None) -> None:
    """Refuse an unknown part by name, with the list to choose from; --policies that are not
    policy names where a part takes names (`kvbits`, `dense` and `hosttier` take whole specs); and --kinds
    that are not `dense`'s, or without part `dense`."""
    unknown = sorted(set(parts) - set(PARTS + NAMED_ONLY))
    if unknown:
        raise ValueError(f"bench quality: unknown part(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(PARTS + NAMED_ONLY)}")
    named = [p for p in parts if p in NAMED]
    specs = sorted(set(policies or ()) - set(baselines.policies_at(1024, 512)))
    if named and specs:
        raise ValueError(f"bench quality: --policies {' '.join(specs)} are not policy names, which parts "
                         f"{','.join(named)} take (names: {', '.join(baselines.policies_at(1024, 512))}); "
                         "whole specs go to parts kvbits, dense and hosttier alone (--parts kvbits,dense)")
    if kinds:
        if "dense" not in parts:
            raise ValueError("bench quality: --kinds picks part dense's kinds; name the part (--parts dense)")
        unknown = sorted(set(kinds) - set(dense.KINDS))
        if unknown:
            raise ValueError(f"bench quality: unknown kind(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(dense.KINDS)}")


def run(rt, out_dir=None, trials=None, lengths=None, policies=None, budget: int = 1024, chunk: int = 512,
        parts=PARTS, kinds=None):
    check_parts(parts, policies, kinds)
    if "dense" in parts and trials == 0:
        raise ValueError("bench quality: --trials 0 runs no answers; part dense is nothing but answers")
    kv_trials = 2 if trials is None else trials  # kvbits: 0 runs no pass key
    dense_trials, dense_lengths = 8 if trials is None else trials, lengths or dense.LENGTHS
    src_trials, src_lengths = sources.TRIALS if trials is None else trials, lengths
    host_trials = 4 if trials is None else trials
    trials = trials or 2
    lengths = lengths or (4096, 9216)
    rows: list[dict] = []
    seconds: dict[str, float] = {}

    def show(row):
        print({k: v for k, v in row.items() if k not in ("answers", "ratios", "layer_bytes", "layer_stores")},
              flush=True)

    def timed(part, fn):
        if part in parts:
            t0 = time.perf_counter()
            rows.extend(fn())
            seconds[part] = round(time.perf_counter() - t0, 1)
            print(f"[{part}: {seconds[part]:,.0f} s]", file=sys.stderr, flush=True)

    names = list(policies) if policies else None
    for part in ("kl", "lazy", "passkey", "ffnskip"):
        timed(part, lambda: baselines.run(rt, names=names, budget=budget, chunk=chunk, lengths=lengths, trials=trials,
                                          parts=(part,), kl_extra=KL_EXTRA, peer_bits=(2, 4), skip_missed=policies is None,
                                          progress=show))
    timed("random-heads", lambda: [dict(r, kind="passkey-random-heads") for r in locret.run(
        rt, lengths=lengths[-1:], trials=trials, budget=budget, chunk=chunk, scorers=("random",), progress=show)])
    timed("needles", lambda: [dict(r, kind="needles") for r in recall.needles(rt, doc_tokens=8192, budget=budget)])
    # NOTE: one depth at the default 2 trials (16K prefills are the suite's slowest part)
    timed("copy", lambda: [dict(r, kind="copy") for r in copy_rows(rt, budget, max(1, trials - 1), progress=show)])
    timed("kvbits", lambda: kvbits.run(rt, specs=policies or kvbits.DEFAULT, lengths=lengths, trials=kv_trials,
                                       progress=show))
    timed("labels", lambda: label_cache.run(rt, max(lengths), trials, progress=show))
    timed("dense", lambda: dense.run(rt, policies=policies or dense.DEFAULT, lengths=dense_lengths,
                                     trials=dense_trials, kinds=kinds or dense.KINDS, progress=show))
    timed("hosttier", lambda: hosttier.run(rt, specs=policies or hosttier.DEFAULT, trials=host_trials,
                                           progress=show))
    timed("sources", lambda: sources.run(rt, policies=policies, lengths=src_lengths, trials=src_trials,
                                         progress=show))
    timed("sources-depths", lambda: sources.depths(rt, length=(src_lengths or (4096,))[0], trials=src_trials,
                                                   progress=show))
    for kind, cols in (("kl", ["policy", "kl_nats", "ppl_full", "ppl_spec", "kv_peak_bytes"]),
                       ("passkey", ["policy", "tokens", "trials", "correct", "accuracy", "skipped"]),
                       ("passkey-random-heads", ["policy", "length", "trials", "correct", "accuracy"]),
                       ("needles", ["spec", "question", "answer", "correct"]),
                       ("copy", ["spec", "doc_tokens", "depth", "tokens", "correct", "accuracy"]),
                       ("ffnskip", ["policy", "questions", "correct_full", "correct_ffnskip", "skip_ratio"]),
                       ("lazy", ["policy", "tokens", "lazy_layers", "saved"]),
                       ("kvbits", kvbits.columns([r for r in rows if r.get("kind") == "kvbits"])),
                       ("labels", label_cache.COLUMNS),
                       ("dense", dense.COLUMNS),
                       ("hosttier", hosttier.COLUMNS),
                       ("sources", sources.COLUMNS),
                       ("sources-cost", sources.COST_COLUMNS),
                       ("sources-depths", sources.DEPTH_COLUMNS)):
        part = [r for r in rows if r.get("kind") == kind]
        if part:
            print(f"\n{kind}\n" + table(part, [c for c in cols if any(c in r for r in part)]))
    print("\nseconds per part: " + ", ".join(f"{k} {v:,.0f}" for k, v in seconds.items()))
    if out_dir is not None:
        write_json(out_dir, "quality", rows, {"model": rt.model_id, "budget": budget, "chunk": chunk,
                                              "seconds": seconds})
        plots(rows, out_dir, trials)
    return rows


def plots(rows: list[dict], out_dir, trials: int) -> None:
    """Pass-key accuracy vs KV bytes (at the shortest length, where every policy runs)
    and vs document length, per policy."""
    peak = {r["policy"]: r["kv_peak_bytes"] for r in rows if r.get("kind") == "kl" and "kv_peak_bytes" in r}
    pk = [r for r in rows if r.get("kind") == "passkey" and "accuracy" in r]
    if not pk:
        return
    n0 = min(r["tokens"] for r in pk)
    pts = [{"policy": r["policy"].split(":")[0], "KV peak (MB)": peak[r["policy"]] / 1e6,
            "accuracy": r["accuracy"]} for r in pk if r["tokens"] == n0 and r["policy"] in peak]
    plot(out_dir / "quality_accuracy_vs_bytes.png", pts, "KV peak (MB)", "accuracy", "policy",
         f"pass key at {n0} tokens vs KV bytes (KL part, 2K tokens)")
    pts = [{"policy": r["policy"].split(":")[0], "tokens": r["tokens"], "accuracy": r["accuracy"]} for r in pk]
    plot(out_dir / "quality_accuracy_vs_length.png", pts, "tokens", "accuracy", "policy",
         f"pass key accuracy vs document length ({trials} trials per point)")
