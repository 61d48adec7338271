"""`train-heads`: train Locret retaining heads for a model, backbone frozen.

Documents come from app/heads/data.py, labels and the heads' inputs from
app/heads/labels.py; labels (and on the CPU the inputs) are cached under OUT/.features so
an interrupted run resumes, and training checkpoints every 100 steps.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from app.runtime.paths import trained_dir
from app.runtime.types import Stopped, VramchatError
from policies.files import user_folder
from policies.locret import RetainingHeads, model_key, save_heads

from .data import load_texts, make_example
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
    """docs: an iterable of (hidden, targets) -> {loss, loss_per_layer, top10_overlap_per_layer,
    top10_overlap}, the mean over those held-out documents (read one at a time)."""
    loss = overlap = None
    n = 0
    for hidden, labels in docs:
        L = hidden.shape[0]
        if loss is None:
            loss, overlap = torch.zeros(L), torch.zeros(L)
        _, per = head_loss(heads, hidden.float(), labels)
        loss += per.cpu()
        for i in range(L):
            pred = heads.layer(i, hidden[i].float()).t()
            k = max(1, pred.shape[1] // 10)
            top_p, top_l = pred.topk(k, 1).indices, labels[i].topk(k, 1).indices
            hit = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, top_p, True).gather(1, top_l)
            overlap[i] += hit.float().mean().cpu()
        n += 1
    loss, overlap = loss / n, overlap / n
    return {"loss": round(loss.mean().item(), 4), "loss_per_layer": [round(v, 4) for v in loss.tolist()],
            "top10_overlap": round(overlap.mean().item(), 4),
            "top10_overlap_per_layer": [round(v, 3) for v in overlap.tolist()]}


def config_hash(model) -> str:
    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


PHASE_UNITS = {"documents": "docs", "features": "docs", "steps": "steps"}  # what each phase's progress counts


def train_heads(model, out_dir=None, data_files=(), steps=600, docs=96, val_docs=8, doc_tokens=2048,
                d_r=128, lr=2e-3, warmup=60, seed=0, threads=2, progress=None, command="",
                label_mode="shared", distractors=0, device="auto", features_mode="auto", stop=None,
                same_shape=0.0) -> dict:
    """Train heads for `model` (a Runtime, or a model id / path / None for the default).

    Phases, each reported as progress(phase, done, total) in its `PHASE_UNITS`: "documents"
    (training documents built), "features" (one frozen forward per document: labels, and with
    features on disk the heads' inputs), "steps" (head training). The backbone's hidden states are never all
    held: each step reads one document's, from disk ("disk") or from a fresh forward
    ("recompute": no disk, one forward per step; the default on CUDA, where a forward costs
    less than reading the hidden states back). A set `stop` event raises Stopped between
    documents or steps; checkpoints (every 100 steps) and finished documents make the next
    run with the same OUT resume. OUT defaults to this machine's heads folder for the model
    (found there by `locret` next time). Writes OUT/heads.safetensors and OUT/card.json;
    returns the card."""
    torch.set_num_threads(threads)
    t0 = time.time()
    rt = runtime(model, device=device)
    adapter, info = rt.adapter, rt.adapter.info
    if features_mode == "auto":
        features_mode = "recompute" if info.device.type == "cuda" else "disk"
    if features_mode not in ("disk", "recompute"):
        raise VramchatError(f"--features {features_mode!r}: must be auto, disk or recompute")
    out = Path(out_dir) if out_dir else default_out(info)
    feats = out / ".features"
    feats.mkdir(parents=True, exist_ok=True)
    texts, prov = load_texts(data_files)
    built = {"docs": docs, "val_docs": val_docs, "doc_tokens": doc_tokens, "distractors": distractors,
             "seed": seed, "files": prov, "d_r": d_r, "labels": label_mode, "same_shape": same_shape}
    # (what cached features and a checkpoint depend on: steps, lr and warmup may change between
    # a run and its resume)
    made = feats / "documents.json"
    if made.is_file() and json.loads(made.read_text()) != built:
        if out_dir:
            raise VramchatError(f"{out} holds a run with {made.read_text()}; this run is {json.dumps(built)}: "
                                "give another --out, or the same settings to resume it")
        _discard_run(out)  # the model's own folder: a run with other settings starts over there
    made.write_text(json.dumps(built))
    total = docs + val_docs
    phases = {}
    mark = time.time()
    examples = _documents(rt.tok, texts, total, docs, doc_tokens, distractors, seed, progress, stop, same_shape)
    phases["documents"], mark = round(time.time() - mark, 1), time.time()
    labels = []
    if progress:  # where the phase starts: its rate counts from here
        progress("features", 0, total)
    for j, (ids, n_ctx) in enumerate(examples):
        _check_stop(stop)
        labels.append(_labels_of(adapter, feats, j, ids, n_ctx, features_mode))
        if progress:
            progress("features", j + 1, total)
    source = _Source(adapter, feats, examples, labels, features_mode, label_mode)
    phases["features"], mark = round(time.time() - mark, 1), time.time()
    torch.manual_seed(seed)
    heads = RetainingHeads(info.n_layers, info.hidden_size, d_r, info.n_kv_heads, adapter.hidden_act)
    heads.to(info.device)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, 1 - (s - warmup) / max(1, steps - warmup)))
    start = _resume(out, heads, opt, sched)
    val = range(docs, total)
    before = evaluate(heads, (source.get(j) for j in val)) if start == 0 else None
    if progress and start < steps:  # (a run that had finished reports no steps)
        progress("steps", start, steps)
    for step in range(start, steps):
        if stop is not None and stop.is_set() and step > start:
            _checkpoint(out, heads, opt, step)  # a stop keeps every finished step
        _check_stop(stop)
        hidden, target = source.get(random.Random(seed * 1_000_003 + step).randrange(docs))
        loss, _ = head_loss(heads, hidden.float(), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 0.5)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            _checkpoint(out, heads, opt, step + 1)
        if progress:
            progress("steps", step + 1, steps)
    after = evaluate(heads, (source.get(j) for j in val))
    phases["steps"] = round(time.time() - mark, 1)
    names = [rt.model_id]
    card = {
        "model": rt.model_id, "model_key": model_key(info), "config_hash": config_hash(adapter.model),
        "command": command, "wall_time_s": round(time.time() - t0, 1), "threads": threads,
        "device": str(info.device), "features": features_mode, "phase_s": phases,
        "peak_device_bytes": torch.cuda.max_memory_allocated(info.device) if info.device.type == "cuda" else None,
        "hyper_parameters": {"steps": steps, "docs": docs, "val_docs": val_docs, "doc_tokens": doc_tokens,
                             "distractors": distractors, "same_shape": same_shape, "d_r": d_r, "lr": lr,
                             "warmup": warmup,
                             "schedule": "linear warmup, linear decay",
                             "optimizer": "AdamW(0.9, 0.95), wd 0.01", "grad_clip": 0.5,
                             "loss": "SmoothL1 + 2.5e-3 * adjacent MSE", "seed": seed,
                             "input": "post-input_layernorm hidden state", "act": heads.act_name},
        "data": {"files": prov, "held_out": "documents built from the last 10% of each text",
                 "labels": "max pre-softmax logit from the queries of a question/answer pair per inserted "
                           "fact, max over GQA group",
                 "distractors": f"{distractors} fact-shaped sentences per document from templates no question "
                                "asks about" if distractors else "none",
                 "same_shape": f"{same_shape:.0%} of documents hold facts of one family about distinct "
                               "entities (each asked)" if same_shape else "none",
                 "genres": "one text per document, drawn alike" if len(texts) > 1 else "one text",
                 "targets": label_mode + (": z-scored per layer and head, max over layers and heads"
                                          if label_mode == "shared" else ": per layer")},
        "validation": {"before": before, "after": after},
    }
    save_heads(heads, out / "heads.safetensors", model_key(info), names, {"config_hash": card["config_hash"]})
    (out / "card.json").write_text(json.dumps(card, indent=1))
    return {**card, "out": str(out)}


def default_out(info) -> Path:
    """This machine's heads folder for the model (`locret` looks there before the shipped ones)."""
    return user_folder(trained_dir(), "heads", info)


def _discard_run(out: Path) -> None:
    """Remove an unfinished run's cached features and checkpoint from `out` (finished heads stay
    until the new ones replace them)."""
    for f in (out / ".features").glob("*"):
        if f.is_file():
            f.unlink()
    (out / "checkpoint.safetensors").unlink(missing_ok=True)


def _check_stop(stop) -> None:
    if stop is not None and stop.is_set():
        raise Stopped("training stopped; run the same command again to resume where it stopped")


def _documents(tok, texts, total, docs, doc_tokens, distractors, seed, progress, stop, same_shape=0.0):
    """-> [(ids [T], n_ctx)] for the training documents, then the held-out ones (built from
    the last 10 % of each text). With several texts (genres) each document draws one, all
    alike; with one, nothing is drawn (the documents of a one-file run stay the same)."""
    out = []
    if progress:
        progress("documents", 0, total)
    for j in range(total):
        _check_stop(stop)
        rng = random.Random(seed * 100003 + j)
        text = texts[rng.randrange(len(texts))] if len(texts) > 1 else texts[0]
        split = int(len(text) * 0.9)
        out.append(make_example(tok, rng, text[:split] if j < docs else text[split:], doc_tokens, distractors,
                                same_shape))
        if progress:
            progress("documents", j + 1, total)
    return out


def _labels_of(adapter, feats: Path, j: int, ids, n_ctx: int, mode: str) -> torch.Tensor:
    """Document j's labels [L, Hkv, n_ctx], from the features folder or one forward (whose
    hidden states are kept on disk in mode "disk")."""
    from safetensors.torch import save_file
    for f in (feats / f"doc{j:04d}.safetensors", feats / f"labels{j:04d}.safetensors"):
        if f.is_file():
            return _read(f, "labels")
    h, lab = features(adapter, ids, n_ctx)
    if mode == "disk":
        save_file({"hidden": h, "labels": lab}, str(feats / f"doc{j:04d}.safetensors"))
    else:
        save_file({"labels": lab}, str(feats / f"labels{j:04d}.safetensors"))
    return lab


def _read(f: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(str(f), "pt") as fh:
        return fh.get_tensor(name)


class _Source:
    """One document's (hidden [L, n_ctx, hidden], targets [L, Hkv, n_ctx]) on the device at a
    time: hidden states read from disk or recomputed, never all held."""

    def __init__(self, adapter, feats, examples, labels, mode, label_mode):
        self.adapter, self.feats, self.examples, self.mode = adapter, feats, examples, mode
        self.targets = [targets(lab, label_mode) for lab in labels]

    def get(self, j: int):
        dev = self.adapter.info.device
        f = self.feats / f"doc{j:04d}.safetensors"
        if f.is_file():
            hidden = _read(f, "hidden")
        else:
            hidden, _ = features(self.adapter, *self.examples[j])
        return hidden.to(dev), self.targets[j].to(dev)


def _checkpoint(out, heads, opt, step):
    from safetensors.torch import save_file
    state = {f"heads.{k}": v.detach().cpu().clone() for k, v in heads.state_dict().items()}
    for gi, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                state[f"opt.{gi}.{name}"] = st[name].cpu().clone()
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
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": state[f"opt.{gi}.exp_avg"].to(p.device),
                            "exp_avg_sq": state[f"opt.{gi}.exp_avg_sq"].to(p.device)}
    sched.last_epoch = step
    for g, base in zip(opt.param_groups, sched.base_lrs):
        g["lr"] = base * sched.lr_lambdas[0](step)
    return step


# FLOP/s the recipe reaches: the shipped heads' run on the 2-core CPU (96 + 8 documents of
# 2,048 tokens, 600 steps, 135M parameters: 489 s) sets the CPU's; the GPU's is a guess
# (a quarter of an H100's bf16 peak) until a GPU run measures it.
_RATE = {"cpu": 3.0e11, "cuda": 2.5e14}


def estimate_seconds(params: int, info, device: str, docs: int = 96, val_docs: int = 8, steps: int = 600,
                     doc_tokens: int = 2048, d_r: int = 128) -> float:
    """A rough wall time for `train_heads` with these settings: one forward per document
    (three per token of a ~2x longer document, with its questions), plus per step the
    heads' forward and backward, and on CUDA one more forward (features recomputed)."""
    forward = 2 * params * doc_tokens * 2
    heads = 6 * info.n_layers * doc_tokens * d_r * (info.hidden_size + info.n_kv_heads)
    flops = (docs + val_docs) * forward + steps * (heads + (forward if device == "cuda" else 0))
    return flops / _RATE["cuda" if device == "cuda" else "cpu"]
