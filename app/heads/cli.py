"""`main.py train-heads`: its options, progress bar and summary line."""
from __future__ import annotations

import sys
import time

from .labels import TARGETS
from .official import import_official
from .train import train_heads


def add_parser(sub):
    p = sub.add_parser("train-heads", help="train Locret retaining heads for a model (backbone frozen)")
    p.add_argument("--model", default=None, help="model id, folder or .gguf (default: the embedded model)")
    p.add_argument("--out", required=True, help="output folder: heads.safetensors, card.json, checkpoints")
    p.add_argument("--data", nargs="*", default=[], help="prose text files (default: data/train/python_topics.txt)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--docs", type=int, default=128, help="training documents")
    p.add_argument("--doc-tokens", type=int, default=2048,
                   help="prose tokens per training document (2048: the shipped heads'; BENCHMARKS.md has shorter ones)")
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
