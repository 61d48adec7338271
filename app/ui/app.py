"""VramchatApp: layout, keys, the message handlers that connect the model thread to the screen.

What each action does to the runtime lives in `actions.py`; this file owns the screen.
"""
from __future__ import annotations

import traceback
from typing import Callable, Iterable

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import Footer, ProgressBar, Static

from app.config import Config
from app.runtime.eta import seconds
from app.runtime.types import VramchatError
from app.ui import store
from app.ui.actions import Actions
from app.ui.chat_input import ChatInput
from app.ui.commands import PolicyCommands
from app.ui.context import ContextMeter
from app.ui.panels import Gauge, PolicyPanel, StatusLine
from app.ui.screens import ErrorDialog, HelpScreen
from app.ui.transcript import Note, Transcript
from app.ui.worker import Job, JobDone, ModelWorker, Notice, Progress, Status, Tokens
from policies.registry import SpecError

MakeRuntime = Callable[[Callable[[str], None]], object]
MakeRuntimeFor = Callable[[str, Callable[[str], None]], object]

INPUT_KEYS = [("enter", "send the message or /command"), ("ctrl+j / shift+enter", "new line in the message"),
              ("up / down", "previous / next message from the history"), ("tab", "complete a /command"),
              ("ctrl+p", "command palette: every action, and `policy …`")]


class VramchatApp(Actions, App):
    CSS_PATH = "vramchat.tcss"
    TITLE = "vramchat"
    COMMANDS = App.COMMANDS | {PolicyCommands}
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        Binding("ctrl+o", "load", "Load doc", id="load"),
        Binding("f2", "policy", "Policy", id="policy"),
        Binding("ctrl+y", "copy_answer", "Copy answer", id="copy_answer", priority=True),
        Binding("ctrl+b", "copy_code", "Copy code", id="copy_code", show=False),
        Binding("ctrl+s", "save", "Save", id="save", show=False),
        Binding("ctrl+n", "clear", "New chat", id="clear", show=False),
        Binding("f1", "help", "Help", id="help"),
    ]

    def __init__(self, make_runtime: MakeRuntime, *, config: Config | None = None,
                 doc_paths: Iterable[str] = (), make_runtime_for: MakeRuntimeFor | None = None,
                 policy: str | None = None) -> None:
        super().__init__()
        self.config = config or Config()
        self.make_runtime = make_runtime
        self.make_runtime_for = make_runtime_for
        self.load_policy = policy  # switched to after each load (None: the runtime as built)
        self.asking = False  # the heads dialog is up: documents given at start wait
        self.runtime = None  # the loaded runtime, taken from each JobDone (UI thread only)
        self.worker = ModelWorker(self)
        self.busy: Job | None = None
        self.pending_docs = list(doc_paths)
        self.conv_name = store.new_name()
        self.conv_dir = self.config.conversations_dir()
        self.answer = None  # the Answer being streamed
        self.snapshot = None  # the runtime's CacheState, taken on the model thread after each job

    # ---- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                with Transcript(id="transcript"):
                    yield Note("Loading the model…", "loading")
                with Horizontal(id="progress-row"):
                    yield Static("", id="progress-label", markup=False)
                    yield ProgressBar(id="progress", show_eta=False)
                yield ChatInput(id="input", placeholder="Ask about your documents · /help · Ctrl+O loads a document")
                yield Static("", id="hint", markup=False)
            with VerticalScroll(id="side"):
                yield Gauge("vram", id="vram")
                yield Gauge("host", id="host")
                yield ContextMeter(id="context")
                yield PolicyPanel(id="policy")
        yield Footer()

    def on_mount(self) -> None:
        self.main_screen = self.screen  # widgets are looked up here even while a dialog is on top
        for widget_id, title in (("vram", "VRAM"), ("host", "Host RAM"), ("context", "Context"),
                                 ("policy", "KV policy")):
            self.main_screen.query_one(f"#{widget_id}").border_title = title
        if self.config.theme in self.available_themes:
            self.theme = self.config.theme
        else:
            self.notify(f"unknown theme `{self.config.theme}` in the config; using {self.theme}",
                        severity="warning")
        if self.config.keymap:
            self.set_keymap(self.config.keymap)
        self.main_screen.query_one("#progress-row").display = False
        self.main_screen.query_one(ChatInput).saved_names = [p.stem for p in store.list_saved(self.conv_dir)]
        self.main_screen.query_one(ChatInput).focus()
        self.worker.start()
        self.set_interval(0.5, self.poll_memory)
        self.call_after_refresh(self.start_model)  # the first frame is on screen before the slow load

    async def on_unmount(self) -> None:
        self.worker.shutdown()

    @property
    def transcript(self) -> Transcript:
        return self.main_screen.query_one(Transcript)

    @property
    def status(self) -> StatusLine:
        return self.main_screen.query_one(StatusLine)

    # ---- jobs -----------------------------------------------------------------------------
    def submit(self, job: Job) -> Job | None:
        """Hand a job to the model thread; refused (with a note) while another one runs."""
        if self.busy is not None:
            self.notify(f"Busy {self.busy.kind}; wait, or press Esc to stop it.", severity="warning")
            return None
        self.busy = job
        self.status.state = job.kind
        return self.worker.submit(job, self.runtime)

    def needs_model(self) -> bool:
        if self.runtime is None:
            if self.busy is not None:
                self.notify(f"Busy {self.busy.kind}; try again when it is done.", severity="warning")
            else:
                self.show_error("No model", "No model is loaded. Use /model ID_OR_PATH to load one.")
            return False
        if self.busy is not None:
            self.notify(f"Busy {self.busy.kind}; wait, or press Esc to stop it.", severity="warning")
            return False
        return True

    async def on_job_done(self, msg: JobDone) -> None:
        self.busy = None
        self.runtime, self.snapshot = msg.runtime, msg.state
        self.status.state = "idle"
        self.main_screen.query_one("#progress-row").display = False
        if msg.error is None:
            if msg.job.done is not None:
                await _maybe_await(msg.job.done(msg.result))
        else:
            if msg.job.failed is not None:
                await _maybe_await(msg.job.failed(msg.error))
            self.report_error(msg.job.kind, msg.error)
        self.refresh_panels()
        if msg.error is None:
            self.next_document()

    def next_document(self) -> None:
        """Read the next document given at start, when the model is free for it."""
        if self.pending_docs and self.runtime is not None and self.busy is None and not self.asking:
            self.load_document(self.pending_docs.pop(0))

    def report_error(self, kind: str, error: BaseException) -> None:
        from app.runtime.types import Stopped
        if isinstance(error, Stopped):
            self.notify(str(error) or "Stopped.", title="Stopped")
        elif isinstance(error, (VramchatError, SpecError)):
            self.show_error(f"Error while {kind}", str(error))
        else:
            self.log.error("".join(traceback.format_exception(error)))
            self.show_error(f"Unexpected error while {kind}", f"{type(error).__name__}: {error}\n\n"
                            "The conversation is kept; it is autosaved after every turn.")

    def show_error(self, title: str, message: str) -> None:
        self.push_screen(ErrorDialog(title, message))

    # ---- messages from the model thread ---------------------------------------------------
    async def on_tokens(self, msg: Tokens) -> None:
        text = self.worker.take_tokens()
        self.main_screen.query_one("#progress-row").display = False  # reading is over: decoding
        if text and self.answer is not None:
            await self.answer.write(text)
            self.transcript.follow()
            self.status.state = f"generating · {len(self.answer.text):,} chars"
        self.poll_memory()  # the gauge follows the work, not only the clock

    def on_progress(self, msg: Progress) -> None:
        row = self.main_screen.query_one("#progress-row")
        row.display = True
        self.main_screen.query_one(ProgressBar).update(total=max(msg.total, 1), progress=msg.done)
        rate, left = msg.estimate
        pct = 100 * msg.done / max(msg.total, 1)
        per_s = "–" if rate is None else f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}"
        self.main_screen.query_one("#progress-label", Static).update(
            f"{msg.label}: {msg.done:,}/{msg.total:,} {msg.unit} · {per_s} {msg.unit}/s · ETA {seconds(left)} · Esc stops")
        self.status.state = f"{msg.label} {pct:.0f}%"
        rt = self.runtime
        if rt is not None:  # the cache's published state: the Context panel follows the read
            self.snapshot = rt.snapshot()
        self.refresh_panels()

    def on_status(self, msg: Status) -> None:
        self.status.state = f"loading: {msg.text}"

    def on_notice(self, msg: Notice) -> None:
        self.notify(msg.text, severity="warning")

    def on_chat_input_hint(self, msg: ChatInput.Hint) -> None:
        self.main_screen.query_one("#hint", Static).update(msg.text)

    async def on_chat_input_submitted(self, msg: ChatInput.Submitted) -> None:
        await self.handle_input(msg.text)

    # ---- panels ---------------------------------------------------------------------------
    def poll_memory(self) -> None:
        rt = self.runtime
        if rt is None:
            return
        try:
            report = rt.memory()
        except Exception as e:  # noqa: BLE001 -- a gauge must never take the app down
            self.log.warning(f"memory() failed: {e}")
            return
        try:
            vram = self.main_screen.query_one("#vram", Gauge)
            host = self.main_screen.query_one("#host", Gauge)
        except NoMatches:  # the app is quitting and its widgets are already gone
            return
        vram.report = report
        vram.border_title = "VRAM" if report.has_gpu else "Memory (no GPU)"
        host.report = report

    def refresh_panels(self) -> None:
        rt = self.runtime
        if rt is None:
            return
        self.status.model, self.status.device, self.status.weights = rt.model_id, rt.device, rt.weights
        if self.snapshot is not None:
            state = self.snapshot
            try:
                panel = self.main_screen.query_one(PolicyPanel)
                panel.spec, panel.layers = state.policy, list(state.layers)
                self.main_screen.query_one(ContextMeter).info = state.context
            except NoMatches:  # the app is quitting and its widgets are already gone
                return
        self.poll_memory()

    # ---- keys -----------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.worker.stop_current():
            self.status.state = f"stopping {self.busy.kind if self.busy else ''}…"

    def action_help(self) -> None:
        keymap = getattr(self, "_keymap", {})
        keys = [(keymap.get(b.id, b.key) if b.id else b.key, b.description or b.action)
                for b in self.BINDINGS if isinstance(b, Binding)]
        self.push_screen(HelpScreen(INPUT_KEYS + keys))

    def action_copy_answer(self) -> None:
        self.copy_last(code=False)

    def action_copy_code(self) -> None:
        self.copy_last(code=True)

    def get_system_commands(self, screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Load document", "Read a .txt/.md/.pdf file into the conversation", self.action_load)
        yield SystemCommand("Switch KV policy", "Pick a cache policy stack (or type `policy NAME`)",
                            self.action_policy)
        yield SystemCommand("Stop", "Stop generation / document reading (Esc)", self.action_stop)
        yield SystemCommand("New conversation", "Clear the conversation and free the cache", self.action_clear)
        yield SystemCommand("Save conversation", "Save as JSON + Markdown", self.action_save)
        yield SystemCommand("Open conversation", "Open a saved conversation", self.action_open)
        yield SystemCommand("Set system prompt", "Type /system TEXT", lambda: self.prefill_input("/system "))
        yield SystemCommand("Switch model", "Type /model ID_OR_PATH", lambda: self.prefill_input("/model "))
        yield SystemCommand("Copy last answer", "To the clipboard", self.action_copy_answer)
        yield SystemCommand("Copy last code block", "To the clipboard", self.action_copy_code)
        yield SystemCommand("Help", "Keys and commands", self.action_help)

    def prefill_input(self, text: str) -> None:
        box = self.main_screen.query_one(ChatInput)
        box.load_text(text)
        box.move_cursor(box.document.end)
        box.focus()


async def _maybe_await(value) -> None:
    if hasattr(value, "__await__"):
        await value
