"""The app in front of a remote backend: `vramchat serve` on a tiny model, on loopback."""
from __future__ import annotations

from app.config import Config
from app.runtime.engine import Runtime
from app.runtime.remote import RemoteRuntime
from app.server import Background, Serving
from app.ui.app import VramchatApp
from app.ui.screens import ErrorDialog
from app.ui.transcript import Answer
from tests.ui.conftest import run, settle, submit, wait_for
from tiny import tiny_pair

BOUND_S = 120.0


def test_app_chats_through_a_backend_and_refuses_policy_switching(tmp_path):
    model, tok = tiny_pair(7)
    serving = Serving(Runtime.from_model(model, tok, model_id="tiny", chunk_size=64), max_queue=2).start()
    with Background(serving) as url:
        remote = RemoteRuntime(url)
        app = VramchatApp(lambda status: remote, config=Config(data_dir=str(tmp_path / "data"), max_new_tokens=6))

        async def main():
            async with app.run_test(size=(120, 40)) as pilot:
                await settle(pilot, app, BOUND_S)
                await submit(pilot, app, "hello there")
                await settle(pilot, app, BOUND_S)
                answer = app.query_one(Answer)
                assert answer.text == serving.last.result.answer
                stats = str(answer.query_one(".stats").render())
                assert "policy full" in stats and "tok/s" in stats
                await wait_for(pilot, lambda: app.query_one("#vram").report is not None, BOUND_S)
                assert "remote: http://127.0.0.1" in str(app.query_one("#vram").render())
                await submit(pilot, app, "/policy kivi")
                await settle(pilot, app, BOUND_S)
                dialogs = [s for s in app.screen_stack if isinstance(s, ErrorDialog)]
                assert dialogs and "needs the local runtime" in str(dialogs[-1].message)
        run(main())
        remote.close()
