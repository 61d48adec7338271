"""Helpers for the UI tests: an app around a FakeRuntime, and waiting for the model thread."""
from __future__ import annotations

import asyncio
import time

import pytest

from app.config import Config
from app.ui.app import VramchatApp
from tests.ui.fake import FakeRuntime


def make_app(tmp_path, fake: FakeRuntime | None = None, *, doc_paths=(), model_for=None, policy=None,
             **config) -> VramchatApp:
    """`fake` (or a real Runtime) is what the start-up load returns; a `fake` that is an
    exception is raised by it (a load that fails). policy: the app's `load_policy`."""
    fake = fake or FakeRuntime()

    def make_runtime(status):
        status("reading weights")
        if isinstance(fake, BaseException):
            raise fake
        return fake

    app = VramchatApp(make_runtime, config=Config(data_dir=str(tmp_path / "data"), **config),
                      doc_paths=doc_paths, make_runtime_for=model_for, policy=policy)
    app.fake = fake
    return app


async def settle(pilot, app, timeout: float = 5.0) -> None:
    """Wait until the model thread is idle and the UI has drawn what it sent."""
    deadline = time.monotonic() + timeout
    while True:
        await pilot.pause(0.02)
        if app.busy is None and app.worker.jobs.empty() and app.worker.current is None:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy: {app.busy and app.busy.kind}")
    await pilot.pause()


async def wait_for(pilot, cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await pilot.pause(0.02)


async def submit(pilot, app, text: str) -> None:
    from app.ui.chat_input import ChatInput
    box = app.query_one(ChatInput)
    box.load_text(text)
    box.focus()
    await pilot.press("enter")


async def load_held(pilot, app, path) -> None:
    """`/load path` with the fake's read held after its first chunk; returns once it is held."""
    app.fake.hold_prefill = True
    await settle(pilot, app)
    await submit(pilot, app, f"/load {path}")
    await wait_for(pilot, app.fake.held.is_set)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\n" + "The KV cache grows with the context. " * 40, encoding="utf-8")
    return path
