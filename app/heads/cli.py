"""`main.py train-heads`: its options, progress bar and summary line."""
from __future__ import annotations

import sys
import time

from ..runtime.eta import Eta
from .labels import TARGETS
from .official import import_official
from .train import train_heads


def add_parser(sub):
    p = sub.add_parser("train-heads", help="train Locret retaining heads for a model (backbone frozen)")
    p.add_argument("--model", default=None, help="model id, folder or .gguf (default: the embedded model)")
    p.add_argument("--out", default=None, help="output folder: heads.safetensors, card.json, checkpoints "
                   "(default: this machine's heads folder for the model, where `locret` finds them next time)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--features", choices=("auto", "disk", "recompute"), default="auto",
                   help="the backbone's hidden states per step: cached on disk (auto on CPU) or recomputed "
                        "by one forward per step (auto on CUDA: no disk, never all held)")
    p.add_argument("--data", nargs="*", default=[], help="text files, each document from one, drawn alike (default: "
                   "data/train/python_topics.txt; several genres ship beside it: code.txt, changelogs.txt, tables.txt)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--docs", type=int, default=96, help="training documents (96 and 600 steps: the shipped heads' recipe)")
    p.add_argument("--doc-tokens", type=int, default=2048,
                   help="prose tokens per training document (2048: the shipped heads'; BENCHMARKS.md has shorter ones)")
    p.add_argument("--width", type=int, default=128, help="hidden width of each head")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distractors", type=int, default=0,
                   help="fact-shaped sentences per training document that no question asks about (default 0)")
    p.add_argument("--same-shape", type=float, default=0.0,
                   help="share of training documents whose facts are all of one family about distinct entities, "
                        "each asked (similar facts to tell apart; default 0)")
    p.add_argument("--labels", choices=TARGETS, default="shared",
                   help="regression target: shared (max over layers of z-scored labels, default) or layer (Locret's)")
    p.add_argument("--import", dest="import_ckpt", default=None,
                   help="fold an official Locret checkpoint (.bin/.pt) into heads for --model instead of training")
    return p


class Progress:
    """A bar per phase with its rate and ETA (`eta.Eta`, as the app's label has them), redrawn
    at most once a second."""

    def __init__(self, out=None):
        self.out, self.stage, self.t0, self.last, self.eta = out, None, 0.0, 0.0, Eta()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        if stage != self.stage:  # a resumed phase starts part-way: the rate counts from its first report
            self.stage, self.t0, self.last, self.eta = stage, now, 0.0, Eta()
        _, left = self.eta.update(done, total)
        if now - self.last < 1 and done != total:
            return
        self.last = now
        bar = "#" * int(30 * done / total)
        tail = "done" if done == total else f"ETA {_clock(left)}"
        print(f"\r{stage:9s} [{bar:<30}] {done}/{total}  {_clock(now - self.t0)} elapsed, {tail}   ",
              end="\n" if done == total else "", file=self.out or sys.stderr)


def _clock(s: float | None) -> str:
    if s is None:  # (Eta's first report of a phase: no rate yet)
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run(args) -> int:
    if args.import_ckpt:
        card = import_official(args.import_ckpt, args.model, args.out)
        print(f"imported {card['tensors_loaded']} tensors from {args.import_ckpt} into {args.out}")
        return 0
    progress = Progress()
    card = train_heads(args.model, args.out, args.data, steps=args.steps, docs=args.docs,
                       doc_tokens=args.doc_tokens, d_r=args.width, lr=args.lr, threads=args.threads,
                       label_mode=args.labels, distractors=args.distractors, same_shape=args.same_shape,
                       device=args.device, features_mode=args.features, progress=progress,
                       command="python main.py " + " ".join(sys.argv[1:]))
    v = card["validation"]["after"]
    print(f"wrote {card['out']}/heads.safetensors in {card['wall_time_s']:.0f} s; held-out loss {v['loss']}, "
          f"top-10% overlap {v['top10_overlap']:.3f}")
    return 0
