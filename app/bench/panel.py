"""`bench panel`: what the cache map costs a read. A document is read (`/load`) in the app
itself, headless, with the Context panel (its cache map) visible and hidden; and by the
runtime alone with the map built at every published state and not built at all.

Per policy and length: one warm-up read, then `rounds` rounds of the four conditions in turn
(an empty conversation before each read). Reported, medians over rounds: tokens read per
second as the runtime times the read (`DocumentInfo.prefill_s`, one clock for all four), the
ratios `panel / hidden` (the bar: >= 0.97) and `map / no map`; and two shares of the read's
time that a loaded machine disturbs less than a ratio of speeds: the time the runtime spent
building maps (`map build`), and the CPU time the UI thread spent more with the panel than
without it (`panel UI CPU`); with the maps the panel drew during the read (at most 1/DRAW_S
a second).
"""
from __future__ import annotations

import asyncio
import resource
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .common import table, write_json
from .serve import document

DEFAULT_POLICIES = ("full", "locret+offload")
DEFAULT_LENGTHS = (4000,)
CONDITIONS = ("panel", "hidden", "map", "no map")


@contextmanager
def _map_time(spent: list):
    """Add the seconds spent building maps (segments + counts) to `spent` meanwhile."""
    from app.runtime import cache_map
    originals = {name: getattr(cache_map, name) for name in ("segments", "build")}

    def timed(fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent.append(time.perf_counter() - t0)
        return call
    for name, fn in originals.items():
        setattr(cache_map, name, timed(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(cache_map, name, fn)


def _read(rt, path: Path) -> tuple[float, float]:
    """(tok/s, map build share) of one read of `path` into an empty conversation."""
    rt.clear()
    spent: list = []
    with _map_time(spent):
        info = rt.load_document(str(path))
    return info.tokens / info.prefill_s, sum(spent) / info.prefill_s


def _read_without_map(rt, path: Path) -> float:
    """tok/s of the same read, the runtime publishing its state without building the map."""
    from app.runtime import memory
    build = memory.cache_state

    def no_map(cache, context, held=None, messages=None, tok=None, prev=None):
        return build(cache, context, prev=prev)
    memory.cache_state = no_map
    try:
        return _read(rt, path)[0]
    finally:
        memory.cache_state = build


def _ui_cpu() -> float:
    """CPU seconds of the calling thread (the UI's event loop)."""
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


async def _in_app(rt, path: Path, hidden: bool, data_dir: str) -> dict:
    """A `/load` in the app (the model thread reads, the UI thread draws): tok/s, the UI
    thread's CPU seconds per second of reading, the maps the panel drew."""
    from app.config import Config
    from app.ui.app import VramchatApp
    from app.ui.chat_input import ChatInput
    from app.ui.context import ContextMeter
    got = []
    load = rt.load_document

    def timed(p, progress=None, stop=None):
        info = load(p, progress=progress, stop=stop)
        got.append((info, time.perf_counter()))
        return info
    rt.clear()
    rt.load_document = timed
    app = VramchatApp(lambda status: rt, config=Config(data_dir=data_dir))
    try:
        async with app.run_test(size=(130, 50)) as pilot:
            while app.runtime is None or app.busy is not None:
                await pilot.pause(0.05)
            meter = app.query_one(ContextMeter)
            meter.display = not hidden
            drawn, last = 0, meter.cache_map
            box = app.query_one(ChatInput)
            box.load_text(f"/load {path}")
            box.focus()
            cpu0 = _ui_cpu()
            await pilot.press("enter")
            cpu1 = None
            while True:
                await pilot.pause(0.02)  # NOTE: 50 looks a second; the panel draws at most 1/DRAW_S
                if meter.cache_map is not last:
                    drawn, last = drawn + 1, meter.cache_map
                if got and cpu1 is None:
                    cpu1 = _ui_cpu()  # the read is over (its card is not drawn yet)
                if got and app.busy is None and app.worker.current is None and not meter.pending:
                    break
            await pilot.pause(0.2)  # NOTE: JobDone's handler may still be drawing the card
    finally:
        del rt.load_document
        rt.on_note = None  # the app set it: it is gone
    info = got[0][0]
    return {"tok/s": info.tokens / info.prefill_s, "ui": (cpu1 - cpu0) / info.prefill_s, "drawn": drawn}


def one(rt, spec: str, n_tokens: int, rounds: int, folder: Path) -> dict:
    path = folder / f"doc-{n_tokens}.txt"
    path.write_text(document(rt, n_tokens))
    rt.set_policy(spec)
    _read(rt, path)  # warm-up
    speeds: dict = {c: [] for c in CONDITIONS}
    ui: dict = {"panel": [], "hidden": []}
    builds, draws = [], []
    for _ in range(rounds):
        for hidden in (False, True):
            got = asyncio.run(_in_app(rt, path, hidden, str(folder / "data")))
            cond = "hidden" if hidden else "panel"
            speeds[cond].append(got["tok/s"])
            ui[cond].append(got["ui"])
            if not hidden:
                draws.append(got["drawn"] * got["tok/s"] / n_tokens)  # per second of reading
        tok_s, share = _read(rt, path)
        speeds["map"].append(tok_s)
        builds.append(share)
        speeds["no map"].append(_read_without_map(rt, path))
    med = {c: statistics.median(v) for c, v in speeds.items()}
    rt.clear()
    return {"policy": spec, "tokens": n_tokens, **{f"{c} tok/s": med[c] for c in CONDITIONS},
            "panel / hidden": med["panel"] / med["hidden"], "map / no map": med["map"] / med["no map"],
            "map build": statistics.median(builds),
            "panel UI CPU": statistics.median(ui["panel"]) - statistics.median(ui["hidden"]),
            "maps drawn /s": statistics.median(draws)}


def run(rt, policies=DEFAULT_POLICIES, lengths=DEFAULT_LENGTHS, rounds: int = 1, out_dir: Path = Path("bench-out")):
    rows = []
    with tempfile.TemporaryDirectory(prefix="vramchat-bench-panel-") as tmp:
        for spec in policies:
            for n in lengths:
                rows.append(one(rt, spec, n, rounds, Path(tmp)))
                r = rows[-1]
                print(f"{spec} {n:,}: panel/hidden {r['panel / hidden']:.3f}, map/no map {r['map / no map']:.3f}, "
                      f"map build {r['map build']:.2%}, panel UI CPU {r['panel UI CPU']:.2%}", flush=True)
    cols = ["policy", "tokens", *[f"{c} tok/s" for c in CONDITIONS], "panel / hidden", "map / no map", "map build",
            "panel UI CPU", "maps drawn /s"]
    print(table(rows, cols))
    write_json(Path(out_dir), "panel", rows, {"model": rt.model_id, "device": str(rt.device), "rounds": rounds})
    return rows
