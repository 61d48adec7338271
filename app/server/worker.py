"""One thread owns the Runtime and serves requests one at a time from a bounded queue.

Batch 1 is the product: a request waits its turn, or is refused at once when the queue is
full (the HTTP layer answers 429 with `Retry-After`). Each job carries its own stop Event:
the HTTP layer sets it when the client disconnects, a stop sequence sets it when it
matches, and the runtime checks it before every token.

A request carries the whole chat. It becomes the runtime's conversation (history) plus a
question; the runtime prefills only what its cache does not already hold, so the next
turn of the same chat costs only its new tokens. A text completion is raw text, read as is.

What the runtime says a person should know as it works (`auto`'s choices, the window
warning) goes to the `vramchat.serve` logger as it happens, and into that answer's
`vramchat.notes`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from app.runtime.auto import AUTO
from app.runtime.types import Sampling, Stopped, TurnResult, VramchatError
from policies import SpecError
from policies.registry import canonical_spec

from .schema import ChatRequest, model_defaults

log = logging.getLogger("vramchat.serve")


class Busy(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int, waiting: int, why: str = ""):
        why = why or f"the server is busy: {waiting} request(s) are waiting and the queue is full"
        super().__init__(f"{why}; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request in flight. The worker posts events to the request's event loop:
    ("token", text), ("done", Outcome), ("error", (status, message, code, param)), ("gone", None)."""

    req: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, data) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody listens
            pass


@dataclass
class Outcome:
    result: TurnResult
    finish_reason: str  # "stop" or "length" (OpenAI's names)
    prompt_tokens: int  # the whole prompt, as the model read it
    cached_tokens: int  # of which the cache already held this many (not prefilled again)
    auto: bool = False  # the policy is `auto`'s choice
    notes: list = field(default_factory=list)  # what the runtime said while answering


class StopStrings:
    """Holds back text that may be the start of a stop sequence; cuts at the first match."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> str:
        """Append a piece; -> the text now safe to send."""
        if self.hit:
            return ""
        self.text += piece
        # NOTE: a match cannot start before `sent`: the last `hold` characters are never sent early
        cuts = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.text = True, self.text[:min(cuts)]
            return self.flush()
        safe = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Serving:
    """The queue and the thread that owns `rt`. `served` counts finished jobs (the
    tests and the bench wait on `changed` for it, never on the clock).

    `policy` is what a request that names none runs under (default: `auto` where the
    runtime is in auto mode, else its policy); `auto` stays on across requests, re-choosing
    before each read. `sampling` holds the model's defaults for fields a request omits."""

    def __init__(self, rt, *, policy: str | None = None, max_queue: int = 8, max_new_tokens: int = 1024):
        if max_queue < 1:
            raise VramchatError(f"--queue {max_queue}: must be at least 1")
        self.rt = rt
        self.default_policy = (policy or (AUTO if rt.auto else rt.policy)).strip()
        self.sampling, self.sampling_source = model_defaults(rt.adapter.model)
        self.max_new_tokens = max_new_tokens
        self.models = [rt.model_id]
        self.max_queue = max_queue
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.changed = threading.Condition()
        self.running: Job | None = None
        self.served = 0
        self.last: Outcome | None = None
        self._closed = False
        self._built: set[str] = set()  # policy specs known to build a cache for this model
        self._service_s = 1.0  # moving average of one job's time, for Retry-After
        # counters for /metrics (written by the model thread only)
        self.totals = {"prompt_tokens": 0, "generation_tokens": 0, "cached_tokens": 0, "prefilled_tokens": 0}
        self.finished = {"stop": 0, "length": 0}  # finish_reason -> answers (fixed keys: read from any thread)
        self._notes: list[str] = []  # the running job's notes
        rt.on_note = self._on_note
        self._thread = threading.Thread(target=self._loop, name="vramchat-serve", daemon=True)

    # ---- the HTTP side ----------------------------------------------------------------
    def start(self) -> "Serving":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the running answer, answer the queued ones "gone", end the thread."""
        self._closed = True
        job = self.running
        if job is not None:
            job.stop.set()
        while True:
            try:
                waiting = self._q.get_nowait()
                if waiting is not None:
                    waiting.post("gone", None)
            except queue.Empty:
                try:
                    self._q.put_nowait(None)
                    break
                except queue.Full:  # a request slipped in meanwhile: answer it too
                    continue
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self._closed:
            raise Busy(5, 0, "the server is shutting down")
        try:
            self._q.put_nowait(job)
        except queue.Full:
            waiting = self._q.qsize()
            raise Busy(max(1, min(3600, math.ceil(self._service_s * (waiting + 1)))), waiting) from None
        with self.changed:
            self.changed.notify_all()

    def waiting(self) -> int:
        return self._q.qsize()

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until predicate() is true (re-checked whenever a job is queued, starts or
        ends) or timeout seconds pass. -> predicate()."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    # ---- the model thread ---------------------------------------------------------------
    def _on_note(self, text: str) -> None:
        log.info("%s", text)
        self._notes.append(text)
        # NOTE: a server runs for weeks; the log keeps the notes, the runtime need not
        self.rt.notes.clear()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self.changed:
                self.running = job
                self.changed.notify_all()
            t0 = time.perf_counter()
            try:
                self._serve(job)
            except BaseException as e:  # noqa: BLE001 -- one request's failure must not end the server
                log.exception("request failed")
                job.post("error", (500, f"internal error: {type(e).__name__}: {e}", "internal_error", None))
            finally:
                self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - t0)
                with self.changed:
                    self.running = None
                    self.served += 1
                    self.changed.notify_all()

    def _serve(self, job: Job) -> None:
        if job.stop.is_set():  # the client left while waiting
            job.post("gone", None)
            return
        rt, req = self.rt, job.req
        sent = [False]
        self._notes = []
        try:
            self._use_policy(req.policy or self.default_policy)
        except (VramchatError, SpecError) as e:
            job.post("error", (400, f"vramchat.policy: {e}", "invalid_value", "vramchat.policy"))
            return
        try:
            stops = StopStrings(req.stop)

            def on_token(piece: str) -> None:
                text = stops.feed(piece)
                if text:
                    sent[0] = True
                    job.post("token", text)
                if stops.hit:
                    job.stop.set()  # the runtime stops before the next token
            kw = dict(max_new_tokens=req.max_tokens, on_token=on_token, stop=job.stop,
                      sampling=Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                        seed=req.seed))
            if req.prompt is not None:
                res = rt.complete(req.prompt, **kw)
            else:
                rt.set_conversation(req.system, req.history)
                res = rt.ask(req.question, prefix=req.prefix, **kw)
        except Stopped:
            job.post("gone", None)
            return
        except (VramchatError, SpecError) as e:
            # Before the first token the request is what cannot be served (it does not fit,
            # its policy cannot be built); after it, the server ran out of something.
            status, code = (500, "server_error") if sent[0] else (400, "invalid_request")
            job.post("error", (status, str(e), code, None))
            return
        tail = ""
        if not stops.hit and res.answer.startswith(stops.text):
            tail = stops.feed(res.answer[len(stops.text):])  # an incomplete character at the end, held back
        tail += stops.flush()
        if tail:
            job.post("token", tail)
        total = rt.context().read - res.new_tokens  # NOTE: decode feeds every answer token to the cache
        finish = "stop" if stops.hit or res.finish == "stop" else "length"
        out = Outcome(res, finish, total, max(0, total - res.prompt_tokens), rt.auto, list(self._notes))
        for key, n in (("prompt_tokens", out.prompt_tokens), ("generation_tokens", res.new_tokens),
                       ("cached_tokens", out.cached_tokens), ("prefilled_tokens", res.prompt_tokens)):
            self.totals[key] += n
        self.finished[finish] += 1
        self.last = out
        job.post("done", out)

    def _use_policy(self, spec: str) -> None:
        """A request that names another policy than the cache holds starts a fresh cache
        under it (converting would make answers depend on the previous request's policy).
        `auto` is a policy of its own: a cache it chose is kept while requests ask for auto
        (it re-chooses before each read), and is not reused by a request naming its choice."""
        rt = self.rt
        if spec == AUTO and rt.auto or not rt.auto and spec != AUTO and _same_policy(spec, rt.policy):
            return
        if spec != AUTO and spec not in self._built:
            rt.adapter.new_cache(spec)  # one that cannot be built (no heads for this model) fails here
            self._built.add(spec)
        rt.set_conversation(None, [])
        rt.set_policy(spec, reprefill=True)


def _same_policy(a: str, b: str) -> bool:
    """The same stack, however it is written (`canonical_spec`); `auto` is only itself."""
    if AUTO in (a, b):
        return a == b
    return canonical_spec(a) == canonical_spec(b)
