"""The one thread that touches the model, and the messages it sends to the UI.

Every runtime call (load, prefill, decode, convert, restore, to_json) runs here, one job at a
time, so the model is never used from two threads. Jobs report back as Textual messages;
`Tokens` and `Progress` may be replaced in the queue by a newer one, so a fast stream never
floods the UI (the token text itself sits in a buffer that the handler drains). A job never
assigns the app's state: it works on `ctx.runtime` (and may replace it, e.g. a model
switch), and `JobDone` carries the runtime and its cache state back for the UI thread to
take.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from textual.message import Message

from app.runtime.eta import Eta


class Tokens(Message):
    """New answer text is in the worker's buffer; any pending Tokens is superseded."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Tokens)


class Progress(Message):
    """done of total units (`unit`: tok, docs, steps) of the work `label` names; `estimate`:
    (units per second, seconds left) from the recent reports (`eta.Eta`, None in either
    where not known yet: the first report of a piece of work)."""

    def __init__(self, label: str, done: int, total: int, unit: str = "tok",
                 estimate: tuple[float | None, float | None] = (None, None)) -> None:
        super().__init__()
        self.label, self.done, self.total, self.unit = label, done, total, unit
        self.estimate = estimate

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Progress) and message.label == self.label


class Status(Message):
    """A loading stage reported by `make_runtime(status_cb)`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class Notice(Message):
    """Something the person should know that did not stop the job (an autosave failed)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class JobDone(Message):
    """A job ended. runtime: the runtime after it (None if none is loaded); state: that
    runtime's `snapshot()` taken on the model thread, for the panels."""

    def __init__(self, job: "Job", result: Any, error: BaseException | None, runtime: Any = None,
                 state: Any = None) -> None:
        super().__init__()
        self.job, self.result, self.error = job, result, error
        self.runtime, self.state = runtime, state


@dataclass
class Job:
    """`fn(ctx)` runs on the model thread; `done(result)` / `failed(error)` on the UI thread."""

    kind: str  # shown in the status line: "loading model", "reading document", ...
    fn: Callable[["JobContext"], Any]
    done: Callable[[Any], Any] | None = None
    failed: Callable[[BaseException], Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class JobContext:
    """What a job's function gets: the runtime it works on (a job that loads a model sets
    it), and callbacks that post messages back to the UI."""

    def __init__(self, worker: "ModelWorker", job: Job, runtime: Any) -> None:
        self.worker, self.job, self.stop, self.runtime = worker, job, job.stop, runtime
        self._warned: set[str] = set()

    def progress(self, label: str, unit: str = "tok") -> Callable[[int, int], None]:
        """-> report(done, total) of the work `label` names, counted in `unit` (tokens unless said)."""
        target = self.worker.target
        eta = Eta()  # NOTE: here, not in the UI: a newer Progress replaces an older one in the queue

        def report(done: int, total: int) -> None:
            target.post_message(Progress(label, int(done), int(total), unit, eta.update(done, total)))
        return report

    def status(self, text: str) -> None:
        self.worker.target.post_message(Status(str(text)))

    def warn(self, text: str) -> None:
        """Tell the person, once per job (a failing autosave during an answer repeats)."""
        if text not in self._warned:
            self._warned.add(text)
            self.worker.target.post_message(Notice(str(text)))

    def on_token(self, piece: str) -> None:
        with self.worker.lock:
            self.worker.buffer.append(piece)
        self.worker.target.post_message(Tokens())


class ModelWorker:
    """A daemon thread draining a job queue. A daemon, so quitting during a slow model load
    does not hang; `shutdown` still asks the running job to stop and waits a little."""

    def __init__(self, target) -> None:
        self.target = target  # the App: receives the messages
        self.jobs: queue.Queue[tuple[Job, Any] | None] = queue.Queue()
        self.lock = threading.Lock()
        self.buffer: list[str] = []
        self.current: Job | None = None
        self.thread = threading.Thread(target=self._loop, name="vramchat-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job, runtime: Any) -> Job:
        """Queue job to run on `runtime` (the one the app holds now; None before a load)."""
        self.jobs.put((job, runtime))
        return job

    def take_tokens(self) -> str:
        with self.lock:
            text = "".join(self.buffer)
            self.buffer.clear()
        return text

    def stop_current(self) -> bool:
        job = self.current
        if job is None:
            return False
        job.stop.set()
        return True

    def shutdown(self, wait: float = 2.0) -> None:
        self.stop_current()
        self.jobs.put(None)
        if self.thread.is_alive():
            self.thread.join(wait)

    def _loop(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job, runtime = item
            del item
            self.current = job
            ctx = JobContext(self, job, runtime)
            del runtime  # NOTE: only ctx holds it, so a model switch can free the old model
            result, error, state = None, None, None
            try:
                result = job.fn(ctx)
            except BaseException as e:  # noqa: BLE001 -- reported to the UI, never kills the thread
                error = e
            finally:
                self.current = None
            if ctx.runtime is not None:
                state = ctx.runtime.snapshot()
            self.target.post_message(JobDone(job, result, error, ctx.runtime, state))
