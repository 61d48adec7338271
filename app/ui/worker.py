"""The one thread that touches the model, and the messages it sends to the UI.

Every runtime call (load, prefill, decode, convert, restore, to_json) runs here, one job at a
time, so the model is never used from two threads. Jobs report back as Textual messages;
`Tokens` and `Progress` may be replaced in the queue by a newer one, so a fast stream never
floods the UI (the token text itself sits in a buffer that the handler drains).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from textual.message import Message


class Tokens(Message):
    """New answer text is in the worker's buffer; any pending Tokens is superseded."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Tokens)


class Progress(Message):
    def __init__(self, label: str, done: int, total: int, started: float) -> None:
        super().__init__()
        self.label, self.done, self.total, self.started = label, done, total, started

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Progress) and message.label == self.label


class Status(Message):
    """A loading stage reported by `make_runtime(status_cb)`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class JobDone(Message):
    def __init__(self, job: "Job", result: Any, error: BaseException | None) -> None:
        super().__init__()
        self.job, self.result, self.error = job, result, error


@dataclass
class Job:
    """`fn(ctx)` runs on the model thread; `done(result)` / `failed(error)` on the UI thread."""

    kind: str  # shown in the status line: "loading model", "reading document", ...
    fn: Callable[["JobContext"], Any]
    done: Callable[[Any], Any] | None = None
    failed: Callable[[BaseException], Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class JobContext:
    """What a job's function gets: callbacks that post messages back to the UI."""

    def __init__(self, worker: "ModelWorker", job: Job) -> None:
        self.worker, self.job, self.stop = worker, job, job.stop

    def progress(self, label: str) -> Callable[[int, int], None]:
        started = time.monotonic()
        target = self.worker.target

        def report(done: int, total: int) -> None:
            target.post_message(Progress(label, int(done), int(total), started))
        return report

    def status(self, text: str) -> None:
        self.worker.target.post_message(Status(str(text)))

    def on_token(self, piece: str) -> None:
        with self.worker.lock:
            self.worker.buffer.append(piece)
        self.worker.target.post_message(Tokens())


class ModelWorker:
    """A daemon thread draining a job queue. A daemon, so quitting during a slow model load
    does not hang; `shutdown` still asks the running job to stop and waits a little."""

    def __init__(self, target) -> None:
        self.target = target  # the App: receives the messages
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.buffer: list[str] = []
        self.current: Job | None = None
        self.thread = threading.Thread(target=self._loop, name="vramchat-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
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
            job = self.jobs.get()
            if job is None:
                return
            self.current = job
            result, error = None, None
            try:
                result = job.fn(JobContext(self, job))
            except BaseException as e:  # noqa: BLE001 -- reported to the UI, never kills the thread
                error = e
            finally:
                self.current = None
            self.target.post_message(JobDone(job, result, error))
