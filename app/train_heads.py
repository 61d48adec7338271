"""`train-heads`: train Locret retaining heads for a model, backbone frozen.

Training documents are built from any prose given: a window of real text with several
facts inserted (many kinds, varied phrasing) and, optionally, fact-shaped distractors that
no question asks about, rendered through the model's chat template as a user message
ending in a question about one fact, the assistant's answer, then a turn per other fact. The
label of every context token at layer i, KV head j is the max pre-softmax logit QKᵀ/√d
that the question/answer queries pay it (true positions, uncompressed context), max also
over the query heads of that KV group (REFERENCES §1). Labels and the heads' inputs (the
post-input_layernorm hidden states) come from one frozen forward per document, cached
under OUT/.features so an interrupted run resumes; training checkpoints every 100 steps.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from app.runtime.types import VramchatError
from policies import KVCache, rope
from policies.base import Chunk
from policies.locret import RetainingHeads, model_key, save_heads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (ROOT / "data" / "train" / "python_topics.txt",)

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
# names and places, so no question's entity appears in them. The hypothesis: heads trained
# where every fact-shaped sentence is asked about learn "anything with a date or number is
# important" (at 32K ~4 % of a licence text outscores a needle). Measured, it hurts: 2, 6
# or 12 per document took pass key from 9/10 to 4-5/10 at 16K and 3/10 to 1/10 at 32K;
# a needle is itself an unasked fact-shaped sentence to a query-agnostic scorer.
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


def build_document(rng: random.Random, text: str, n_chars: int, n_facts: int = 4, n_distractors: int = 0):
    """-> (text window with facts and distractors inserted, [(question, answer)] one per
    fact, shuffled). NOTE: distractors draw from `rng` after everything else, so the same
    seed gives the same facts, questions and order with any n_distractors."""
    start = rng.randrange(0, max(1, len(text) - n_chars))
    window = text[start:start + n_chars]
    paras = [p for p in window.split("\n\n") if p.strip()] or [window]
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


def make_example(tok, rng, text, n_tokens, n_distractors=0):
    """-> (ids [T] LongTensor, n_ctx): the document as a user message ending in a question
    about one inserted fact, the answer, then one more user turn + answer per other fact;
    the tail (every question and answer) starts at n_ctx. Asking about every fact makes the
    labels say what a question could need (retention is query-agnostic), not what the one
    question asked happened to; the distractors, asked about by none, say what it does not."""
    body, qa = build_document(rng, text, int(n_tokens * rng.uniform(1.6, 3.2)), rng.randint(2, 6), n_distractors)
    msgs = [{"role": "user", "content": body + "\n\n" + qa[0][0]}, {"role": "assistant", "content": qa[0][1]}]
    for q, a in qa[1:]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    cut = full.index(body) + len(body)
    ctx, tail = _tokens(tok, full[:cut]), _tokens(tok, full[cut:])
    return torch.tensor(ctx + tail), len(ctx)


def features(adapter, ids, n_ctx):
    """-> (hidden [L, n_ctx, hidden] fp16, labels [L, Hkv, n_ctx] float32) from one forward."""
    with torch.inference_mode():
        h, lab = _features(adapter, ids, n_ctx)
    return h.clone(), lab.clone()  # NOTE: clones outside inference mode can enter autograd


def _features(adapter, ids, n_ctx):
    info = adapter.info
    cache = KVCache("full", info)
    chunk = Chunk(ids.to(info.device), 0)
    hidden = chunk.hidden
    adapter.forward(chunk.input_ids, cache, chunk, capture_hidden=True)
    pos = torch.arange(n_ctx, ids.shape[0], device=info.device)
    hs, labels = [], []
    for i, layer in enumerate(adapter.layers):
        attn, x = layer.self_attn, hidden[i]
        q = _q_proj(attn, x[n_ctx:], info)  # [Hq, Tq, D] pre-RoPE
        q = rope.rotate(q, pos, info.inv_freq)
        k = cache.layers[i].store.k[:, :n_ctx]  # [Hkv, n_ctx, D] post-RoPE, true positions
        scale = getattr(attn, "scaling", info.head_dim ** -0.5)
        logits = q.float().reshape(info.n_kv_heads, -1, info.head_dim) @ k.float().transpose(1, 2) * scale
        labels.append(logits.amax(1))  # max over tail queries and the group's query heads
        hs.append(x[:n_ctx].to(torch.float16))
    return torch.stack(hs).cpu(), torch.stack(labels).cpu()


def _q_proj(attn, x, info):
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(x)
    else:  # fused qkv (Phi-3): Q comes first
        q = attn.qkv_proj(x)[:, : info.n_q_heads * info.head_dim]
    q = q.view(x.shape[0], info.n_q_heads, info.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q per head before RoPE
        q = attn.q_norm(q)
    return q.transpose(0, 1)


TARGETS = ("shared", "layer")


def targets(labels: torch.Tensor, mode: str = "shared") -> torch.Tensor:
    """Raw labels [L, Hkv, T] -> the regression targets [L, Hkv, T].

    "layer" is Locret's: each head regresses its own layer's max logit. "shared" z-scores
    each (layer, head) row over the document, then takes the max over all layers and heads:
    a token that any layer's question/answer queries single out is a target for every layer.
    Why: a needle must survive in most layers to be answered (kept only in layers 20-23 the
    default model fails), but early layers' question queries barely tell it from prose, so
    per-layer labels teach those layers to drop it. On 4K pass-key documents the per-layer
    labels put 10-21 % of the needle's tokens in their layer's top 1/16, the shared target
    65-73 % (see BENCHMARKS.md).
    """
    if mode == "layer":
        return labels
    if mode != "shared":
        raise ValueError(f"label mode {mode!r} is not one of {', '.join(TARGETS)}")
    z = (labels - labels.mean(-1, keepdim=True)) / labels.std(-1, keepdim=True).clamp_min(1e-6)
    return z.amax((0, 1)).expand_as(labels)


def head_loss(heads, hidden, labels, smooth=2.5e-3):
    """hidden [L, T, d], labels [L, Hkv, T] -> (loss, per-layer SmoothL1 [L]): SmoothL1
    regression (Locret's) + `smooth` x adjacent-score MSE."""
    per = []
    total = 0.0
    for i in range(hidden.shape[0]):
        pred = heads.layer(i, hidden[i]).t()  # [Hkv, T]
        sl1 = F.smooth_l1_loss(pred, labels[i])
        per.append(sl1.detach())
        total = total + sl1 + smooth * F.mse_loss(pred[:, 1:], pred[:, :-1])
    return total / hidden.shape[0], torch.stack(per)


@torch.no_grad()
def evaluate(heads, docs):
    """-> {loss, loss_per_layer, top10_overlap_per_layer, top10_overlap} over held-out docs."""
    L = docs[0][0].shape[0]
    loss, overlap = torch.zeros(L), torch.zeros(L)
    for hidden, labels in docs:
        _, per = head_loss(heads, hidden.float(), labels)
        loss += per / len(docs)
        for i in range(L):
            pred = heads.layer(i, hidden[i].float()).t()
            k = max(1, pred.shape[1] // 10)
            top_p, top_l = pred.topk(k, 1).indices, labels[i].topk(k, 1).indices
            hit = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, top_p, True).gather(1, top_l)
            overlap[i] += hit.float().mean() / len(docs)
    return {"loss": round(loss.mean().item(), 4), "loss_per_layer": [round(v, 4) for v in loss.tolist()],
            "top10_overlap": round(overlap.mean().item(), 4),
            "top10_overlap_per_layer": [round(v, 3) for v in overlap.tolist()]}


def _config_hash(model) -> str:
    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def _load_text(files):
    files = [Path(f) for f in (files or DEFAULT_DATA)]
    texts, prov = [], []
    for f in files:
        t = f.read_text(encoding="utf-8", errors="replace")
        if len(t) < 2000:
            raise ValueError(f"{f}: only {len(t)} characters; training needs real prose (a few KB at least)")
        texts.append(t)
        prov.append({"file": str(f.relative_to(ROOT) if f.resolve().is_relative_to(ROOT) else f),
                     "chars": len(t), "sha256": hashlib.sha256(t.encode()).hexdigest()[:16]})
    return "\n\n".join(texts), prov


def train_heads(model, out_dir, data_files=(), steps=1200, docs=128, val_docs=8, doc_tokens=2048,
                d_r=128, lr=2e-3, warmup=60, seed=0, threads=2, progress=None, command="",
                label_mode="shared", distractors=0) -> dict:
    """Train heads for `model` (a Runtime, or a model id / path / None for the default).

    progress(stage, done, total) with stage "collect" or "train". Writes OUT/heads.safetensors
    and OUT/card.json; returns the card. Re-running with the same OUT resumes.
    """
    torch.set_num_threads(threads)
    t0 = time.time()
    rt = model
    if not hasattr(model, "adapter"):
        from app.runtime.engine import Runtime
        rt = Runtime.load(model, device="cpu")
    adapter, info = rt.adapter, rt.adapter.info
    out = Path(out_dir)
    (out / ".features").mkdir(parents=True, exist_ok=True)
    text, prov = _load_text(data_files)
    built = {"docs": docs, "doc_tokens": doc_tokens, "distractors": distractors, "seed": seed, "files": prov}
    made = out / ".features" / "documents.json"
    if made.is_file() and json.loads(made.read_text()) != built:
        raise VramchatError(f"{out}/.features holds documents built with {made.read_text()}; this run builds "
                         f"{json.dumps(built)}: give another --out (cached features would be mixed)")
    made.write_text(json.dumps(built))
    split = int(len(text) * 0.9)  # held-out documents come from the last 10 % of the text
    from safetensors.torch import load_file, save_file
    data = []
    for j in range(docs + val_docs):
        f = out / ".features" / f"doc{j:04d}.safetensors"
        if f.is_file():
            d = load_file(str(f))
        else:
            rng = random.Random(seed * 100003 + j)
            src = text[:split] if j < docs else text[split:]
            ids, n_ctx = make_example(rt.tok, rng, src, doc_tokens, distractors)
            h, lab = features(adapter, ids, n_ctx)
            d = {"hidden": h, "labels": lab}
            save_file(d, str(f))
        data.append((d["hidden"], targets(d["labels"], label_mode)))
        if progress:
            progress("collect", j + 1, docs + val_docs)
    train, val = data[:docs], data[docs:]
    torch.manual_seed(seed)
    heads = RetainingHeads(info.n_layers, info.hidden_size, d_r, info.n_kv_heads,
                           getattr(rt.adapter.model.config, "hidden_act", "silu"))
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, 1 - (s - warmup) / max(1, steps - warmup)))
    start = _resume(out, heads, opt, sched)
    before = evaluate(heads, val) if start == 0 else None
    for step in range(start, steps):
        hidden, labels = train[random.Random(seed * 1_000_003 + step).randrange(len(train))]
        loss, _ = head_loss(heads, hidden.float(), labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 0.5)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            _checkpoint(out, heads, opt, step + 1)
        if progress:
            progress("train", step + 1, steps)
    after = evaluate(heads, val)
    names = [rt.model_id]
    card = {
        "model": rt.model_id, "model_key": model_key(info), "config_hash": _config_hash(adapter.model),
        "command": command, "wall_time_s": round(time.time() - t0, 1), "threads": threads,
        "hyper_parameters": {"steps": steps, "docs": docs, "val_docs": val_docs, "doc_tokens": doc_tokens,
                             "distractors": distractors, "d_r": d_r, "lr": lr, "warmup": warmup,
                             "schedule": "linear warmup, linear decay",
                             "optimizer": "AdamW(0.9, 0.95), wd 0.01", "grad_clip": 0.5,
                             "loss": "SmoothL1 + 2.5e-3 * adjacent MSE", "seed": seed,
                             "input": "post-input_layernorm hidden state", "act": heads.act_name},
        "data": {"files": prov, "held_out": "documents built from the last 10% of the text",
                 "labels": "max pre-softmax logit from the queries of a question/answer pair per inserted "
                           "fact, max over GQA group",
                 "distractors": f"{distractors} fact-shaped sentences per document from templates no question "
                                "asks about" if distractors else "none",
                 "targets": label_mode + (": z-scored per layer and head, max over layers and heads"
                                          if label_mode == "shared" else ": per layer")},
        "validation": {"before": before, "after": after},
    }
    save_heads(heads, out / "heads.safetensors", model_key(info), names, {"config_hash": card["config_hash"]})
    (out / "card.json").write_text(json.dumps(card, indent=1))
    return card


def _checkpoint(out, heads, opt, step):
    from safetensors.torch import save_file
    state = {f"heads.{k}": v.detach().clone() for k, v in heads.state_dict().items()}
    for gi, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                state[f"opt.{gi}.{name}"] = st[name].clone()
    save_file(state, str(out / "checkpoint.safetensors"), metadata={"step": str(step)})


def _resume(out, heads, opt, sched) -> int:
    f = out / "checkpoint.safetensors"
    if not f.is_file():
        return 0
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(f), "pt") as fh:
        step = int(fh.metadata()["step"])
    state = load_file(str(f))
    heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")}, strict=True)
    for gi, p in enumerate(opt.param_groups[0]["params"]):
        if f"opt.{gi}.exp_avg" in state:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": state[f"opt.{gi}.exp_avg"],
                            "exp_avg_sq": state[f"opt.{gi}.exp_avg_sq"]}
    sched.last_epoch = step
    for g, base in zip(opt.param_groups, sched.base_lrs):
        g["lr"] = base * sched.lr_lambdas[0](step)
    return step


def import_official(checkpoint, model, out_dir) -> dict:
    """Fold an official Locret checkpoint (heads over [Q,K,V]) into heads over the hidden
    state of `model` and write OUT/heads.safetensors + card.json."""
    from policies.locret import heads_from_official, read_official
    rt = model
    if not hasattr(model, "adapter"):
        from app.runtime.engine import Runtime
        rt = Runtime.load(model)
    info = rt.adapter.info
    ckpt = read_official(checkpoint, info.n_layers)
    ws, bs = [], []
    for layer in rt.adapter.layers:
        a = layer.self_attn
        projs = [a.qkv_proj] if hasattr(a, "qkv_proj") else [a.q_proj, a.k_proj, a.v_proj]
        ws.append(torch.cat([p.weight.detach().float().cpu() for p in projs]))
        has_b = any(p.bias is not None for p in projs)
        bs.append(torch.cat([p.bias.detach().float().cpu() if p.bias is not None else
                             torch.zeros(p.weight.shape[0]) for p in projs]) if has_b else None)
    heads = heads_from_official(ckpt, ws, bs, info.n_kv_heads, getattr(rt.adapter.model.config, "hidden_act", "silu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = {"model": rt.model_id, "model_key": model_key(info), "config_hash": _config_hash(rt.adapter.model),
            "source": str(checkpoint), "tensors_loaded": 2 * info.n_layers,
            "mapping": "fc1_hidden = fc1_qkv @ cat(Wq, Wk, Wv) (+ fc1_qkv @ cat(bq, bk, bv) as an fc1 bias)"}
    save_heads(heads, out / "heads.safetensors", model_key(info), [rt.model_id])
    (out / "card.json").write_text(json.dumps(card, indent=1))
    return card


def add_parser(sub):
    p = sub.add_parser("train-heads", help="train Locret retaining heads for a model (backbone frozen)")
    p.add_argument("--model", default=None, help="model id, folder or .gguf (default: the embedded model)")
    p.add_argument("--out", required=True, help="output folder: heads.safetensors, card.json, checkpoints")
    p.add_argument("--data", nargs="*", default=[], help="prose text files (default: data/train/python_topics.txt)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--docs", type=int, default=128, help="training documents")
    p.add_argument("--doc-tokens", type=int, default=2048,
                   help="prose tokens per training document (2048: the shipped heads; with 1024 the 32K pass key fell to 3/10)")
    p.add_argument("--width", type=int, default=128, help="hidden width of each head")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distractors", type=int, default=0,
                   help="fact-shaped sentences per training document that no question asks about (default 0)")
    p.add_argument("--labels", choices=TARGETS, default="shared",
                   help="regression target: shared (max over layers of z-scored labels, default) or layer (Locret's)")
    p.add_argument("--import", dest="import_ckpt", default=None,
                   help="fold an official Locret checkpoint (.bin/.pt) into heads for --model instead of training")
    return p


def run(args) -> int:
    if args.import_ckpt:
        card = import_official(args.import_ckpt, args.model, args.out)
        print(f"imported {card['tensors_loaded']} tensors from {args.import_ckpt} into {args.out}")
        return 0
    last = [0.0]

    def progress(stage, done, total):
        now = time.time()
        if now - last[0] > 1 or done == total:
            last[0] = now
            bar = "#" * int(30 * done / total)
            print(f"\r{stage:8s} [{bar:<30}] {done}/{total}", end="\n" if done == total else "", file=sys.stderr)

    card = train_heads(args.model, args.out, args.data, steps=args.steps, docs=args.docs,
                       doc_tokens=args.doc_tokens, d_r=args.width, lr=args.lr, threads=args.threads,
                       label_mode=args.labels, distractors=args.distractors,
                       progress=progress, command="python main.py " + " ".join(sys.argv[1:]))
    v = card["validation"]["after"]
    print(f"wrote {args.out}/heads.safetensors in {card['wall_time_s']:.0f} s; held-out loss {v['loss']}, "
          f"top-10% overlap {v['top10_overlap']:.3f}")
    return 0
