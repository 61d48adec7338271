"""Keys that arrive in one burst (a paste ending in a newline, `tmux send-keys "q" Enter`)
are handled in order: Enter sends the text typed just before it."""
from __future__ import annotations

from textual import events

from app.ui.chat_input import ChatInput
from app.ui.transcript import UserTurn
from tests.ui.conftest import make_app, run, settle, wait_for


def _burst(app, text: str, *tail: str) -> None:
    """Post every key at once, as a terminal read of one burst does (no waiting in between)."""
    for ch in text:
        app.post_message(events.Key("space" if ch == " " else ch, ch))
    for key in tail:
        app.post_message(events.Key(key, {"enter": "\r", "ctrl+j": "\n"}.get(key)))


def test_enter_in_the_same_burst_sends_the_text_before_it(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            app.query_one(ChatInput).focus()
            _burst(app, "what is kv?", "enter")
            await wait_for(pilot, lambda: len(app.query(UserTurn)) == 1)
            await settle(pilot, app)
            assert [str(u.render()) for u in app.query(UserTurn)] == ["what is kv?"]
            assert app.query_one(ChatInput).text == ""
    run(main())


def test_a_newline_in_a_burst_stays_in_place_and_a_paste_keeps_its_newlines(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            box = app.query_one(ChatInput)
            box.focus()
            _burst(app, "one", "ctrl+j")
            _burst(app, "two")
            await wait_for(pilot, lambda: box.text == "one\ntwo")
            app.post_message(events.Paste("three\nfour\n"))
            await wait_for(pilot, lambda: box.text.endswith("four\n"))
            assert box.text == "one\ntwothree\nfour\n" and not app.query(UserTurn)  # a paste never sends
    run(main())


def test_send_follows_the_keymap(tmp_path):
    async def main():
        app = make_app(tmp_path, keymap={"send": "f9"})
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            box = app.query_one(ChatInput)
            box.focus()
            _burst(app, "hi", "enter")
            await wait_for(pilot, lambda: box.text == "hi\n")  # Enter is an ordinary key now
            _burst(app, "", "f9")
            await wait_for(pilot, lambda: len(app.query(UserTurn)) == 1)
            await settle(pilot, app)
            assert [str(u.render()) for u in app.query(UserTurn)] == ["hi"]
    run(main())
