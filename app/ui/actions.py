"""What each command does: a job for the model thread plus what the screen shows when it ends.

A mixin of `VramchatApp` (kept apart so the layout file stays short). The model thread's work
is jobs.py's (plain functions of a runtime); here it is wrapped in `worker.Job`s and its
results shown. Runtime methods are only ever called inside a job's function, on the model
thread, through `ctx.runtime`; `memory()` is the exception (it reads a published snapshot:
any thread, never blocks; polled by the gauge). A job returns what its `done` shows; it never
assigns the app's state.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from app.runtime.auto import AUTO, check_spec
from app.runtime.types import Sampling, Stopped
from app.ui import commands, jobs, store
from app.ui.jobs import NeedHeads
from app.ui.models import Models
from app.ui.saving import Saving
from app.ui.screens import FilePicker, HeadsDialog, PolicyPicker
from app.ui.transcript import (Answer, DocumentCard, Note, UserTurn, document_detail, last_code_block,
                               policy_line)
from app.ui.worker import Job
from policies.registry import SpecError


class Actions(Models, Saving):
    heads_recipe: dict = {}  # train_heads settings for the dialog's "Train now" (default: its own)

    # ---- chat -----------------------------------------------------------------------------
    async def handle_input(self, text: str) -> None:
        parsed = commands.parse(text)
        if parsed is None:
            await self.ask(text[1:] if text.startswith("//") else text)
            return
        name, arg = parsed
        run = self._commands().get(name)
        if run is None:
            self.show_error("Unknown command", f"/{name} is not a command; /help lists them.")
        else:
            run(arg)

    def _commands(self) -> dict:
        """/name -> what it does with its argument ("" for none)."""
        return {
            "load": lambda arg: self.load_document(arg) if arg else self.action_load(),
            "policy": lambda arg: self.switch_policy(arg) if arg else self.action_policy(),
            "system": lambda arg: self.set_system(arg or None),
            "clear": lambda arg: self.action_clear(),
            "save": self.save,
            "open": lambda arg: self.open(arg) if arg else self.action_open(),
            "model": lambda arg: self.switch_model(arg) if arg else self.show_error("Usage", "/model ID_OR_PATH"),
            "copy": lambda arg: self.copy_last(code=arg == "code"),
            "help": lambda arg: self.action_help(),
        }

    async def ask(self, question: str) -> None:
        if not self.needs_model():
            return
        await self.transcript.add(UserTurn(question))
        self.answer = Answer()
        await self.transcript.add(self.answer)
        cfg = self.config
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p)
        name = self.conv_name

        def fn(ctx):
            pieces, last = [], [time.monotonic()]

            def on_token(piece: str) -> None:
                ctx.on_token(piece)
                pieces.append(piece)
                if time.monotonic() - last[0] >= self.PARTIAL_SAVE_S:  # a kill mid-answer keeps it
                    last[0] = time.monotonic()
                    self.autosave(ctx, name, jobs.with_partial(ctx.runtime, question, "".join(pieces)))
            result = ctx.runtime.ask(question, max_new_tokens=cfg.max_new_tokens, sampling=sampling,
                                     on_token=on_token, progress=ctx.progress("reading the question"),
                                     stop=ctx.stop)
            self.autosave(ctx, name)
            return result
        self.submit(Job("generating", fn, done=self._answered, failed=self._answer_failed))

    async def _answered(self, result) -> None:
        answer, self.answer = self.answer, None
        rest = self.worker.take_tokens()
        if answer is not None:
            await answer.write(rest)
            await answer.finish(result.answer, result.to_json())
            self.transcript.follow()

    async def _answer_failed(self, error) -> None:
        answer, self.answer = self.answer, None
        self.worker.take_tokens()
        if answer is not None:
            await answer.finish(None, None, note=f"failed: {error}")

    def load_document(self, path: str) -> None:
        if not self.needs_model():
            return
        p = Path(path).expanduser()
        name = self.conv_name

        def fn(ctx):
            estimate = jobs.before_load(ctx.runtime, str(p))  # what the policy will hold, before reading
            if estimate:
                ctx.warn(estimate)
            result = jobs.read_document(ctx.runtime, p, progress=ctx.progress(f"reading {p.name}"), stop=ctx.stop)
            self.autosave(ctx, name)
            return result
        self.submit(Job("reading document", fn, done=self._document_loaded, failed=self._document_failed))

    async def _document_failed(self, error) -> None:
        if isinstance(error, Stopped):  # what was read is kept where the read got far enough (partial.py)
            await self.transcript.add(Note(f"Reading stopped: {error}.", "system"))

    async def _document_loaded(self, result) -> None:
        info, content = result
        await self.transcript.add(DocumentCard(info.name, info.tokens,
                                               document_detail(info.path, content, info.chars, info.prefill_s)))
        if info.from_cache:
            await self.transcript.add(Note(f"{info.name}: from cache ({info.prefill_s:.1f} s, not read again)."))
        if info.note:
            await self.transcript.add(Note(f"{info.name}: {info.note}."))

    def switch_policy(self, spec: str) -> None:
        try:
            check_spec(spec)
        except SpecError as e:
            self.show_error("Bad policy spec", str(e))
            return
        if self.runtime is None and self.busy is None:  # none loaded (a failed start): the next load's
            self.load_policy = spec
            self.call_later(self.transcript.add, Note(f"No model is loaded: /model ID_OR_PATH loads one under "
                                                      f"`{spec}`.", "policy"))
            return
        if not self.needs_model():
            return
        name = self.conv_name

        def fn(ctx):
            result = jobs.switch_policy(ctx.runtime, spec, progress=ctx.progress("converting the cache"), stop=ctx.stop)
            if isinstance(result, jobs.Switched):
                self.autosave(ctx, name)
            return result
        self.submit(Job("switching policy", fn, done=partial(self._policy_switched, spec)))

    def train_heads(self, spec: str) -> None:
        """Train retaining heads for the model (kept for it), then switch to `spec`."""
        if not self.needs_model():
            return
        name = self.conv_name

        def fn(ctx):
            from app.heads.train import PHASE_UNITS, train_heads
            bars = {}

            def progress(phase, done, total):
                bars.setdefault(phase, ctx.progress(f"training heads: {phase}", PHASE_UNITS[phase]))(done, total)
            card = train_heads(ctx.runtime, None, progress=progress, stop=ctx.stop, threads=torch.get_num_threads(),
                               command=f"the app: {spec}", **self.heads_recipe)
            ctx.status(f"heads trained in {card['wall_time_s']:.0f} s, kept in {card['out']}")
            result = ctx.runtime.set_policy(spec, progress=ctx.progress("converting the cache"), stop=ctx.stop)
            self.autosave(ctx, name)
            return jobs.Switched(result, ctx.runtime.policy_warnings())
        self.submit(Job("training heads", fn, done=partial(self._policy_switched, spec), failed=self._heads_failed))

    async def _heads_failed(self, error) -> None:
        if isinstance(error, Stopped):  # (report_error shows every failure; this says what comes next)
            await self.transcript.add(Note(f"Training stopped; what was trained is kept: {error}", "system"))

    def ask_heads(self, need: NeedHeads) -> None:
        """HeadsDialog: train the heads then switch to need.spec, or use `auto`. While it is up,
        documents given at start wait (a training run would find the model busy reading)."""
        self.asking = True

        def chosen(what):
            self.asking = False
            if what == "train":
                self.train_heads(need.spec)
            elif what == "auto" and not need.auto:
                self.switch_policy(AUTO)
            else:
                if what == "auto":  # already under auto: it stays
                    self.load_policy = AUTO
                    self.call_later(self.transcript.add, Note(f"Policy: auto ({self.snapshot.policy} for now, "
                                                              "chosen again as the conversation grows).", "policy"))
                self.next_document()
        self.push_screen(HeadsDialog(need.model, need.spec, need.seconds, need.device), chosen)

    async def _policy_switched(self, spec: str, result) -> None:
        if isinstance(result, NeedHeads):
            self.ask_heads(result)
            return
        self.load_policy = spec  # a model loaded next comes up under it
        await self.transcript.add(Note(policy_line(spec, result.result), "policy"))
        self._policy_warnings(result.warnings)

    def set_system(self, text: str | None) -> None:
        if not self.needs_model():
            return
        name = self.conv_name

        def fn(ctx):
            ctx.runtime.set_system(text)
            self.autosave(ctx, name)
        note = f"System prompt: {text}" if text else "System prompt removed."
        self.submit(Job("setting the system prompt", fn,
                        done=lambda _: self.transcript.add(Note(note, "system"))))

    def action_clear(self) -> None:
        if not self.needs_model():
            return

        def fn(ctx):
            ctx.runtime.clear()
        self.submit(Job("clearing", fn, done=self._cleared))

    async def _cleared(self, _) -> None:
        self.conv_name = store.new_name()
        await self.transcript.remove_children()
        await self.transcript.add(Note("New conversation; the cache is empty."))

    # ---- pickers and clipboard ------------------------------------------------------------
    def action_load(self) -> None:
        def chosen(path: str | None) -> None:
            if path:
                self.load_document(path)
        self.push_screen(FilePicker(Path.cwd()), chosen)

    def action_policy(self) -> None:
        current = self.snapshot.policy if self.snapshot is not None else self.config.policy

        def chosen(spec: str | None) -> None:
            if spec:
                self.switch_policy(spec)
        self.push_screen(PolicyPicker(current), chosen)

    def copy_last(self, code: bool) -> None:
        answers = [a for a in self.transcript.answers() if a.text]
        if not answers:
            self.notify("No answer to copy yet.", severity="warning")
            return
        text = answers[-1].text
        if code:
            text = last_code_block(text)
            if text is None:
                self.notify("The last answer has no code block.", severity="warning")
                return
        self.copy_to_clipboard(text)
        self.notify(f"Copied {'code block' if code else 'answer'} ({len(text):,} characters).")

