"""What each command does: a job for the model thread plus what the screen shows when it ends.

A mixin of `VramchatApp` (kept apart so the layout file stays short). Runtime methods are only
ever called inside a job's function, on the model thread, through `ctx.runtime`; `memory()` is
the exception (it reads a published snapshot: any thread, never blocks; polled by the gauge).
A job returns what its `done` shows; it never assigns the app's state.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from app.runtime.snapshot import SnapshotError
from app.runtime.types import Sampling, Stopped, VramchatError
from app.ui import commands, store
from app.ui.chat_input import ChatInput
from app.ui.panels import fmt_bytes
from app.ui.screens import ConversationPicker, FilePicker, HeadsDialog, PolicyPicker
from app.ui.transcript import Answer, DocumentCard, Note, UserTurn, document_detail, last_code_block
from app.ui.worker import Job
from app.runtime.auto import AUTO, check_spec
from policies.registry import NoHeadsError, SpecError, parse_spec


@dataclass(frozen=True)
class NeedHeads:
    """A switch to `spec` found no retaining heads: ask what to do (HeadsDialog). auto: the
    runtime is under `auto` already (a model loaded for `spec`), so "Use auto" keeps it."""
    spec: str
    model: str
    seconds: float
    device: str
    auto: bool = False


@dataclass(frozen=True)
class Loaded:
    """A model loaded, then switched to the policy asked for: what the screen says of it.
    policy: the one it runs under (`auto: full` when auto chose); need: the policy asked for
    has no heads here (ask); error: why it could not be used otherwise (the model runs under
    what it was built with)."""
    runtime: object
    policy: str
    warnings: list
    need: NeedHeads | None = None
    error: BaseException | None = None


def need_heads(rt, spec: str) -> NeedHeads:
    return NeedHeads(spec, rt.model_id, *heads_estimate(rt), auto=rt.auto)


def heads_estimate(rt) -> tuple[float, str]:
    """(seconds `train-heads`' default recipe would take here, device) for the dialog."""
    from app.heads.train import estimate_seconds
    params = sum(p.numel() for p in rt.adapter.model.parameters())
    return estimate_seconds(params, rt.adapter.info, rt.device.type), str(rt.device)


class Actions:
    heads_recipe: dict = {}  # train_heads settings for the dialog's "Train now" (default: its own)

    # ---- model ---------------------------------------------------------------------------
    # NOTE: make_runtime / make_runtime_for build the runtime under `auto` (main.py chat) or as
    # they see fit (tests, a backend); a load then switches it to `self.load_policy` where one
    # is asked for (the start-up one, then the one chosen last), so a policy that cannot apply
    # (no retaining heads) leaves the model loaded.

    def start_model(self) -> None:
        self._load_job(self.make_runtime)

    def _load_job(self, make) -> None:
        """Load a model where none is (at start, or /model after a failed start)."""
        policy = self.load_policy

        def fn(ctx):
            ctx.runtime = make(ctx.status)
            ctx.runtime.on_note = self._runtime_note
            return self._apply_policy(ctx, policy)
        self.submit(Job("loading model", fn, done=self._model_ready, failed=self._model_failed))

    def _apply_policy(self, ctx, spec: str | None) -> Loaded:
        """On the model thread, after a load: switch the fresh runtime to `spec` (None, or
        `auto` on a runtime built under it: nothing to do)."""
        rt = ctx.runtime
        need = error = None
        if spec is not None and not (spec == AUTO and rt.auto):
            try:
                rt.set_policy(spec, progress=ctx.progress("converting the cache"), stop=ctx.stop)
            except NoHeadsError:
                need = need_heads(rt, spec)
            except (SpecError, VramchatError) as e:
                error = e
        auto = spec == AUTO and error is None or need is not None and need.auto
        return Loaded(rt, f"{AUTO}: {rt.policy}" if auto else rt.policy, rt.policy_warnings(), need, error)

    def _runtime_note(self, text: str) -> None:
        """From the model thread, as it is made: auto's choice, a window warning (before reading)."""
        kind = "warning" if text.startswith("warning:") else "system"
        self.call_from_thread(self.transcript.add, Note(text[0].upper() + text[1:], kind))

    def _loading_note(self, text: str, kind: str) -> None:
        for note in self.main_screen.query(".note.loading"):
            note.update(text)
            note.set_classes(f"note {kind}")

    def _model_ready(self, loaded: Loaded) -> None:
        rt = loaded.runtime
        self._loading_note(
            f"Loaded {rt.model_id} on {rt.device} ({rt.weights}, window {rt.window:,} tokens), "
            f"policy {loaded.policy}. Ask a question, /load a document (Ctrl+O), F1 for help.", "info")
        self._policy_warnings(loaded.warnings)
        if loaded.error is not None:
            self.show_error("Policy not applied", f"{loaded.error}\n\nThe model is loaded under "
                            f"`{loaded.policy}`; /policy SPEC switches it.")
        if loaded.need is not None:
            self.ask_heads(loaded.need)

    def _policy_warnings(self, warnings) -> None:
        for w in warnings:
            self.notify(f"Policy: {w}", severity="warning", timeout=10)

    def _model_failed(self, error) -> None:
        self._loading_note(f"The model did not load: {error}\nUse /model ID_OR_PATH to load one "
                           "(/policy SPEC first changes the policy it loads under).", "error")

    def switch_model(self, model_id: str) -> None:
        if self.make_runtime_for is None:
            self.show_error("Cannot switch model", "This session was started without a model loader "
                            "(make_runtime_for); restart with `main.py chat --model ID`.")
            return
        if self.runtime is None and self.busy is None:  # none loaded (a failed start): load one
            self.call_later(self.transcript.add, Note(f"Loading {model_id}…", "loading"))
            self._load_job(lambda status: self.make_runtime_for(model_id, status))
            return
        if not self.needs_model():
            return
        name, policy = self.conv_name, self.load_policy

        def fn(ctx):
            old, ctx.runtime = ctx.runtime, None
            data, old_id = old.to_json(), old.model_id
            self.autosave(ctx, name, data)
            del old
            gc.collect()  # free the old weights and cache before loading the new model
            try:
                rt = self.make_runtime_for(model_id, ctx.status)
            except BaseException as e:
                ctx.runtime = self.make_runtime_for(old_id, ctx.status)
                self._apply_policy(ctx, policy)
                ctx.runtime.restore(data, progress=ctx.progress("restoring conversation"), stop=ctx.stop)
                raise VramchatError(f"could not load `{model_id}`: {e}\n\nBack on {old_id}; "
                                    "the conversation is kept.") from e
            ctx.runtime = rt
            rt.on_note = self._runtime_note
            loaded = self._apply_policy(ctx, policy)
            if data.get("messages") or data.get("system"):
                rt.restore(data, progress=ctx.progress("re-reading conversation"), stop=ctx.stop)
            return rt.system, list(rt.messages), loaded
        if self.submit(Job("switching model", fn, done=self._model_switched, failed=self._after_restore_failed)):
            self.runtime = None  # NOTE: only the job holds the old model now, so it can free it before the load

    async def _model_switched(self, result) -> None:
        system, messages, loaded = result
        await self.transcript.rebuild(system, messages)
        rt = self.runtime
        await self.transcript.add(Note(f"Switched to {rt.model_id} on {rt.device} ({rt.weights}); "
                                       "the conversation was re-read."))
        self._policy_warnings(loaded.warnings)
        if loaded.error is not None:
            self.show_error("Policy not applied", f"{loaded.error}\n\nThe model is loaded under "
                            f"`{loaded.policy}`; /policy SPEC switches it.")
        if loaded.need is not None:
            self.ask_heads(loaded.need)

    async def _after_restore_failed(self, error) -> None:
        if self.runtime is not None:
            await self.transcript.add(Note(f"Conversation autosaved as {self.conv_name}; /open it to retry.",
                                           "error"))

    # ---- chat -----------------------------------------------------------------------------
    async def handle_input(self, text: str) -> None:
        parsed = commands.parse(text)
        if parsed is None:
            await self.ask(text[1:] if text.startswith("//") else text)
            return
        name, arg = parsed
        if name == "load":
            self.load_document(arg) if arg else self.action_load()
        elif name == "policy":
            self.switch_policy(arg) if arg else self.action_policy()
        elif name == "system":
            self.set_system(arg or None)
        elif name == "clear":
            self.action_clear()
        elif name == "save":
            self.save(arg)
        elif name == "open":
            self.open(arg) if arg else self.action_open()
        elif name == "model":
            self.switch_model(arg) if arg else self.show_error("Usage", "/model ID_OR_PATH")
        elif name == "copy":
            self.copy_last(code=arg == "code")
        elif name == "help":
            self.action_help()
        else:
            self.show_error("Unknown command", f"/{name} is not a command; /help lists them.")

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
                    self.autosave(ctx, name, _with_partial(ctx.runtime, question, "".join(pieces)))
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
            rt = ctx.runtime
            estimate = rt.load_estimate(str(p))  # what the policy will hold, before reading
            if estimate:
                ctx.warn(estimate)
            info = rt.load_document(str(p), progress=ctx.progress(f"reading {p.name}"), stop=ctx.stop)
            docs = [m for m in rt.messages if m.get("role") == "document"]
            content = str(docs[-1].get("content", ""))[:4000] if docs else ""
            self.autosave(ctx, name)
            return info, content
        self.submit(Job("reading document", fn, done=self._document_loaded))

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
            try:
                result = ctx.runtime.set_policy(spec, progress=ctx.progress("converting the cache"), stop=ctx.stop)
            except NoHeadsError:
                return need_heads(ctx.runtime, spec)
            self.autosave(ctx, name)
            return result, ctx.runtime.policy_warnings()
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
            return result, ctx.runtime.policy_warnings()
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
        r, warnings = result
        how = "re-read the conversation" if r.reprefilled else "converted in place"
        lossy = ", lossy" if r.lossy else ""
        new = f"{AUTO}: {r.new_policy}" if spec == AUTO else r.new_policy
        await self.transcript.add(Note(f"Policy {r.old_policy} → {new}: KV {fmt_bytes(r.before_bytes)} → "
                                       f"{fmt_bytes(r.after_bytes)} ({r.message or how}{lossy})", "policy"))
        self._policy_warnings(warnings)

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

    # ---- saving ---------------------------------------------------------------------------
    PARTIAL_SAVE_S = 1.0  # while an answer streams, autosave it (marked partial) this often

    def autosave(self, ctx, name: str, data: dict | None = None) -> None:
        """On the model thread, after every turn: ctx.runtime's conversation (or `data`) saved
        as `name`. An error is reported to the UI (once per job), never raised."""
        try:
            path = store.save(self.conv_dir, name, data if data is not None else ctx.runtime.to_json())
        except (OSError, TypeError, ValueError) as e:
            ctx.warn(f"Autosave failed: {e}")
            return
        if data is None:  # a whole turn: its cache too (a partial answer's JSON reopens on the last one)
            _save_cache(ctx, path)

    def save(self, name: str = "") -> None:
        if not self.needs_model():
            return
        if name:
            self.conv_name = store.safe_name(name)
        conv_name = self.conv_name

        def fn(ctx):
            path = store.save(self.conv_dir, conv_name, ctx.runtime.to_json())
            _save_cache(ctx, path)
            return path

        def done(path):
            self.main_screen.query_one(ChatInput).saved_names = [p.stem for p in store.list_saved(self.conv_dir)]
            self.notify(f"Saved {path} and {path.with_suffix('.md').name}", title="Saved")
        self.submit(Job("saving", fn, done=done))

    def action_save(self) -> None:
        self.save()

    def action_open(self) -> None:
        def chosen(path: str | None) -> None:
            if path:
                self.open(path)
        self.push_screen(ConversationPicker(store.list_saved(self.conv_dir)), chosen)

    def open(self, name_or_path: str) -> None:
        try:
            path = store.resolve(self.conv_dir, name_or_path)
            data = store.load(path)
        except VramchatError as e:
            self.show_error("Cannot open", str(e))
            return
        if not self.needs_model():
            return

        name = self.conv_name

        def fn(ctx):
            self.autosave(ctx, name)  # the conversation being replaced stays on disk
            how = ctx.runtime.restore(data, progress=ctx.progress(f"re-reading {path.stem}"), stop=ctx.stop,
                                      cache_file=store.cache_path(path))
            return ctx.runtime.system, list(ctx.runtime.messages), how

        async def done(result) -> None:
            self.conv_name = path.stem
            await self.transcript.rebuild(*result[:2])
            await self.transcript.add(Note(f"Opened {path.stem} ({len(result[1])} messages): {result[2]}."))
        self.submit(Job("opening conversation", fn, done=done, failed=self._after_restore_failed))

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


def _save_cache(ctx, path: Path) -> None:
    """The cache beside the conversation saved at `path`; a failure is reported, never raised
    (the conversation is saved; reopening it reads it again)."""
    try:
        ctx.runtime.save_cache(store.cache_path(path))
    except (OSError, SnapshotError) as e:
        ctx.warn(f"Cache file not saved ({e}); the conversation is, and reopening it reads it again")


def _with_partial(rt, question: str, text: str) -> dict:
    """The conversation as it would reopen if the process died now: the answer so far, partial."""
    data = rt.to_json()
    msgs = data["messages"] = [dict(m) for m in data.get("messages", [])]
    if not msgs or msgs[-1].get("role") != "user" or msgs[-1].get("content") != question:
        msgs.append({"role": "user", "content": question})  # not yet appended by the runtime
    msgs.append({"role": "assistant", "content": text, "partial": True})
    return data
