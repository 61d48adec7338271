"""Measurements for `offload` and `doublesparse` on a loaded model (CPU or CUDA).

`run(...)` returns rows (dicts), one per measurement:
- `prefetch`: how often layer i+1's top-k label selection, estimated from layer i's normed
  input (the RMSNorm gain swapped: input_layernorm_{i+1}(h_i) = x_i * w_{i+1} / w_i, exact),
  agrees with the exact selection — the estimate the paper prefetches with;
- `kl`: teacher-forced next-token KL(full || doublesparse) and perplexity of both over
  `n_eval` decode steps after a `ctx`-token prefix of real prose;
- `speed`: decode tok/s of `full` and `doublesparse` at each context length;
- `needles`: three facts in a long document asked in turn, `locret` vs `locret+offload`
  (only where locret heads ship for the model; else a row saying so).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from app.outlier_channels import default_data, read_text
from app.runtime.convert import convert
from app.runtime.decode import Decoder
from app.runtime.prefill import prefill
from offload import labels
from offload.calibrate import find_channels
from policies import Chunk, KVCache, SpecError
from policies.base import FullStore



def _prose_ids(rt, n: int) -> list[int]:
    text, _ = read_text(default_data())
    ids = rt.tokens(text)
    if len(ids) < n:
        ids = (ids * (n // len(ids) + 1))
    return ids[:n]


def _prefill(rt, cache: KVCache, ids: list[int], chunk: int = 512) -> torch.Tensor:
    return prefill(rt.adapter, cache, ids, chunk)


def _step(rt, cache, tok: int, hidden: bool = False):
    c = Chunk(torch.tensor([tok], device=rt.device), cache.next_position, "decode")
    hid = c.hidden
    logits = rt.adapter.forward(c.input_ids, cache, c, capture_hidden=hidden)
    return logits, hid


@torch.inference_mode()
def prefetch_agreement(rt, ctx: int = 2048, steps: int = 16, keep: float = 1 / 16, channels: int = 16) -> dict:
    info, ad = rt.adapter.info, rt.adapter
    ch = find_channels(info, channels, "", "doublesparse")
    ids = _prose_ids(rt, ctx + steps)
    cache = KVCache("full", info)
    _prefill(rt, cache, ids[:ctx])
    agree, n = 0.0, 0
    for t in range(steps):
        pos = cache.next_position
        _, hid = _step(rt, cache, ids[ctx + t], hidden=True)
        at = torch.tensor([pos], device=rt.device)
        for j in range(3, info.n_layers):  # layers 2.. are sparse; estimate j from j-1
            w_j, w_p = ad.input_norm_weight(j), ad.input_norm_weight(j - 1)
            exact = ad.query_states(j, hid[j], at)  # [Hq, 1, D]
            est = ad.query_states(j, hid[j - 1] * (w_j / w_p), at)
            keys = cache.layers[j].store.dense()[0]
            lab = labels.take(keys, ch[j])
            k = max(1, math.ceil(keep * keys.shape[1]))
            a = labels.top(labels.scores(exact, lab, ch[j]), k)
            b = labels.top(labels.scores(est, lab, ch[j]), k)
            for h in range(a.shape[0]):
                agree += len(set(a[h].tolist()) & set(b[h].tolist())) / k
                n += 1
    return {"measure": "prefetch", "ctx": ctx, "steps": steps, "keep": keep, "channels": channels,
            "agreement": agree / n}


@torch.inference_mode()
def kl_ppl(rt, spec: str, ctx: int = 1792, n_eval: int = 256) -> dict:
    """Teacher-forced decode of n_eval prose tokens after ctx under full and `spec`."""
    ids = _prose_ids(rt, ctx + n_eval + 1)
    info = rt.adapter.info
    caches = {"full": KVCache("full", info)}
    last = _prefill(rt, caches["full"], ids[:ctx])
    caches[spec] = convert(caches["full"], info, spec)[0]
    caches["full"] = KVCache("full", info)
    _prefill(rt, caches["full"], ids[:ctx])
    prev = {k: last for k in caches}
    kl, nll = 0.0, {k: 0.0 for k in caches}
    for t in range(n_eval):
        target = ids[ctx + t]
        lp = {k: torch.log_softmax(prev[k].float(), -1) for k in caches}
        kl += float((lp["full"].exp() * (lp["full"] - lp[spec])).sum())
        for k in caches:
            nll[k] -= float(lp[k][target])
            prev[k] = _step(rt, caches[k], target)[0]
    return {"measure": "kl", "spec": spec, "ctx": ctx, "n_eval": n_eval, "kl_mean": kl / n_eval,
            "ppl_full": math.exp(nll["full"] / n_eval), "ppl_spec": math.exp(nll[spec] / n_eval)}


@torch.inference_mode()
def decode_speed(rt, spec: str, ctx: int, steps: int = 32) -> list[dict]:
    """Decode tok/s of `full`, then (truncated back to ctx, converted in place) of `spec`."""
    info = rt.adapter.info
    ids = _prose_ids(rt, ctx + steps)
    cache = KVCache("full", info)
    _prefill(rt, cache, ids[:ctx], chunk=1024)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    rows = []
    for name in ("full", spec):
        if name != "full":
            assert cache.truncate(ctx)
            cache = convert(cache, info, spec)[0]
        _step(rt, cache, ids[ctx])  # warm-up (doublesparse builds its labels here)
        sync()
        t0 = time.perf_counter()
        for t in range(1, steps):
            _step(rt, cache, ids[ctx + t])
        sync()
        dt = time.perf_counter() - t0
        rows.append({"measure": "speed", "spec": name, "ctx": ctx, "steps": steps - 1,
                     "tok_s": (steps - 1) / dt, "device": str(rt.device), "threads": torch.get_num_threads()})
    return rows


NEEDLES = [("The pass key is {x}.", "What is the pass key?", "73914"),
           ("The secret city is {x}.", "What is the secret city?", "Tbilisi"),
           ("The colour of the door is {x}.", "What is the colour of the door?", "turquoise")]


def needles(rt, doc_tokens: int = 8192, budget: int = 1024, recall: int = 512, specs=None) -> list[dict]:
    """Three needles at depths 20/50/80 % of a prose document (the benchmark haystack, never
    trained on), asked in turn per policy: `specs`, or `locret`, `locret+offload` and `auto`'s
    heads-free choices (a policy that cannot run here is a row saying why)."""
    from .locret import HAYSTACK
    text = HAYSTACK.read_text()
    ids = rt.tokens(text)[:doc_tokens]
    body = rt.tok.decode(ids)
    cuts = [int(len(body) * f) for f in (0.2, 0.5, 0.8)]
    parts, s = [], 0
    for c, (stmt, _, ans) in zip(cuts, NEEDLES):
        cut = body.rfind(". ", s, c) + 2 or c
        parts += [body[s:cut], stmt.format(x=ans) + " "]
        s = cut
    doc = "".join(parts) + body[s:]
    from app.runtime.auto import RECALL
    rows = []
    for spec in specs or (f"locret:budget={budget}", f"locret:budget={budget}+offload:recall={recall}", RECALL):
        rt.clear()  # (before the switch: nothing to re-read)
        try:
            rt.set_policy(spec, reprefill=True)  # an empty conversation: just a fresh cache
        except SpecError as e:
            rows.append({"measure": "needles", "spec": spec, "skipped": str(e)})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "needles.txt"
            path.write_text(doc)
            rt.load_document(str(path))
        for stmt, q, ans in NEEDLES:
            res = rt.ask(q + " Answer with the value only.", max_new_tokens=12)
            rows.append({"measure": "needles", "spec": spec, "question": q, "answer": res.answer.strip(),
                         "correct": ans.lower() in res.answer.lower(), "doc_tokens": len(ids)})
    return rows


def run(rt, what=("prefetch", "kl", "speed", "needles"), ctxs=(4096, 8192), spec="doublesparse") -> list[dict]:
    rows = []
    if "prefetch" in what:
        rows.append(prefetch_agreement(rt))
    if "kl" in what:
        rows.append(kl_ppl(rt, spec))
    if "speed" in what:
        for c in ctxs:
            rows += decode_speed(rt, spec, c)
    if "needles" in what:
        rows += needles(rt)
    return rows


COPY_QUESTION = ('Copy out, word for word, the passage of the document that begins "{head}" and ends '
                 '"{tail}". Write only the passage.')


def _copy_doc(rt, doc_tokens: int, depth: float, passage_tokens: int):
    """-> (document text of ~doc_tokens from the haystack, passage text at `depth`)."""
    from .locret import HAYSTACK
    ids = rt.tokens(HAYSTACK.read_text())
    if len(ids) < doc_tokens:
        raise ValueError(f"the haystack holds {len(ids):,} tokens, fewer than {doc_tokens:,}")
    body = rt.tok.decode(ids[:doc_tokens])
    start = body.find(". ", int(len(body) * depth)) + 2
    ptoks = rt.tokens(body[start:])[:passage_tokens]
    passage = rt.tok.decode(ptoks)
    end = passage.rfind(". ") + 1 or len(passage)  # end on a sentence
    return body, passage[:end].strip()


def _plain(cache) -> bool:
    """Decoding token by token reads what one causal chunk reads: full-precision stores, no
    recall (spill), no sparse reader, no FFN skipping (they act while decoding only)."""
    return cache.ffn is None and all(type(l.store) is FullStore and l.spill is None and l.reader is None
                                     for l in cache.layers)


@torch.inference_mode()
def copy_fidelity(rt, spec: str, doc_tokens: int = 16384, depth: float = 0.3, passage_tokens: int = 300,
                  stepwise: bool = False) -> dict:
    """Copy fidelity: a document whose passage at `depth` the question asks to be
    reproduced; the passage is teacher-forced as the answer and each token counts as right
    when the model's greedy choice at that step is that token. The document is read as a
    document turn and the question as the next (so `offload` recalls with the question's
    queries, as in a chat). -> row with accuracy over the passage's tokens and their mean
    negative log-likelihood (nats). Where decoding cannot differ from one chunk (`_plain`)
    the passage goes through in one forward unless `stepwise`."""
    body, passage = _copy_doc(rt, doc_tokens, depth, passage_tokens)
    words = passage.split()
    q = COPY_QUESTION.format(head=" ".join(words[:6]), tail=" ".join(words[-6:]))
    rt.clear()
    rt.set_policy(spec, reprefill=True)  # an empty conversation: just a fresh cache
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "copy.txt"
        path.write_text(body)
        rt.load_document(str(path))
    target = rt.conv.render(rt.tok, pending=[{"role": "user", "content": q}])
    logits, _ = rt.sync(target)
    answer = rt.tokens(passage)
    if stepwise or not _plain(rt.cache):
        steps = [logits]
        with Decoder(rt.adapter, rt.cache) as dec:
            steps += [dec.step(tok).clone() for tok in answer[:-1]]
        logits = torch.stack(steps)
    else:  # nothing differs between decoding and one causal chunk: teacher-force in one pass
        c = Chunk(torch.tensor(answer[:-1], device=rt.device), rt.cache.next_position, "prefill")
        logits = torch.cat((logits[None], rt.adapter.forward(c.input_ids, rt.cache, c, all_logits=True)))
    tgt = torch.tensor(answer, device=logits.device)
    right = int((logits.argmax(-1) == tgt).sum())
    nll = -float(torch.log_softmax(logits.float(), -1).gather(1, tgt[:, None]).sum())
    kv = rt.cache.bytes_by_tier()
    rt.clear()
    return {"measure": "copy", "spec": spec, "doc_tokens": doc_tokens, "depth": depth, "tokens": len(answer),
            "correct": right, "accuracy": right / len(answer), "nll": nll / len(answer),
            "kv_gpu_bytes": kv["gpu"], "kv_host_bytes": kv["host"]}
