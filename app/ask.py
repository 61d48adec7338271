"""`main.py ask`: questions answered headless, with documents read first, the conversation
saved or resumed, progress and answers on the terminal or one JSON object (`--json`)."""
from __future__ import annotations

import json
import signal
import sys
import threading

from app.cli import _config, _load_runtime


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
    from app.runtime.eta import Eta, seconds
    eta = Eta()

    def cb(done, total):
        rate, left = eta.update(done, total)
        per_s = "–" if rate is None else f"{rate:,.0f}"
        print(f"\r{label}: {done:,}/{total:,} tokens  {per_s} tok/s  ETA {seconds(left)} ",
              end="" if done < total else "\n", file=sys.stderr, flush=True)
    return cb


def cmd_ask(args) -> int:
    from app.runtime.types import Stopped
    sampling = _sampling_of(args)
    quiet = args.json
    # the config file only where it decides something: the document cache, where conversations are saved
    cfg = _config() if args.save or args.resume or (args.doc and not args.backend) else None
    rt = _load_runtime(args, None if quiet else (lambda s: print(s, file=sys.stderr)))
    if args.doc and not args.backend:
        rt.doc_cache = cfg.doc_cache()
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if not args.backend:  # auto's choices and window warnings, as they are made (before reading)
        rt.on_note = lambda s: say(f"vramchat: {s}")
    save = _saver(rt, cfg.conversations_dir() if cfg else None, args.save, say)
    docs, resumed = [], None
    with _StopOnCtrlC() as stop:
        if args.resume:
            resumed = _resume(rt, cfg.conversations_dir(), args.resume,
                              None if quiet else _progress("re-reading"), stop)
            say(f"{resumed['name']}: {resumed['how']}")
        for path in args.doc:
            info = rt.load_document(path, None if quiet else _progress(f"reading {path}"), stop)
            docs.append({"name": info.name, "tokens": info.tokens, "prefill_s": round(info.prefill_s, 3),
                         "from_cache": info.from_cache})
            for line in ([f"{path}: from cache ({info.prefill_s:.2f} s)"] if info.from_cache else []) + \
                    ([f"{path}: {info.note}"] if info.note else []):
                say(line)
        if args.doc:
            save()
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
            save()
            if not quiet:
                mark = " [stopped]" if res.stopped else ""
                print(f"{mark}\n  ({res.new_tokens} tokens, TTFT {res.ttft_s:.2f}s, "
                      f"{res.decode_tok_s:.1f} tok/s, policy {res.policy})", flush=True)
    if quiet:
        mem = rt.memory()
        out = {
            "model": rt.model_id, "policy": rt.policy, "warnings": rt.policy_warnings(), "device": mem.device,
            **({} if args.backend else {
                "auto": {"spec": rt.auto_choice.spec, "reason": rt.auto_choice.reason} if rt.auto else None,
                "notes": rt.notes}),
            "weights": rt.weights,
            "documents": docs, "resumed": resumed, "context_tokens": rt.context().read,
            "retained_tokens": rt.context().retained,
            # where every token read sits: [{document, start, end, tier, kept_share, shares}] (app/runtime/cache_map.py)
            "cache_map": cmap.to_json() if (cmap := rt.snapshot().cache_map) is not None else None,
            "answers": [{k: v for k, v in a.to_json().items()} for a in answers],
            "memory": {"kv_bytes": {"gpu": mem.kv_total("gpu"), "host": mem.kv_total("host")},
                       "kv_bytes_by_kind": mem.kv, "kv_peak_bytes": mem.kv_peak_bytes,
                       "weights_bytes": mem.weights_bytes, "rss_peak_bytes": mem.rss_peak,
                       "gpu_peak_bytes": mem.torch_peak},
        }
        print(json.dumps(out, indent=1))
    return 130 if stop.is_set() else 0


def _resume(rt, folder, name: str, progress, stop) -> dict:
    """`ask --resume NAME`: the saved conversation, its cache restored where it fits."""
    from app.ui import store
    path = store.resolve(folder, name)
    how = rt.restore(store.load(path), progress, stop, cache_file=store.cache_path(path))
    return {"name": path.stem, "how": how}


def _saver(rt, folder, name: str | None, say):
    """`ask --save NAME`: -> save() writing the conversation (JSON + Markdown) and its cache;
    a cache that cannot be written is said, the conversation is still saved."""
    def save() -> None:
        if not name:
            return
        from app.runtime.snapshot import SnapshotError
        from app.ui import store
        path = store.save(folder, name, rt.to_json())
        try:
            rt.save_cache(store.cache_path(path))
        except (OSError, SnapshotError) as e:
            say(f"vramchat: cache file not saved ({e}); the conversation is, in {path}")
    return save
