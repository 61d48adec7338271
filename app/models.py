"""`main.py models`: the models already on disk (app/runtime/stores.py), as a table or JSON."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models already on disk (HF cache, Ollama, LM Studio, "
                       "config folders)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dir", action="append", default=[], help="also search this folder (repeatable; "
                   "the config file's model_dirs are always searched)")


def human(n: float | None, unit: str = "") -> str:
    """1.2G, 135M, 8.2K: parameter counts and sizes in one short column."""
    if n is None:
        return "?"
    for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{suffix}{unit}"
    return f"{int(n)}{unit}"


def _files(e) -> str:
    got = [k for k in ("heads", "channels") if getattr(e, k)]
    return ",".join(got) or "-"


def render(entries, searched) -> str:
    cols = ["NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "CONTEXT", "FILES"]
    rows = []
    for e in entries:
        if e.error:
            continue
        ctx = f"{e.context:,}" if e.context else "?"
        rows.append([e.name, e.arch + ("*" if e.note else ""), human(e.params), e.quant or "?",
                     human(e.size, "B"), ctx, _files(e)])
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = []
    if rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    bad = [e for e in entries if e.error]
    if bad:
        lines.append("")
        lines += [f"{e.name}: {e.error}" for e in bad]
    if any(e.note for e in entries if not e.error):
        lines.append("\n* architecture not in the tested matrix (README, Models): it may work; no test says so")
    where = [f"{s} {p}" + ("" if ok else " (absent)") for s, p, ok in searched]
    lines.append(("\n" if lines else "no models found.\n") + "searched: " + "; ".join(where))
    lines.append("FILES: retaining heads (locret) / offload channels for this model, shipped or made on this "
                 "machine (train-heads, calibrate); load any NAME with --model NAME")
    return "\n".join(lines)


def run(args) -> int:
    from app import config as cfgmod
    from app.runtime import stores
    try:
        dirs = cfgmod.load_config().model_dirs
    except cfgmod.ConfigError as e:
        print(f"vramchat: {e} (searching without its model_dirs)", file=sys.stderr)
        dirs = []
    entries, searched = stores.scan([*dirs, *args.dir])
    if args.json:
        print(json.dumps({"models": [e.to_json() for e in entries],
                          "searched": [{"store": s, "path": str(p), "present": ok} for s, p, ok in searched]},
                         indent=1))
    else:
        print(render(entries, searched))
    return 0
