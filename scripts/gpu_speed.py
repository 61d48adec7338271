"""`bench speed` on a CUDA machine with the 8B Llama-3.1-shaped random model (no hub here):
policies against transformers' `generate` in the same run, random retaining heads (speed
does not depend on their values). Run: `python scripts/gpu_speed.py --out DIR`."""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
from app.bench import gpu128k, speed  # noqa: E402
from app.runtime.adapter import Adapter  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="bench-out/speed")
ap.add_argument("--lengths", default="4096,16384")
ap.add_argument("--decode", type=int, default=32)
ap.add_argument("--shape", default="llama3-8b", help="tiny: a CPU smoke test")
a = ap.parse_args()
dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
ad = Adapter(gpu128k.build_model(a.shape, dev, "bf16"), None, f"random {a.shape} (bf16)")
heads = gpu128k.random_heads_dir(ad.info)
P = f"locret:heads={heads},budget=2048"
speed.run(ad, policies=("full", P, P + "+kivi"), lengths=tuple(int(x) for x in a.lengths.split(",")), chunk=2048,
          decode=a.decode, baselines=("hf generate",), out_dir=Path(a.out))
