"""`train-heads`: train Locret retaining heads for a model, backbone frozen.

Documents come from app/heads/data.py, labels and the heads' inputs from
app/heads/labels.py; both are cached under OUT/.features so an interrupted run resumes,
and training checkpoints every 100 steps.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from app.runtime.types import VramchatError
from policies.locret import RetainingHeads, model_key, save_heads

from .data import load_text, make_example
from .labels import features, targets


def runtime(model, **load):
    """`model` if it is a Runtime already, else the Runtime loaded from that model id /
    path (None: the default model)."""
    if hasattr(model, "adapter"):
        return model
    from app.runtime.engine import Runtime
    return Runtime.load(model, **load)


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


def config_hash(model) -> str:
    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def train_heads(model, out_dir, data_files=(), steps=1200, docs=128, val_docs=8, doc_tokens=2048,
                d_r=128, lr=2e-3, warmup=60, seed=0, threads=2, progress=None, command="",
                label_mode="shared", distractors=0) -> dict:
    """Train heads for `model` (a Runtime, or a model id / path / None for the default).

    progress(stage, done, total) with stage "collect" or "train". Writes OUT/heads.safetensors
    and OUT/card.json; returns the card. Re-running with the same OUT resumes.
    """
    torch.set_num_threads(threads)
    t0 = time.time()
    rt = runtime(model, device="cpu")
    adapter, info = rt.adapter, rt.adapter.info
    out = Path(out_dir)
    (out / ".features").mkdir(parents=True, exist_ok=True)
    text, prov = load_text(data_files)
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
    heads = RetainingHeads(info.n_layers, info.hidden_size, d_r, info.n_kv_heads, adapter.hidden_act)
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
        "model": rt.model_id, "model_key": model_key(info), "config_hash": config_hash(adapter.model),
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
