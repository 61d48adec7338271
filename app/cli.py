"""Command-line front end: argument parsing and the headless commands.

`main.py` calls `main(argv)`. The TUI lives in app.ui and is imported only by `chat`.
"""
from __future__ import annotations

import argparse
import os
import sys



def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id, model folder, .gguf file or a name "
                   "`main.py models` lists (ollama:qwen2.5:7b) (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--policy", default=None, help="KV-cache policy spec, e.g. full, locret:budget=2048+kivi "
                   "(default: auto — the cheapest stack that holds the conversation, chosen again as it grows — "
                   "or the config file's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--weights", default="auto", choices=["auto", "bf16", "fp16", "fp32", "8bit", "4bit"],
                   help="weight precision; 8bit/4bit use bitsandbytes and need CUDA")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk in tokens "
                   "(default 512 on CPU, 2048 on CUDA; a policy's own chunk= wins)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--no-sources", action="store_true", help="answers name no sources (the passages of the "
                   "documents they attended to most; chat: also the config file's `sources = false`)")


def _sampling(p: argparse.ArgumentParser, temperature: float | None) -> None:
    """`ask` has fixed defaults (greedy); `chat` leaves them None so the config file decides."""
    chat = temperature is None
    p.add_argument("--max-new-tokens", type=int, default=None if chat else 512)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None if chat else 1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")


def _backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, metavar="URL", help="talk to an OpenAI-compatible server "
                   "(vLLM, SGLang, llama-server, Ollama, vramchat serve) instead of loading a model here, "
                   "e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="the backend's API key (default: the VRAMCHAT_API_KEY "
                   "environment variable)")


LOCAL_ONLY = (("policy", None), ("device", "auto"), ("weights", "auto"), ("chunk_size", None),
              ("trust_remote_code", False), ("no_sources", False))


def parser() -> argparse.ArgumentParser:
    from policies import REGISTRY

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
    _backend(chat)
    ask = sub.add_parser("ask", help="answer questions about documents, headless")
    _common(ask)
    _sampling(ask, 0.0)
    ask.add_argument("--doc", action="append", default=[], help="document to read first (repeatable)")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--save", metavar="NAME", default=None, help="save the conversation and its cache as NAME "
                     "after the documents and after every answer (as the app's /save; `--resume NAME` or /open "
                     "reopens it)")
    ask.add_argument("--resume", metavar="NAME", default=None, help="continue the saved conversation NAME first: its "
                     "cache is restored where model and policy match, else the conversation is read again")
    ask.add_argument("questions", nargs="+", help="each question is its own turn, after the documents")
    _backend(ask)
    serve = sub.add_parser("serve", help="an OpenAI-compatible API for this runtime (loopback by default)")
    _common(serve)
    from app.server import cli as serve_cli
    serve_cli.add_arguments(serve)
    from app import bench, outlier_channels
    from app.heads import cli as heads_cli
    bench.add_parser(sub)
    heads_cli.add_parser(sub)
    outlier_channels.add_parser(sub)
    from app import models, plan
    models.add_parser(sub)
    plan.add_parser(sub)
    cache = sub.add_parser("cache", help="the kept caches of read documents (user cache dir): list or clear")
    cache.add_argument("action", choices=["list", "clear"])
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["chat", *argv]
    if argv[0] in ("bench", "train-heads", "calibrate") and any(a.split("=")[0] == "--backend" for a in argv):
        print(f"vramchat: `{argv[0]}` needs the local runtime (it runs the model on this machine); "
              "--backend is for `chat` and `ask`", file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    from app.runtime.types import VramchatError
    from policies import SpecError
    try:
        if getattr(args, "backend", None):
            local = [f"--{k.replace('_', '-')}" for k, default in LOCAL_ONLY if getattr(args, k) != default]
            if local:
                raise VramchatError(f"{', '.join(local)} {'shapes' if len(local) == 1 else 'shape'} the local "
                                    "runtime; with --backend the server decides (for `vramchat serve`: pass it "
                                    "to `serve`)")
        if args.command == "serve":
            from app.server.cli import cmd_serve
            return cmd_serve(args, _load_runtime)
        if args.command == "ask":
            from app.ask import cmd_ask
            return cmd_ask(args)
        if args.command == "models":
            from app import models
            return models.run(args)
        if args.command == "cache":
            return cmd_cache(args)
        if args.command == "plan":
            from app import plan
            return plan.run(args)
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
    if getattr(args, "backend", None):
        from app.runtime.remote import KEY_ENV, RemoteRuntime
        rt = RemoteRuntime(args.backend, args.api_key or os.environ.get(KEY_ENV), args.model, status)
        if args.system:
            rt.set_system(args.system)
        return rt
    from app.runtime.engine import Runtime
    rt = Runtime.load(args.model, policy=args.policy or "auto", device=args.device, weights=args.weights,
                      chunk_size=args.chunk_size, trust_remote_code=args.trust_remote_code, status=status)
    rt.sources = not args.no_sources
    if args.system:
        rt.set_system(args.system)
    for w in rt.policy_warnings():
        print(f"vramchat: warning: {w}", file=sys.stderr)
    return rt


def _config():
    from app import config as cfgmod
    try:
        return cfgmod.load_config()
    except cfgmod.ConfigError as e:
        from app.runtime.types import VramchatError
        raise VramchatError(str(e)) from None


def cmd_cache(args) -> int:
    """`main.py cache list|clear`: the kept caches of read documents."""
    from app.runtime.doc_cache import describe
    cfg = _config()
    dc = cfg.doc_cache()
    if args.action == "clear":
        n, size = dc.clear()
        print(f"removed {n} cached document{'s' if n != 1 else ''} ({size / 2**20:,.1f} MiB) from {dc.folder}")
        return 0
    entries = dc.entries()
    for e in entries:
        print(describe(e))
    total = sum(e.bytes for e in entries)
    from app.config import config_path
    print(f"{len(entries)} cached document{'s' if len(entries) != 1 else ''}, {total / 2**30:.2f} GiB of "
          f"{cfg.doc_cache_gib:g} GiB (doc_cache_gib in {config_path()}), in {dc.folder}")
    return 0


def cmd_chat(args) -> int:
    from app.ui import run
    return ui_main(args, run)


def _with_doc_cache(rt, args, cfg):
    if not getattr(args, "backend", None):
        rt.doc_cache = cfg.doc_cache()
    return rt


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
    if args.no_sources:
        cfg.sources = False
    if not args.backend:  # the config's model is a local one; a backend's is named with --model
        args.model = cfg.model or None
    args.policy = cfg.policy or "auto"
    from app.runtime.auto import AUTO, check_spec
    check_spec(args.policy)  # a bad spec from the config or the command line fails here, clearly

    # NOTE: a local runtime is built under `auto` and the app switches it to args.policy once
    # loaded, so a policy that cannot apply to the model (no retaining heads) costs no reload
    def make_runtime_for(model_id, status):
        import copy
        other = copy.copy(args)
        other.model = model_id
        if not args.backend:
            other.policy = AUTO
        return _with_doc_cache(_load_runtime(other, status), args, cfg)
    run(lambda status: make_runtime_for(args.model, status), config=cfg, doc_paths=tuple(args.doc),
        make_runtime_for=make_runtime_for, policy=None if args.backend else args.policy)
    return 0
