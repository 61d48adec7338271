"""Screenshots of the app (pytest-textual-snapshot): fixed size, no cursor blink, fake memory.

Regenerate after an intended change with `pytest tests/ui --snapshot-update` and read the SVGs.
"""
from __future__ import annotations

import pytest

import policies.registry as registry
from textual.widgets.markdown import MarkdownBlock

from app.ui.chat_input import ChatInput
from app.ui.context import ContextMeter
from app.ui.panels import Gauge
from tests.ui.conftest import make_app, settle, submit, wait_for
from tests.ui.fake import FakeRuntime, answer_for

SIZE = (130, 42)


@pytest.fixture(autouse=True)
def only_full_policy():
    """Policies land all the time; the screenshots show a fixed registry (just `full`)."""
    saved = dict(registry.REGISTRY)
    registry.REGISTRY.clear()
    registry.REGISTRY["full"] = saved["full"]
    yield
    registry.REGISTRY.update(saved)


def _paragraphs(md) -> list[str]:
    """The text of a Markdown widget's mounted blocks."""
    return [str(b.content).strip() for b in md.children if isinstance(b, MarkdownBlock)]


def _ready(app):
    async def before(pilot):
        app.query_one(ChatInput).cursor_blink = False
        await settle(pilot, app)
    return before


def test_main_screen(snap_compare, tmp_path, doc):
    app = make_app(tmp_path)

    async def before(pilot):
        await _ready(app)(pilot)
        await submit(pilot, app, f"/load {doc}")
        await settle(pilot, app)
        await submit(pilot, app, "How does the cache grow?")
        await settle(pilot, app)
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_streaming_answer(snap_compare, tmp_path):
    fake = FakeRuntime()
    fake.hold_after = 9
    app = make_app(tmp_path, fake)

    async def before(pilot):
        await _ready(app)(pilot)
        await submit(pilot, app, "Explain the cache")
        await wait_for(pilot, fake.held.is_set)
        expected = "".join(w + " " for w in answer_for("Explain the cache").split(" ")[:9])
        await wait_for(pilot, lambda: app.answer is not None and app.answer.text == expected)
        await wait_for(pilot, lambda: app.answer.markdown.source == expected)
        # the stream mounts the parsed blocks after it takes the source: wait for them
        await wait_for(pilot, lambda: _paragraphs(app.answer.markdown) == ["You asked: Explain the cache.",
                                                                           "The document says the cache"])
        await wait_for(pilot, lambda: app.query_one("#vram", Gauge).report == fake.memory())
        # the Context panel shows the question read (5 tokens) while the answer streams
        await wait_for(pilot, lambda: app.query_one(ContextMeter).info == fake.context() and fake.read == 5)
    assert snap_compare(app, terminal_size=SIZE, run_before=before)
    fake.release.set()


def test_no_gpu_gauge(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeRuntime(has_gpu=False))
    assert snap_compare(app, terminal_size=SIZE, run_before=_ready(app))


def test_policy_picker(snap_compare, tmp_path):
    app = make_app(tmp_path)

    async def before(pilot):
        await _ready(app)(pilot)
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#policy-spec").cursor_blink = False
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_error_dialog(snap_compare, tmp_path):
    app = make_app(tmp_path)

    async def before(pilot):
        await _ready(app)(pilot)
        await submit(pilot, app, "/policy full:budget=3")
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=before)
