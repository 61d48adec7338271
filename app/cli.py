"""Command-line front end: argument parsing and the headless commands.

`main.py` calls `main(argv)`. The TUI lives in app.ui and is imported only by `chat`.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time



def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id, model folder or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--policy", default=None, help="KV-cache policy spec, e.g. full, locret:budget=2048+kivi "
                   "(default: full, or the config file's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--weights", default="auto", choices=["auto", "bf16", "fp16", "fp32", "8bit", "4bit"],
                   help="weight precision; 8bit/4bit use bitsandbytes and need CUDA")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk in tokens "
                   "(default 512 on CPU, 2048 on CUDA; a policy's own chunk= wins)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def _sampling(p: argparse.ArgumentParser, temperature: float | None) -> None:
    """`ask` has fixed defaults (greedy); `chat` leaves them None so the config file decides."""
    chat = temperature is None
    p.add_argument("--max-new-tokens", type=int, default=None if chat else 512)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None if chat else 1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")


def parser() -> argparse.ArgumentParser:
    from policies import REGISTRY
    import offload  # noqa: F401  (registers its policies)

    pols = "\n".join(f"  {n:<14} {e.summary}" for n, e in sorted(REGISTRY.items()))
    ap = argparse.ArgumentParser(
        prog="main.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="vramchat: chat with a local LLM about very long documents.",
        epilog=f"policies (combine with +, options with name:key=val,...):\n{pols}")
    sub = ap.add_subparsers(dest="command")
    chat = sub.add_parser("chat", help="the terminal app (default)")
    _common(chat)
    _sampling(chat, None)
    chat.add_argument("--doc", action="append", default=[], help="document to load at start (repeatable)")
    ask = sub.add_parser("ask", help="answer questions about documents, headless")
    _common(ask)
    _sampling(ask, 0.0)
    ask.add_argument("--doc", action="append", default=[], help="document to read first (repeatable)")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("questions", nargs="+", help="each question is its own turn, after the documents")
    from app import bench, outlier_channels
    from app.heads import cli as heads_cli
    bench.add_parser(sub)
    heads_cli.add_parser(sub)
    outlier_channels.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["chat", *argv]
    args = parser().parse_args(argv)
    from app.runtime.types import VramchatError
    from policies import SpecError
    try:
        if args.command == "ask":
            return cmd_ask(args)
        if args.command == "bench":
            from app import bench
            return bench.run(args)
        if args.command == "train-heads":
            from app.heads import cli as heads_cli
            return heads_cli.run(args)
        if args.command == "calibrate":
            from app import outlier_channels
            return outlier_channels.run(args)
        return cmd_chat(args)
    except (VramchatError, SpecError) as e:
        print(f"vramchat: {e}", file=sys.stderr)
        return 2


def _load_runtime(args, status=None):
    from app.runtime.engine import Runtime
    rt = Runtime.load(args.model, policy=args.policy or "full", device=args.device, weights=args.weights,
                      chunk_size=args.chunk_size, trust_remote_code=args.trust_remote_code, status=status)
    if args.system:
        rt.set_system(args.system)
    for w in rt.policy_warnings():
        print(f"vramchat: warning: {w}", file=sys.stderr)
    return rt


def _sampling_of(args):
    from app.runtime.sampling import validate
    from app.runtime.types import Sampling
    return validate(Sampling(args.temperature, args.top_p, args.top_k, args.seed))


class _StopOnCtrlC:
    """First Ctrl-C sets the stop flag (the answer ends, the session stays); a second exits."""

    def __init__(self):
        self.event = threading.Event()

    def __enter__(self):
        def handler(sig, frame):
            if self.event.is_set():
                raise KeyboardInterrupt
            self.event.set()
        self._old = signal.signal(signal.SIGINT, handler)
        return self.event

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def _progress(label: str):
    t0 = time.perf_counter()

    def cb(done, total):
        rate = done / max(time.perf_counter() - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0
        print(f"\r{label}: {done:,}/{total:,} tokens  {rate:,.0f} tok/s  ETA {eta:,.0f}s ",
              end="" if done < total else "\n", file=sys.stderr, flush=True)
    return cb


def cmd_ask(args) -> int:
    from app.runtime.types import Stopped
    sampling = _sampling_of(args)
    quiet = args.json
    rt = _load_runtime(args, None if quiet else (lambda s: print(s, file=sys.stderr)))
    docs = []
    with _StopOnCtrlC() as stop:
        for path in args.doc:
            info = rt.load_document(path, None if quiet else _progress(f"reading {path}"), stop)
            docs.append({"name": info.name, "tokens": info.tokens, "prefill_s": round(info.prefill_s, 3)})
        answers = []
        for q in args.questions:
            if stop.is_set():
                break
            if not quiet:
                print(f"\n> {q}", flush=True)
            on_tok = None if quiet else (lambda s: print(s, end="", flush=True))
            try:
                res = rt.ask(q, max_new_tokens=args.max_new_tokens, sampling=sampling, on_token=on_tok, stop=stop)
            except Stopped:
                break
            answers.append(res)
            if not quiet:
                mark = " [stopped]" if res.stopped else ""
                print(f"{mark}\n  ({res.new_tokens} tokens, TTFT {res.ttft_s:.2f}s, "
                      f"{res.decode_tok_s:.1f} tok/s, policy {res.policy})", flush=True)
    if quiet:
        mem = rt.memory()
        out = {
            "model": rt.model_id, "policy": rt.policy, "warnings": rt.policy_warnings(), "device": mem.device,
            "weights": rt.weights,
            "documents": docs, "context_tokens": rt.context().read, "retained_tokens": rt.context().retained,
            "answers": [{k: v for k, v in a.to_json().items()} for a in answers],
            "memory": {"kv_bytes": {"gpu": mem.kv_total("gpu"), "host": mem.kv_total("host")},
                       "kv_bytes_by_kind": mem.kv, "kv_peak_bytes": mem.kv_peak_bytes,
                       "weights_bytes": mem.weights_bytes, "rss_peak_bytes": mem.rss_peak,
                       "gpu_peak_bytes": mem.torch_peak},
        }
        print(json.dumps(out, indent=1))
    return 130 if stop.is_set() else 0


def cmd_chat(args) -> int:
    from app.ui import run
    return ui_main(args, run)


def ui_main(args, run) -> int:
    """The Textual app: the config file gives defaults; command-line options win."""
    from app import config as cfgmod
    try:
        cfg = cfgmod.load_config()
    except cfgmod.ConfigError as e:
        print(f"vramchat: {e}", file=sys.stderr)
        return 2
    for key in ("model", "policy", "max_new_tokens", "temperature", "top_p"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    args.model = cfg.model or None
    args.policy = cfg.policy or "full"
    from policies import parse_spec
    parse_spec(args.policy)  # a bad spec from the config or the command line fails here, clearly

    def make_runtime(status):
        return _load_runtime(args, status)

    def make_runtime_for(model_id, status):
        import copy
        other = copy.copy(args)
        other.model = model_id
        return _load_runtime(other, status)
    run(make_runtime, config=cfg, doc_paths=tuple(args.doc), make_runtime_for=make_runtime_for)
    return 0
