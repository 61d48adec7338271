"""An answer's sources in the app: folded under the answer, the note as a warning line, Enter
on a source opens the viewer at its line, a reopened conversation shows them again; and the
config switch that turns them off reaches the runtime."""
from __future__ import annotations

import pytest
from textual.widgets import Collapsible, OptionList, Static

import policies.registry as registry
from app.config import ConfigError, parse_config, to_toml
from app.ui.chat_input import ChatInput
from app.ui.screens import SourceViewer
from app.ui.sources import SourcesBox, document_text, excerpt
from app.ui.transcript import Answer
from tests.ui.conftest import make_app, run, settle, submit, wait_for
from tests.ui.fake import CITED_NOTE, FakeRuntime

SIZE = (130, 42)
FACT_AT = 23  # 1-based line of the fact in the document
QUESTION = "What is the secret code for the vault?"


@pytest.fixture
def harbour(tmp_path):
    lines = [f"Line {n} tells of rivers, bread and the old tower." for n in range(1, 41)]
    lines[FACT_AT - 1] = "The secret code for the vault is 48213."
    lines[30] = "The vault stands by the harbour."
    path = tmp_path / "harbour.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _citing(tmp_path, **config):
    fake = FakeRuntime()
    fake.cite = True
    return make_app(tmp_path, fake, **config)


async def _asked(pilot, app, doc) -> Answer:
    app.query_one(ChatInput).cursor_blink = False
    await wait_for(pilot, lambda: app.runtime is not None)  # the model is loaded after the first frame
    await settle(pilot, app)
    await submit(pilot, app, f"/load {doc}")
    await settle(pilot, app)
    await submit(pilot, app, QUESTION)
    await settle(pilot, app)
    return app.query(Answer).last()


def test_fake_cites_the_fact_first(tmp_path, harbour):
    fake = FakeRuntime()
    fake.cite = True
    fake.load_document(str(harbour))
    res = fake.ask(QUESTION)
    assert [(s["line"], s["tier"]) for s in res.sources] == [(FACT_AT, "device"), (31, "recalled"), (1, "device")]
    assert res.sources_note == CITED_NOTE and fake.messages[-1]["stats"]["sources"] == res.sources


def test_excerpt_marks_the_line_and_keeps_the_edges():
    content = "\n".join(f"l{n}" for n in range(1, 31))
    got = excerpt(content, {"line": 3, "text": "l3"}, around=4)
    assert got[0] == (1, "l1", False) and got[-1] == (7, "l7", False)
    assert [n for n, _, mine in got if mine] == [3]
    assert excerpt(None, {"line": 3, "text": "alone"}) == [(3, "alone", True)]
    two = [{"role": "document", "name": "a", "content": "x\ny"}, {"role": "document", "name": "a", "content": "p\nq"}]
    assert document_text(two, {"document": "a", "line": 2, "text": "q"}) == "p\nq"
    assert document_text(two, {"document": "b", "line": 1, "text": "p"}) is None


def test_sources_fold_under_the_answer_and_enter_opens_the_passage(tmp_path, harbour):
    async def main():
        app = _citing(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            answer = await _asked(pilot, app, harbour)
            box = answer.query_one(SourcesBox)
            fold = box.query_one(Collapsible)
            assert fold.collapsed and str(fold.title) == "Sources (3)"
            assert str(box.query_one(".sources-note", Static).render()) == f"⚠ {CITED_NOTE}"
            rows = box.query_one(OptionList)
            first = str(rows.get_option_at_index(0).prompt)
            assert first.startswith(" 56%  harbour.txt, line 23 · device") and "48213" in first
            assert "recalled" in str(rows.get_option_at_index(1).prompt)
            await pilot.press("shift+tab")  # from the input, back to the last answer's fold
            assert app.focused is fold.query_one("CollapsibleTitle")
            await pilot.press("enter")  # unfold
            await wait_for(pilot, lambda: not fold.collapsed)
            await pilot.press("tab")
            assert app.focused is rows and rows.highlighted == 0
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, SourceViewer))
            viewer = app.screen
            text = str(viewer.query_one("#source-text", Static).render())
            lines = text.split("\n")
            assert lines[0].split(None, 1) == ["15", "Line 15 tells of rivers, bread and the old tower."]
            assert lines[-1].split(None, 1)[0] == "31" and len(lines) == 17
            assert lines[8].split(None, 1) == ["23", "The secret code for the vault is 48213."]
            assert viewer.lines[8] == (23, "The secret code for the vault is 48213.", True)
            assert sum(mine for _, _, mine in viewer.lines) == 1 and not viewer.missing
            assert "harbour.txt, line 23" in str(viewer.query_one("#source-viewer").border_title)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, SourceViewer))
    run(main())


def test_no_sources_no_box_and_a_reopened_conversation_shows_them(tmp_path, harbour):
    async def main():
        app = _citing(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.runtime is not None)
            await settle(pilot, app)
            await submit(pilot, app, "hello?")  # no document: no sources, nothing shown
            await settle(pilot, app)
            assert not app.query_one(Answer).query_one(SourcesBox).children
            await _asked(pilot, app, harbour)
            await submit(pilot, app, "/save cited")
            await settle(pilot, app)
            await submit(pilot, app, "/clear")
            await settle(pilot, app)
            assert not app.query(SourcesBox)
            await submit(pilot, app, "/open cited")
            await settle(pilot, app)
            box = app.query(Answer).last().query_one(SourcesBox)
            assert [s["line"] for s in box.sources] == [FACT_AT, 31, 1] and box.note == CITED_NOTE
            assert str(box.query_one(Collapsible).title) == "Sources (3)"
            box.open(box.sources[0])  # the restored conversation holds the document: its lines show
            await wait_for(pilot, lambda: isinstance(app.screen, SourceViewer))
            assert len(app.screen.lines) == 17 and not app.screen.missing
    run(main())


def test_a_source_whose_document_is_gone_shows_alone(tmp_path, harbour):
    async def main():
        app = _citing(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            box = (await _asked(pilot, app, harbour)).query_one(SourcesBox)
            app.fake.messages[:] = [m for m in app.fake.messages if m["role"] != "document"]
            box.open(box.sources[1])
            await wait_for(pilot, lambda: isinstance(app.screen, SourceViewer))
            assert app.screen.lines == [(31, "The vault stands by the harbour.", True)]
            assert app.screen.missing.startswith("The document's text is not in this conversation now")
    run(main())


def test_config_sources_switch(tmp_path):
    assert parse_config({}).sources is True
    assert parse_config({"sources": False}).sources is False
    with pytest.raises(ConfigError, match="`sources` must be a bool"):
        parse_config({"sources": 0})
    text = to_toml(parse_config({"sources": False}))
    assert "\nsources = false\n" in text
    import tomllib
    assert tomllib.loads(text)["sources"] is False


@pytest.mark.parametrize("on", [True, False])
def test_the_config_switch_reaches_a_local_runtime(tmp_path, on):
    from app.runtime.engine import Runtime
    from tests.tiny import tiny_pair
    model, tok = tiny_pair()
    rt = Runtime.from_model(model, tok, policy="full", model_id="tiny")
    rt.sources = not on

    async def main():
        app = make_app(tmp_path, rt, sources=on, max_new_tokens=3)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app, timeout=60)
            assert app.runtime.sources is on
    run(main())


# ---- screenshots (the transcript alone: the side panels have their own) ---------------------

@pytest.fixture
def only_full_policy():
    saved = dict(registry.REGISTRY)
    registry.REGISTRY.clear()
    registry.REGISTRY["full"] = saved["full"]
    yield
    registry.REGISTRY.update(saved)


def test_answer_with_its_sources(snap_compare, tmp_path, harbour, only_full_policy):
    app = _citing(tmp_path)

    async def before(pilot):
        answer = await _asked(pilot, app, harbour)
        app.query_one("#side").display = False
        answer.query_one(Collapsible).collapsed = False
        await pilot.pause()
        app.transcript.scroll_end(animate=False)
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_source_viewer(snap_compare, tmp_path, harbour, only_full_policy):
    app = _citing(tmp_path)

    async def before(pilot):
        box = (await _asked(pilot, app, harbour)).query_one(SourcesBox)
        app.query_one("#side").display = False
        box.open(box.sources[0])
        await wait_for(pilot, lambda: isinstance(app.screen, SourceViewer))
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=before)
