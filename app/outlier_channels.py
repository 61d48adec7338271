"""`main.py calibrate`: measures which channels of a model's keys are outliers, for the
label caches of `offload` and `doublesparse` (the "qk" statistic and the channels file
are offload/calibrate.py's).

Text is tokenized whole and cut into blocks of `--block` tokens; each block is one forward
through the model (a fresh `full` cache), and every layer's post-RoPE q/k of every token
adds to the running sums. The default text is the repository's prose under data/train,
else CPython's PSF-licensed `pydoc_data/topics.py`.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch

from offload.calibrate import QKStats, model_key, save
from policies import Chunk, KVCache

ROOT = Path(__file__).resolve().parents[1]


def default_data() -> list[Path]:
    own = ROOT / "data" / "train" / "python_topics.txt"
    if own.is_file():
        return [own]
    import pydoc_data.topics
    return [Path(pydoc_data.topics.__file__)]


def read_text(files) -> tuple[str, str]:
    """-> (text, provenance line naming each file, its size and sha256 prefix)."""
    parts, prov = [], []
    for f in map(Path, files):
        t = f.read_text(encoding="utf-8", errors="replace")
        if len(t) < 2000:
            raise ValueError(f"{f}: only {len(t)} characters; calibration needs real prose (a few KB at least)")
        parts.append(t)
        shown = f.resolve().relative_to(ROOT) if f.resolve().is_relative_to(ROOT) else f.name
        prov.append(f"{shown} ({len(t)} chars, sha256 {hashlib.sha256(t.encode()).hexdigest()[:16]})")
    return "\n\n".join(parts), "; ".join(prov)


@torch.inference_mode()
def collect(adapter, blocks, progress=None) -> QKStats:
    """Run each token block ([T] ids) through the model; -> accumulated qk statistics."""
    info = adapter.info
    stats = QKStats(info.n_layers, info.n_kv_heads, info.head_dim)
    for b, ids in enumerate(blocks):
        cache = KVCache("full", info)
        for layer in cache.layers:
            orig = layer.forward

            def spy(q, k, v, scale, chunk, _orig=orig, _i=layer.layer):
                stats.add(_i, q, k)  # q [Hq, T, D], k [Hkv, T, D] post-RoPE
                return _orig(q, k, v, scale, chunk)
            layer.forward = spy
        chunk = Chunk(ids.to(info.device), 0)
        adapter.forward(chunk.input_ids, cache, chunk)
        if progress is not None:
            progress(b + 1, len(blocks))
    return stats


def calibrate(adapter, text: str, blocks: int = 64, block: int = 512, progress=None):
    """-> (QKStats, tokens used): up to `blocks` consecutive blocks of `block` tokens of text."""
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(blocks, len(ids) // block)
    if n < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one block of {block}")
    chunks = [torch.tensor(ids[i * block:(i + 1) * block]) for i in range(n)]
    return collect(adapter, chunks, progress), n * block


def add_parser(sub):
    p = sub.add_parser("calibrate", help="outlier channels for the label caches of offload / doublesparse")
    p.add_argument("--model", default=None, help="model id, folder or .gguf (default: the embedded model)")
    p.add_argument("--data", nargs="*", default=[], help="prose text files (default: data/train/python_topics.txt, "
                   "else CPython's pydoc_data/topics.py)")
    p.add_argument("--out", default=None, help="output .safetensors file (default: this machine's channels folder "
                   "for the model, where offload / doublesparse find them next time)")
    p.add_argument("--channels", type=int, default=16, help="channels recorded as the default r")
    p.add_argument("--blocks", type=int, default=64, help="calibration blocks")
    p.add_argument("--block", type=int, default=512, help="tokens per block")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    return p


def run(args) -> int:
    from app.runtime.engine import Runtime
    torch.set_num_threads(args.threads)
    rt = Runtime.load(args.model, device=args.device)
    files = args.data or default_data()
    text, prov = read_text(files)
    t0 = time.time()
    stats, n_tok = calibrate(rt.adapter, text, args.blocks, args.block,
                             lambda d, n: print(f"\rblock {d}/{n}", end="\n" if d == n else "", file=sys.stderr))
    names = [rt.model_id]
    command = "python main.py calibrate " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["calibrate"] else sys.argv[1:])
    out = args.out
    if out is None:
        from app.runtime.paths import trained_dir
        from policies.files import user_folder
        out = user_folder(trained_dir(), "channels", rt.adapter.info) / "channels.safetensors"
    path = save(out, stats.mean(), args.channels, model_key(rt.adapter.info), names, n_tok,
                f"{n_tok} tokens in {n_tok // args.block} blocks of {args.block} from {prov}", command)
    print(f"wrote {path}: {rt.adapter.info.n_layers} layers x {rt.adapter.info.n_kv_heads} KV heads, "
          f"top {args.channels} of {rt.adapter.info.head_dim} channels, {n_tok} tokens, {time.time() - t0:.0f} s")
    return 0
