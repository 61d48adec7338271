"""End to end on a real (tiny, random) model: the real Runtime behind the real app."""
from __future__ import annotations

import pytest

from app.config import Config
from app.ui.app import VramchatApp
from app.ui.transcript import Answer, DocumentCard, Note
from tests.ui.conftest import run, settle, submit

pytest.importorskip("torch")


def test_tiny_model_question_document_and_policy_switch(tmp_path):
    from app.runtime.engine import Runtime
    from policies.registry import REGISTRY
    from tests.tiny import tiny_pair

    doc = tmp_path / "short.txt"
    doc.write_text("Paris is the capital of France. The Seine flows through it.\n" * 2)
    stages = []

    def make_runtime(status):
        status("building the tiny model")
        stages.append("built")
        model, tok = tiny_pair()
        return Runtime.from_model(model, tok, policy="full", model_id="tiny-llama")

    async def main():
        app = VramchatApp(make_runtime, config=Config(data_dir=str(tmp_path / "data"), max_new_tokens=8))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app, timeout=60)
            assert stages == ["built"] and app.runtime.model_id == "tiny-llama"
            await submit(pilot, app, "Hi")
            await settle(pilot, app, timeout=60)
            answer = app.query_one(Answer)
            last = app.runtime.messages[-1]
            assert last["role"] == "assistant" and answer.text == last["content"]
            assert f"{last['stats']['new_tokens']} tokens" in str(answer.query_one(".stats").render())

            await submit(pilot, app, f"/load {doc}")
            await settle(pilot, app, timeout=60)
            card = app.query_one(DocumentCard)
            assert card.tokens == app.runtime.messages[-1]["tokens"] > 50
            await submit(pilot, app, "Capital?")
            await settle(pilot, app, timeout=60)
            assert len(app.query(Answer)) == 2

            app.poll_memory()
            before = app.query_one("#vram").report.kv_total()
            assert before > 0
            target = "kivi" if "kivi" in REGISTRY else "full"
            spec = "kivi:group=16,residual=16" if target == "kivi" else "full"  # tiny head_dim is 16
            await submit(pilot, app, f"/policy {spec}")
            await settle(pilot, app, timeout=60)
            note = [str(n.render()) for n in app.query(Note) if "Policy full →" in str(n.render())]
            assert note and "KV " in note[-1], getattr(app.screen, "message", app.screen)
            after = app.query_one("#vram").report.kv_total()
            assert app.runtime.policy.startswith(target)
            if target == "kivi":
                assert after < before
    run(main())
