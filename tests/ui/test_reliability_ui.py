"""Reliability of the app: a hand-edited conversation cannot inject markup, and a
process killed mid-answer leaves an autosave that reopens with the partial answer marked."""
from __future__ import annotations

import json

from textual.widgets._collapsible import CollapsibleTitle

from app.ui import store
from app.ui.transcript import Answer, DocumentCard, Note, UserTurn
from tests.ui.conftest import make_app, run, settle, submit, wait_for
from tests.ui.fake import FakeRuntime, answer_for

EVIL = "[bold red]x[/] [@click=app.quit]y[/] [link=https://example.com]z[/]"


def _spans(content) -> list:
    return [s for s in getattr(content, "spans", []) if "click" in str(s.style) or "link" in str(s.style)]


def test_markup_in_a_hand_edited_conversation_renders_as_text(tmp_path):
    conv_dir = tmp_path / "data" / "conversations"
    conv_dir.mkdir(parents=True)
    (conv_dir / "edited.json").write_text(json.dumps({
        "model": "tiny-fake", "policy": "full", "system": EVIL,
        "messages": [{"role": "document", "name": EVIL, "content": EVIL, "tokens": 5, "path": EVIL},
                     {"role": "user", "content": EVIL},
                     {"role": "assistant", "content": EVIL, "stats": {"policy": EVIL}}]}))

    async def main():
        app = make_app(tmp_path)
        quits = []
        app.action_quit = lambda: quits.append(1)  # what the injected @click would call
        async with app.run_test(size=(140, 50)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "/open edited")
            await settle(pilot, app)
            assert [str(u.render()) for u in app.query(UserTurn)] == [EVIL]
            assert any(str(n.render()) == f"System prompt: {EVIL}" for n in app.query(Note))
            title = app.query_one(DocumentCard).query_one(CollapsibleTitle)
            assert EVIL in title.label.plain and not _spans(title.label)
            answer = app.query_one(Answer)
            assert answer.text == EVIL
            shown = "".join(str(b._content.plain) for b in answer.markdown.query("MarkdownBlock")
                            if hasattr(b, "_content"))
            assert "[@click=app.quit]y[/]" in shown and "[bold red]x[/]" in shown
            assert f"policy {EVIL}" in str(answer.query_one(".stats").render())
            for widget in (title, *app.query(UserTurn), answer.markdown):
                await pilot.click(widget)  # clicking the text fires nothing
            await pilot.pause()
            assert quits == [] and app.is_running
    run(main())


def test_autosaves_are_private(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "hello")
            await settle(pilot, app)
            path = tmp_path / "data" / "conversations" / f"{app.conv_name}.json"
            for f in (path, path.with_suffix(".md")):
                assert f.stat().st_mode & 0o777 == 0o600, f
            assert path.parent.stat().st_mode & 0o777 == 0o700
    run(main())


def test_killed_mid_answer_the_autosave_reopens_with_the_partial_answer(tmp_path):
    async def main():
        fake = FakeRuntime()
        app = make_app(tmp_path, fake)
        app.PARTIAL_SAVE_S = 0.0  # save on every token batch (1 s by default)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "first")
            await settle(pilot, app)
            fake.hold_after = 5  # the next answer streams 5 tokens, then hangs as if the process froze
            await submit(pilot, app, "long one")
            await wait_for(pilot, fake.held.is_set)
            name = app.conv_name
            # the "kill": read the disk while the answer is still streaming, before any clean shutdown
            path = tmp_path / "data" / "conversations" / f"{name}.json"
            data, on_disk = store.load(path), path.read_bytes()
            md = path.with_suffix(".md").read_text()
            fake.release.set()
            await settle(pilot, app)
        path.write_bytes(on_disk)  # the disk as the kill left it (this app went on to finish the turn)
        partial = " ".join(answer_for("long one").split(" ")[:5]) + " "
        assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
        assert data["messages"][1] == fake.messages[1]  # the finished turn, untouched
        assert data["messages"][2] == {"role": "user", "content": "long one"}
        assert data["messages"][3] == {"role": "assistant", "content": partial, "partial": True}
        assert "## Assistant (stopped, partial)\n\n" + partial in md

        again = make_app(tmp_path, FakeRuntime())
        async with again.run_test(size=(120, 40)) as pilot:
            await settle(pilot, again)
            await submit(pilot, again, f"/open {name}")
            await settle(pilot, again)
            answers = again.query(Answer)
            assert [a.text.rstrip() for a in answers] == [answer_for("first"), partial.rstrip()]
            assert "stopped (partial)" in str(answers[-1].query_one(".stats").render())
            assert again.fake.messages[-1]["partial"] is True
    run(main())


def test_partial_autosave_is_replaced_by_the_finished_answer(tmp_path):
    async def main():
        app = make_app(tmp_path)
        app.PARTIAL_SAVE_S = 0.0
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "whole")
            await settle(pilot, app)
            data = store.load(tmp_path / "data" / "conversations" / f"{app.conv_name}.json")
            assert data["messages"][-1]["content"] == answer_for("whole")
            assert data["messages"][-1]["partial"] is False and len(data["messages"]) == 2
    run(main())
