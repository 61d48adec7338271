"""`main.py bench SUITE`: one benchmark suite for memory, speed and quality.

Every suite prints a Markdown table (progress on stderr), writes `SUITE.json` with the
machine and commit, and PNG plots, under `--out` (default bench-out/). The probe-* suites
are diagnostics for a GPU (where a decode step's time goes, whether host memory pins
exactly): they print what they find and write nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUITES = ("memory", "speed", "quality", "gpu128k", "soak", "kernels", "probe-attn", "probe-decode", "probe-pinned",
          "serve", "reopen", "ruler", "panel", "scale")
PROBE_VARIANTS = "torch window fused"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(SUITES),
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--model", default=None, help="model for memory/speed/quality (default: the embedded one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="auto", choices=["auto", "bf16", "fp16", "fp32", "8bit", "4bit"])
    p.add_argument("--policies", default=None, help="space-separated specs, e.g. \"full kivi locret:budget=1024\"")
    p.add_argument("--lengths", default=None, help="context lengths, comma-separated (e.g. 1024,4096)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--decode", type=int, default=None, help="decoded tokens per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=1,
                   help="speed: decode timed in this many interleaved rounds over kept caches (median; for a "
                        "shared machine whose load drifts)")
    p.add_argument("--out", default="bench-out", help="folder for JSON and PNG output")
    p.add_argument("--baselines", default="generate,quantized",
                   help="speed: transformers baselines to run, any of generate,quantized, or none "
                        "(quantized = transformers' QuantizedCache, 4-bit, quanto backend: pip install -e .[bench])")
    p.add_argument("--trials", type=int, default=None, help="quality: trials per cell (kvbits: 0 runs no pass key)")
    p.add_argument("--parts", default=None,
                   help="quality: comma-separated parts, any of kl,lazy,passkey,ffnskip,random-heads,needles,copy,"
                        "kvbits,labels, and dense (run only when named: hours at its defaults on a CPU), hosttier, "
                        "sources and sources-depths (run only when named) (default: all but those; kvbits, dense, "
                        "hosttier and sources take whole specs in --policies)")
    p.add_argument("--kinds", default=None,
                   help="quality, part dense: comma-separated kinds, any of multikey,multivalue,after-turn (default: all)")
    p.add_argument("--tasks", default=None,
                   help="ruler: comma-separated RULER tasks as lm-eval names them (default niah_single_1,"
                        "niah_multikey_2,niah_multikey_3; generated here: also vt,cwe,fwe)")
    p.add_argument("--limit", type=int, default=5, help="ruler: samples per task, length and policy (default 5)")
    p.add_argument("--turns", type=int, default=100,
                   help="soak: turns per policy against one document (its length: first of --lengths, default 8192)")
    g = p.add_argument_group("gpu128k")
    g.add_argument("--shape", default=None, choices=["llama3-8b", "tiny"],
                   help="gpu128k (default llama3-8b), probe-decode and speed: a random-weight model of this shape, with "
                        "random retaining heads and offload channels, instead of --model (speed only, no hub)")
    g.add_argument("--context", type=int, default=None,
                   help="prompt tokens: gpu128k (default 131072) and probe-decode (default 32768)")
    g.add_argument("--cap-gib", type=float, default=24.0, help="cap the card to this many GiB")
    g.add_argument("--allow-cpu", action="store_true", help="run gpu128k on the CPU (smoke test, tiny shape)")
    p.add_argument("--seed", type=int, default=0, help="scale: picks the document's pass key and needle values (a trial)")
    g = p.add_argument_group("probe-decode")
    g.add_argument("--variants", default=PROBE_VARIANTS,
                   help="decode-step kernels to A/B, any of torch (as transformers and torch have them), "
                        "window (the Triton window kernel), fused (window + fused norm and RoPE)")
    g.add_argument("--profile", default=PROBE_VARIANTS, help="variants whose kernels to profile")


NEEDS = {"matplotlib": "matplotlib (plots)", "optimum.quanto": "optimum-quanto (transformers' QuantizedCache peer)",
         "lm_eval": "lm-eval (bench ruler: RULER's tasks and the stock client)"}


def missing() -> list[str]:
    """What the suites use that is not installed (the `bench` extra), as 'package (what for)'."""
    import importlib.util

    def found(mod: str) -> bool:
        try:
            return importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False
    return [what for mod, what in NEEDS.items() if not found(mod)]


def _list(text, cast=str, sep=None):
    return tuple(cast(x) for x in text.replace(sep or " ", " ").split()) if text else None


def run(args) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    pols = _list(args.policies)
    lengths = _list(args.lengths, int, ",")
    parts = _list(args.parts, str, ",")
    kinds = _list(args.kinds, str, ",")
    if args.suite == "quality":
        from .quality import PARTS, check_parts
        parts = parts or PARTS
        try:
            check_parts(parts, pols, kinds)  # before the model loads
        except ValueError as e:
            raise SystemExit(str(e)) from None
    elif args.suite == "ruler":
        from .ruler import check_tasks
        check_tasks(_list(args.tasks, str, ",") or ())  # before the model loads
        if args.limit < 1:
            raise SystemExit(f"bench ruler: --limit {args.limit}: must be at least 1")
    if args.suite != "quality" and (parts or kinds):
        raise SystemExit(f"bench {args.suite}: --parts and --kinds are for the quality suite")
    gone = missing()
    if gone:
        print(f"bench: not installed: {', '.join(gone)}; those parts are skipped. `bash scripts/setup.sh` "
              "installs them (the `bench` extra: pip install -e '.[bench]')", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if args.suite == "gpu128k":
        from . import gpu128k
        weights = "4bit" if args.weights == "4bit" else "bf16"
        gpu128k.run(shape=args.shape or "llama3-8b", context=args.context or 131072, decode=args.decode or 128,
                    cap_gib=args.cap_gib, weights=weights, policies=pols or gpu128k.POLICIES, allow_cpu=args.allow_cpu, out_dir=out)
    elif args.suite.startswith("probe-"):
        _probe(args, pols)
        return 0
    elif args.suite == "kernels":
        from . import kernels
        kernels.run(lengths=lengths or (8192, 32768, 131072), device=None if args.device == "auto" else args.device,
                    out_dir=out)
    else:
        kw = {k: v for k, v in (("policies", pols), ("lengths", lengths)) if v}
        files = None
        if args.shape:
            if args.suite != "speed":
                raise SystemExit(f"bench {args.suite}: --shape is for the gpu128k, probe-decode and speed suites")
            from .random_model import random_adapter
            rt, files = random_adapter(args.shape, args.device)
        else:
            from app.runtime.engine import Runtime
            rt = Runtime.load(args.model, device=args.device, weights=args.weights)
        if args.suite == "memory":
            from . import memory
            memory.run(rt, chunk=args.chunk, decode=args.decode or 16, out_dir=out, **kw)
        elif args.suite == "speed":
            from . import speed
            names = dict(zip(("generate", "quantized"), speed.BASELINES))
            chosen = [names[b] for b in _list(args.baselines, str, ",") or () if b in names]
            speed.run(rt, chunk=args.chunk, decode=args.decode or 16, baselines=chosen,
                      out_dir=out, files=files, rounds=args.rounds, **kw)
        elif args.suite == "soak":
            from . import soak
            soak.run(rt, policies=pols or soak.DEFAULT_POLICIES, turns=args.turns, max_new=args.decode or 16,
                     doc_tokens=lengths[0] if lengths else 8192, out_dir=out)
        elif args.suite == "serve":
            from . import serve
            serve.run(rt, decode=args.decode or 64, trials=args.trials or 3, out_dir=out, **kw)
        elif args.suite == "ruler":
            from . import ruler
            ruler.run(rt, policies=pols or ruler.DEFAULT_POLICIES, lengths=lengths or ruler.DEFAULT_LENGTHS,
                      tasks=_list(args.tasks, str, ",") or ruler.DEFAULT_TASKS, limit=args.limit, out_dir=out)
        elif args.suite == "panel":
            from . import panel
            panel.run(rt, policies=pols or panel.DEFAULT_POLICIES, lengths=lengths or panel.DEFAULT_LENGTHS,
                      rounds=args.rounds, out_dir=out)
        elif args.suite == "scale":
            from . import scale
            scale.run(rt, policies=pols, lengths=lengths, decode=args.decode or 12, out_dir=out, seed=args.seed)
        elif args.suite == "reopen":
            from . import reopen
            reopen.run(rt, decode=args.decode or 16, trials=args.trials or 3, out_dir=out, **kw)
        else:
            from . import quality
            quality.run(rt, out_dir=out, trials=args.trials, parts=parts, kinds=kinds, **kw)
    print(f"\n{args.suite}: {time.perf_counter() - t0:,.0f} s on {torch.get_num_threads()} threads; "
          f"JSON and plots in {out}/")
    return 0


def _probe(args, pols) -> None:
    if args.suite == "probe-attn":
        from . import probe_attn
        probe_attn.run()
    elif args.suite == "probe-pinned":
        from . import probe_pinned
        probe_pinned.run()
    else:
        from . import probe_decode
        probe_decode.run(context=args.context or 32768, policies=pols or ("full",), variants=_list(args.variants) or (),
                         profiled=_list(args.profile) or (), cap_gib=args.cap_gib, shape=args.shape)
