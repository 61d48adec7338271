"""`locret` for a model without heads: the dialog offers training (then switches) or `auto`."""
from __future__ import annotations

from app.heads.train import default_out
from app.runtime.engine import Runtime
from app.ui.screens import ErrorDialog, HeadsDialog
from app.ui.transcript import Note
from app.ui.worker import Progress
from tests.ui.conftest import make_app, run, settle, wait_for
from tiny import tiny_pair

SPEC = "locret:budget=32,stabilizers=8"


def dialog_ready(app) -> bool:
    """The dialog is up and laid out (its buttons have a size to click)."""
    return isinstance(app.screen, HeadsDialog) and all(
        b.size.width > 0 for b in app.screen.query("Button")) and len(app.screen.query("Button")) == 3


def test_locret_without_heads_asks_then_trains_and_switches(tmp_path):
    async def main():
        rt = Runtime.from_model(*tiny_pair(0), model_id="tiny-heads-dialog", chunk_size=32)
        app = make_app(tmp_path, rt)
        app.heads_recipe = dict(steps=6, docs=2, val_docs=1, doc_tokens=100, d_r=8, warmup=2)
        units, post = {}, app.post_message

        def posted(msg):  # the progress the training reports, with its units
            if isinstance(msg, Progress):
                units[msg.label] = msg.unit
            return post(msg)
        app.post_message = posted
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app, timeout=60)
            app.switch_policy(SPEC)
            await wait_for(pilot, lambda: dialog_ready(app), timeout=60)
            assert "min on cpu" in str(app.screen.query_one("#heads-message").render())
            await pilot.press("escape")  # cancel: nothing changes
            await settle(pilot, app, timeout=60)
            assert rt.policy == "full"
            app.switch_policy(SPEC)
            await wait_for(pilot, lambda: dialog_ready(app), timeout=60)
            await pilot.click("#heads-train", offset=(3, 1))
            await wait_for(pilot, lambda: rt.policy.startswith("locret") or isinstance(app.screen, ErrorDialog),
                           timeout=600)
            await settle(pilot, app, timeout=60)
            assert not isinstance(app.screen, ErrorDialog), app.screen.message
            assert (default_out(rt.adapter.info) / "heads.safetensors").is_file()
            assert {k: v for k, v in units.items() if k.startswith("training heads")} == {
                "training heads: documents": "docs", "training heads: features": "docs",
                "training heads: steps": "steps"}  # documents counted as docs, never as tokens
            # the next time, the heads are there: no dialog
            app.switch_policy("full")
            await settle(pilot, app, timeout=60)
            app.switch_policy(SPEC)
            await settle(pilot, app, timeout=60)
            assert rt.policy.startswith("locret") and not isinstance(app.screen, HeadsDialog)
    run(main())


def test_use_auto_instead(tmp_path):
    async def main():
        rt = Runtime.from_model(*tiny_pair(1), model_id="tiny-heads-auto", chunk_size=32)
        app = make_app(tmp_path, rt)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app, timeout=60)
            app.switch_policy(SPEC)
            await wait_for(pilot, lambda: dialog_ready(app), timeout=60)
            await pilot.click("#heads-auto", offset=(3, 1))
            await wait_for(pilot, lambda: rt.auto, timeout=60)
            await settle(pilot, app, timeout=60)
            assert rt.policy == "full" and rt.auto_choice is not None
            shown = [str(n.render()) for n in app.query(Note)]
            assert any(n.startswith("Policy full → auto: full: KV") and "retained" not in n for n in shown), shown
    run(main())
