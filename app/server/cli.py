"""`main.py serve`: its options and the command (the model options are `chat`'s)."""
from __future__ import annotations

import logging
import os
import sys

from app.runtime.types import VramchatError

from . import KEY_ENV, check_bind, run
from .worker import Serving


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                   "only; any other address needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=None, help=f"key clients must send as `Authorization: Bearer KEY` "
                   f"(default: the {KEY_ENV} environment variable; none on loopback)")
    p.add_argument("--queue", type=int, default=8, help="requests that may wait while one is served; "
                   "more get 429 with Retry-After (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="answer length when a request gives no max_tokens (default 1024)")


class _Stderr(logging.Handler):
    """Prints `vramchat.serve`'s records to whatever sys.stderr is now."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"vramchat: {self.format(record)}", file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    """`auto`'s choices, window warnings and failed requests, as they happen (once per process)."""
    log = logging.getLogger("vramchat.serve")
    log.setLevel(logging.INFO)
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())


def ready_line(serving: Serving, url: str, key: bool) -> str:
    rt, policy = serving.rt, serving.default_policy
    held = f", now `{rt.policy}`" if policy == "auto" else ""
    s = serving.sampling
    sampling = f"temperature {s.temperature:g}, top_p {s.top_p:g}, top_k {s.top_k}" if s.temperature else "greedy"
    return (f"vramchat: serving {rt.model_id} (policy {policy}{held}) at {url}\n"
            f"  sampling when a request gives none: {sampling} ({serving.sampling_source})\n"
            f"  try: curl {url}/models" + (" -H 'Authorization: Bearer KEY'" if key else ""))


def cmd_serve(args, load_runtime) -> int:
    key = args.api_key or os.environ.get(KEY_ENV) or None
    check_bind(args.host, key)  # before the model loads: a refusal costs nothing
    for name, value in (("--queue", args.queue), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise VramchatError(f"{name} {value}: must be at least 1")
    rt = load_runtime(args, lambda s: print(s, file=sys.stderr))
    _log_to_stderr()
    # NOTE: the policy asked for, not rt.policy: under `auto` that is only auto's choice for now
    serving = Serving(rt, policy=args.policy or "auto", max_queue=args.queue,
                      max_new_tokens=args.max_new_tokens).start()
    run(serving, args.host, args.port, key,
        on_ready=lambda url: print(ready_line(serving, url, bool(key)), file=sys.stderr, flush=True))
    return 0
