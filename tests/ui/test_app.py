"""Pilot-driven tests of every action, against the fake streaming runtime."""
from __future__ import annotations

import json

from textual.command import CommandList
from textual.widgets import Markdown

from app.runtime.types import VramchatError
from app.ui.chat_input import ChatInput
from app.ui.context import ContextMeter
from app.ui.panels import PolicyPanel, StatusLine
from app.ui.screens import ConversationPicker, ErrorDialog, FilePicker, HelpScreen, PolicyPicker
from app.ui.transcript import Answer, DocumentCard, Note, UserTurn
from tests.ui.conftest import load_held, make_app, run, settle, submit, wait_for
from tests.ui.fake import FakeRuntime, answer_for


def notes(app) -> list[str]:
    return [str(n.render()) for n in app.query(Note)]


def test_model_loads_after_first_frame_then_panels_fill(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            status = app.query_one(StatusLine)
            assert (status.model, status.device, status.weights, status.state) == \
                ("tiny-fake", "cuda:0 (Fake GPU)", "bf16", "idle")
            assert any("Loaded tiny-fake" in n for n in notes(app))
            assert app.query_one("#vram").report is not None
            assert app.query_one(PolicyPanel).spec == "full"
    run(main())


def test_question_streams_an_answer_with_stats(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "what is kv?")
            await settle(pilot, app)
            assert [str(u.render()) for u in app.query(UserTurn)] == ["what is kv?"]
            answer = app.query_one(Answer)
            assert answer.text == answer_for("what is kv?")
            assert answer.query_one(Markdown).source == answer.text
            stats = str(answer.query_one(".stats").render())
            for part in ("tokens", "TTFT 0.12 s", "42.0 tok/s", "policy full"):
                assert part in stats
            assert app.query_one(ContextMeter).info.read > 0
            assert app.query_one(ChatInput).text == ""
    run(main())


def test_stream_shows_partial_text_then_escape_stops_it(tmp_path):
    async def main():
        fake = FakeRuntime()
        fake.hold_after = 5
        app = make_app(tmp_path, fake)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "long one")
            await wait_for(pilot, fake.held.is_set)
            answer = app.query_one(Answer)
            await wait_for(pilot, lambda: answer.text.count(" ") >= 4)
            assert answer.text and answer.text != answer_for("long one")
            assert "generating" in app.query_one(StatusLine).state
            await submit(pilot, app, "second while busy")  # refused, not queued
            await pilot.press("escape")
            await settle(pilot, app)
            assert len(app.query(UserTurn)) == 1
            assert "stopped (partial)" in str(answer.query_one(".stats").render())
            assert fake.messages[-1]["partial"] is True
            assert app.query_one(StatusLine).state == "idle"
    run(main())


def test_input_newline_history_and_completion(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            box = app.query_one(ChatInput)
            box.focus()
            await pilot.press("a", "ctrl+j", "b")
            assert box.text == "a\nb"
            await pilot.press("enter")
            await settle(pilot, app)
            await submit(pilot, app, "second")
            await settle(pilot, app)
            await pilot.press("up")
            assert box.text == "second"
            await pilot.press("up")
            assert box.text == "a\nb"
            await pilot.press("down")  # the cursor sits at the end, on the last line: forward
            assert box.text == "second"
            await pilot.press("down")
            assert box.text == ""
            await pilot.press("/", "p", "o", "tab")
            assert box.text == "/policy "
            assert "/policy SPEC" in str(app.query_one("#hint").render())
            await pilot.press("f", "u", "tab")
            assert box.text == "/policy full"
    run(main())


def test_load_document_shows_progress_and_card(tmp_path, doc):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await load_held(pilot, app, doc)
            row = app.query_one("#progress-row")
            await wait_for(pilot, lambda: row.display)
            label = str(app.query_one("#progress-label").render())
            assert label.startswith("reading notes.md: ") and "tok/s" in label and "ETA" in label
            # the Context panel follows the read: half the document is in, not the end's total
            total, meter = len(doc.read_text()) // 4, app.query_one(ContextMeter)
            await wait_for(pilot, lambda: meter.info is not None and meter.info.read >= total // 2)
            read = meter.info.read
            assert read < total
            await pilot.pause()
            assert f"read      {read:>12,} tok" in str(app.query_one(ContextMeter).render())
            assert app.query_one(StatusLine).state.startswith("reading notes.md ")
            await pilot.press("escape")  # cancel: the document is not in the conversation
            await settle(pilot, app)
            assert not app.query(DocumentCard) and app.fake.messages == []
            app.fake.hold_prefill = False
            await submit(pilot, app, f"/load {doc}")
            await settle(pilot, app)
            card = app.query_one(DocumentCard)
            tokens = app.fake.messages[-1]["tokens"]
            assert card.title == f"Document: notes.md · {tokens:,} tokens"
            assert not row.display
            await submit(pilot, app, "summarise")
            await settle(pilot, app)
            assert app.query_one(Answer).text == answer_for("summarise")
    run(main())


def test_bad_document_error_is_shown_verbatim_and_conversation_kept(tmp_path):
    async def main():
        app = make_app(tmp_path)
        bad = tmp_path / "slides.pptx"
        bad.write_text("x")
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "hi")
            await settle(pilot, app)
            await submit(pilot, app, f"/load {bad}")
            await settle(pilot, app)
            assert isinstance(app.screen, ErrorDialog)
            assert app.screen.message == "slides.pptx: unsupported file type `.pptx`; use .txt, .md or .pdf"
            await pilot.press("enter")
            assert not isinstance(app.screen, ErrorDialog)
            assert len(app.query(Answer)) == 1 and len(app.fake.messages) == 2
    run(main())


def test_file_picker_loads_the_typed_path(tmp_path, doc):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("ctrl+o")
            assert isinstance(app.screen, FilePicker)
            path_input = app.screen.query_one("#file-path")
            path_input.value = str(doc)
            path_input.focus()
            await pilot.press("enter")
            await settle(pilot, app)
            assert app.query_one(DocumentCard).doc_name == "notes.md"
    run(main())


def test_policy_command_records_change_and_bytes(tmp_path, doc):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, f"/load {doc}")
            await settle(pilot, app)
            before = app.query_one("#vram").report.kv_total()
            await submit(pilot, app, "/policy full:budget=3")
            await settle(pilot, app)
            assert isinstance(app.screen, ErrorDialog)  # bad spec: verbatim SpecError, nothing sent
            assert app.screen.message == "policy `full` has no option `budget` (its options: none)"
            await pilot.press("escape")
            await submit(pilot, app, "/policy nosuch")
            await settle(pilot, app)
            assert app.screen.message.startswith("unknown policy `nosuch`; known: ")
            await pilot.press("escape")
            assert app.fake.calls.count("set_policy full") == 0
            await submit(pilot, app, "/policy full")
            await settle(pilot, app)
            assert "set_policy full" in app.fake.calls
            policy_notes = [n for n in notes(app) if n.startswith("Policy ")]
            assert policy_notes and "KV " in policy_notes[-1] and "converted in place" in policy_notes[-1]
            assert app.query_one(PolicyPanel).spec == "full"
            assert app.query_one("#vram").report.kv_total() == before
    run(main())


def test_policy_picker_builds_and_applies_spec(tmp_path):
    async def main():
        app = make_app(tmp_path, FakeRuntime(policy="full"))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("f2")
            assert isinstance(app.screen, PolicyPicker)
            spec = app.screen.query_one("#policy-spec")
            spec.value = "nosuch"
            spec.focus()
            await pilot.press("enter")
            assert "unknown policy `nosuch`" in str(app.screen.query_one("#policy-error").render())
            options = app.screen.query_one("#policy-list")
            options.focus()
            options.highlighted = next(i for i in range(options.option_count)
                                       if options.get_option_at_index(i).id == "full")
            await pilot.press("enter")  # select the policy: it goes into the spec
            assert spec.value == "full" and spec.has_focus
            await pilot.press("enter")
            await settle(pilot, app)
            assert not isinstance(app.screen, PolicyPicker)
            assert "set_policy full" in app.fake.calls
    run(main())


def test_command_palette_switches_policy(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("ctrl+p")
            await pilot.press(*"Policy: full")
            await wait_for(pilot, lambda: _highlighted(app).startswith("Policy: full"))
            await pilot.press("enter")
            await settle(pilot, app)
            assert "set_policy full" in app.fake.calls
    run(main())


def _highlighted(app) -> str:
    """The command palette's highlighted command ("" while it has none)."""
    lists = app.screen.query(CommandList)
    if not lists or lists.first().highlighted is None:
        return ""
    return str(lists.first().highlighted_option.prompt)


def test_system_clear_and_help(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "/system Answer in French.")
            await settle(pilot, app)
            assert app.fake.system == "Answer in French."
            assert "System prompt: Answer in French." in notes(app)
            await submit(pilot, app, "q")
            await settle(pilot, app)
            await submit(pilot, app, "/clear")
            await settle(pilot, app)
            assert "clear" in app.fake.calls and not app.query(Answer)
            await submit(pilot, app, "/help")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await submit(pilot, app, "/frobnicate")
            await pilot.pause()
            assert app.screen.message == "/frobnicate is not a command; /help lists them."
    run(main())


def test_copy_answer_and_code_block(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("ctrl+y")  # nothing yet: a warning, no crash
            await submit(pilot, app, "code?")
            await settle(pilot, app)
            await pilot.press("ctrl+y")
            assert app.clipboard == answer_for("code?")
            await pilot.press("ctrl+b")
            assert app.clipboard == "print('kv')\n"
            await submit(pilot, app, "/copy")
            assert app.clipboard == answer_for("code?")
    run(main())


def test_keymap_override_from_config(tmp_path):
    async def main():
        app = make_app(tmp_path, keymap={"policy": "f3", "copy_answer": "f6"})
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("f2")
            assert not isinstance(app.screen, PolicyPicker)
            await pilot.press("f3")
            assert isinstance(app.screen, PolicyPicker)
    run(main())


def test_documents_from_the_command_line_load_after_the_model(tmp_path, doc):
    async def main():
        app = make_app(tmp_path, doc_paths=[str(doc)])
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await wait_for(pilot, lambda: len(app.query(DocumentCard)) == 1)
    run(main())


def test_model_load_failure_is_a_dialog_not_a_crash(tmp_path):
    async def main():
        from app.ui.app import VramchatApp
        from app.config import Config

        def broken(status):
            raise VramchatError("model `nope` not found: not a directory, .gguf file or HF id")
        app = VramchatApp(broken, config=Config(data_dir=str(tmp_path)))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            assert app.screen.message == "model `nope` not found: not a directory, .gguf file or HF id"
            await pilot.press("escape")
            await submit(pilot, app, "hello")
            await pilot.pause()
            assert "No model is loaded" in app.screen.message
    run(main())


def test_unexpected_runtime_error_keeps_the_conversation(tmp_path):
    async def main():
        fake = FakeRuntime()
        app = make_app(tmp_path, fake)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "one")
            await settle(pilot, app)
            fake.ask = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: boom"))
            await submit(pilot, app, "two")
            await settle(pilot, app)
            assert isinstance(app.screen, ErrorDialog)
            assert "RuntimeError: CUDA error: boom" in app.screen.message
            await pilot.press("escape")
            answers = app.query(Answer)
            assert len(answers) == 2 and answers[0].text == answer_for("one")
            assert "failed: CUDA error: boom" in str(answers[1].query_one(".stats").render())
    run(main())


def test_no_gpu_gauge_says_so(tmp_path):
    async def main():
        app = make_app(tmp_path, FakeRuntime(has_gpu=False))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            text = str(app.query_one("#vram").render())
            assert "No GPU" in text and "32.0 GiB" in text
    run(main())


def test_autosave_save_and_open(tmp_path):
    async def main():
        app = make_app(tmp_path)
        conv_dir = tmp_path / "data" / "conversations"
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "remember this")
            await settle(pilot, app)
            autosaved = conv_dir / f"{app.conv_name}.json"
            assert autosaved.is_file() and autosaved.stat().st_mode & 0o777 == 0o600
            assert json.loads(autosaved.read_text())["messages"][0]["content"] == "remember this"
            await submit(pilot, app, "/save my talk")
            await settle(pilot, app)
            saved = conv_dir / "my-talk.json"
            assert saved.is_file() and saved.with_suffix(".md").is_file()
            assert "## You\n\nremember this" in saved.with_suffix(".md").read_text()
            await submit(pilot, app, "/clear")
            await settle(pilot, app)
            assert not app.query(UserTurn)
            await submit(pilot, app, "/open my-talk")
            await settle(pilot, app)
            assert "restore" in app.fake.calls
            assert [str(u.render()) for u in app.query(UserTurn)] == ["remember this"]
            assert app.query_one(Answer).text == answer_for("remember this")
            assert app.conv_name == "my-talk"
            await submit(pilot, app, "/open nothing-here")
            await pilot.pause()
            assert app.screen.message.startswith("no saved conversation `nothing-here`")
    run(main())


def test_open_picker_lists_saved_conversations(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "hello")
            await settle(pilot, app)
            await submit(pilot, app, "/open")
            await pilot.pause()
            assert isinstance(app.screen, ConversationPicker)
            await pilot.press("enter")
            await settle(pilot, app)
            assert "restore" in app.fake.calls
    run(main())


def test_model_switch_keeps_the_conversation(tmp_path):
    async def main():
        loaded = []

        def model_for(model_id, status):
            status(f"loading {model_id}")
            if model_id == "missing":
                raise VramchatError("model `missing` not found")
            loaded.append(model_id)
            return FakeRuntime(model_id=model_id)
        app = make_app(tmp_path, model_for=model_for)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "before the switch")
            await settle(pilot, app)
            await submit(pilot, app, "/model other-model")
            await settle(pilot, app)
            assert app.runtime.model_id == "other-model" and "restore" in app.runtime.calls
            assert app.query_one(StatusLine).model == "other-model"
            assert [str(u.render()) for u in app.query(UserTurn)] == ["before the switch"]
            await submit(pilot, app, "/model missing")
            await settle(pilot, app)
            assert isinstance(app.screen, ErrorDialog)
            assert app.screen.message.startswith("could not load `missing`: model `missing` not found")
            assert app.runtime.model_id == "other-model" and loaded == ["other-model", "other-model"]
            assert app.runtime.messages[0]["content"] == "before the switch"
    run(main())


def test_model_switch_without_loader_explains(tmp_path):
    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "/model x")
            await pilot.pause()
            assert "make_runtime_for" in app.screen.message
    run(main())


def test_anchor_warns_that_exact_retrieval_suffers(tmp_path):
    """The UI warns, at load and on a switch, that non-AnLLM models lose exact
    retrieval under `anchor` (and says nothing for other policies)."""
    from policies.anchor import WARNING

    def warned(app):
        return [n.message for n in app._notifications if WARNING in n.message and n.severity == "warning"]

    async def main():
        app = make_app(tmp_path, FakeRuntime(policy="anchor"))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            assert len(warned(app)) == 1
        app = make_app(tmp_path, FakeRuntime(policy="full"))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, "/policy locret")
            await settle(pilot, app)
            assert warned(app) == []
            await submit(pilot, app, "/policy anchor")
            await settle(pilot, app)
            assert warned(app) == [f"Policy: {WARNING}"]
    run(main())


def test_policy_panel_shows_kv_per_layer_when_layers_differ(tmp_path, doc):
    """Under `lighttransfer` the gauge shows per-layer memory (lazy layers short);
    a policy that treats every layer alike shows no per-layer line."""
    async def main():
        app = make_app(tmp_path, FakeRuntime(policy="full"))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await submit(pilot, app, f"/load {doc}")
            await settle(pilot, app)
            assert "KV per layer" not in str(app.query_one(PolicyPanel).render())
            await submit(pilot, app, "/policy lighttransfer")
            await settle(pilot, app)
            shown = str(app.query_one(PolicyPanel).render())
            assert "KV per layer ██▂▂" in shown, shown
    run(main())


def test_policy_panel_shows_options_as_a_spec_writes_them(tmp_path):
    async def main():
        app = make_app(tmp_path, FakeRuntime(policy="locret:share=off"))
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            shown = str(app.query_one(PolicyPanel).render())
            assert "share = off" in shown and "False" not in shown, shown
    run(main())
