"""Start-up: a load that fails is no dead end (/model loads one, /policy picks the policy it
loads under), and a start-up policy that cannot apply to the model (`locret` without
retaining heads) loads the model under `auto` and asks, as the live switch does."""
from __future__ import annotations


from app.runtime.engine import Runtime
from app.runtime.types import VramchatError
from app.ui.screens import ErrorDialog
from app.ui.transcript import DocumentCard, Note
from app.ui.worker import Progress
from tests.ui.conftest import make_app, run, settle, submit, wait_for
from tests.ui.fake import FakeRuntime
from tests.ui.test_heads_dialog import SPEC, dialog_ready
from tiny import tiny_pair


def notes(app) -> list[str]:
    return [str(n.render()) for n in app.query(Note)]


def test_a_failed_start_then_model_and_policy_load_one(tmp_path):
    async def main():
        loaded = []

        def model_for(model_id, status):
            loaded.append(model_id)
            return FakeRuntime(model_id=model_id)
        app = make_app(tmp_path, VramchatError("model `gone` not found"), model_for=model_for, policy="auto")
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            assert app.runtime is None and any("The model did not load: model `gone` not found" in n
                                               for n in notes(app))
            await pilot.press("escape")  # the error dialog
            await submit(pilot, app, "/policy streaming")
            await settle(pilot, app)
            assert not isinstance(app.screen, ErrorDialog)
            assert any("loads one under `streaming`" in n for n in notes(app))
            await submit(pilot, app, "/model other-model")
            await settle(pilot, app)
            assert not isinstance(app.screen, ErrorDialog), app.screen.message
            rt = app.runtime
            assert loaded == ["other-model"] and rt.model_id == "other-model"
            assert rt.calls == ["set_policy streaming"] and rt.policy == "streaming"  # the policy chosen
            assert any("Loaded other-model" in n for n in notes(app))
            await submit(pilot, app, "hello")
            await settle(pilot, app)
            assert "ask hello" in rt.calls
    run(main())


def test_locret_at_start_without_heads_loads_under_auto_and_asks(tmp_path, doc):
    """`chat --policy locret` on a model with no heads: the model loads (under auto), the
    documents given wait while the dialog asks, "Use auto" keeps auto and they are read."""
    async def main():
        rt = Runtime.from_model(*tiny_pair(0), policy="auto", model_id="tiny-start-heads", chunk_size=32)
        app = make_app(tmp_path, rt, doc_paths=[str(doc)], policy=SPEC)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: dialog_ready(app), timeout=60)
            assert app.runtime is rt and rt.auto
            assert any("Loaded tiny-start-heads" in n and "policy auto: full." in n for n in notes(app)), notes(app)
            assert f"`{SPEC}` needs retaining heads" in str(app.screen.query_one("#heads-message").render())
            assert app.busy is None and rt.messages == []  # the document waits for the answer
            await pilot.click("#heads-auto", offset=(3, 1))
            await wait_for(pilot, lambda: bool(app.query(DocumentCard)), timeout=60)
            await settle(pilot, app, timeout=60)
            assert rt.auto and app.load_policy == "auto" and [m["role"] for m in rt.messages] == ["document"]
            assert not isinstance(app.screen, ErrorDialog)
    run(main())


def test_progress_says_its_units(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            label = app.query_one("#progress-label")
            app.post_message(Progress("training heads: features", 7, 104, "docs", (3.5, 28.0)))
            await wait_for(pilot, lambda: "features" in str(label.render()))
            assert "7/104 docs · 3.5 docs/s · ETA " in str(label.render()), str(label.render())
            app.post_message(Progress("reading notes.md", 4096, 8192, estimate=(2048.0, 2.0)))
            await wait_for(pilot, lambda: "notes.md" in str(label.render()))
            assert "4,096/8,192 tok · 2,048 tok/s · ETA " in str(label.render()), str(label.render())
            app.post_message(Progress("reading notes.md", 0, 8192))  # a read's first report: no rate yet
            await wait_for(pilot, lambda: "0/8,192" in str(label.render()))
            assert "0/8,192 tok · – tok/s" in str(label.render()), str(label.render())
    run(main())


def test_chat_loads_a_local_model_under_auto_and_hands_the_app_its_policy(tmp_path, monkeypatch):
    """main.py chat: the local runtime is built under `auto` (the start-up model and /model's),
    and the app is given the policy to switch it to; a backend's policy is the server's."""
    from app import cli, config
    monkeypatch.setattr(config, "load_config", lambda: config.Config(data_dir=str(tmp_path)))
    built = []

    def load(args, status=None):
        built.append((args.model, args.policy))
        return FakeRuntime()
    monkeypatch.setattr(cli, "_load_runtime", load)
    got = {}

    def run(make_runtime, **kw):
        got.update(kw, make_runtime=make_runtime)
    assert cli.ui_main(cli.parser().parse_args(["chat", "--policy", "locret", "--model", "m"]), run) == 0
    assert got["policy"] == "locret"
    got["make_runtime"](print)
    got["make_runtime_for"]("other", print)
    assert built == [("m", "auto"), ("other", "auto")]
    assert cli.ui_main(cli.parser().parse_args(["chat", "--backend", "http://127.0.0.1:1/v1"]), run) == 0
    assert got["policy"] is None
