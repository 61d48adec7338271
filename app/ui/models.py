"""Loading and switching models in the app: the start-up load (then the policy asked for),
/model after a failed start, and a live model switch that keeps the conversation (and goes
back to the old model if the new one fails). A mixin of `VramchatApp`.

NOTE: make_runtime / make_runtime_for build the runtime under `auto` (main.py chat) or as
they see fit (tests, a backend); a load then switches it to `self.load_policy` where one is
asked for (the start-up one, then the one chosen last), so a policy that cannot apply (no
retaining heads) leaves the model loaded.
"""
from __future__ import annotations

import gc

from app.runtime.types import VramchatError
from app.ui import jobs
from app.ui.transcript import Note, loaded_line
from app.ui.worker import Job


class Models:
    def start_model(self) -> None:
        self._load_job(self.make_runtime)

    def _load_job(self, make) -> None:
        """Load a model where none is (at start, or /model after a failed start)."""
        policy = self.load_policy

        def fn(ctx):
            ctx.runtime = make(ctx.status)
            ctx.runtime.on_note = self._runtime_note
            self._configure(ctx.runtime)
            return self._apply_policy(ctx, policy)
        self.submit(Job("loading model", fn, done=self._model_ready, failed=self._model_failed))

    def _configure(self, rt) -> None:
        """On the model thread, as a runtime is made: the config's settings a local runtime
        takes (a backend's runtime and the tests' fake declare none)."""
        from app.runtime.engine import Runtime
        if isinstance(rt, Runtime):
            rt.sources = self.config.sources

    def _apply_policy(self, ctx, spec: str | None) -> jobs.Loaded:
        """On the model thread, after a load: switch the fresh runtime to `spec`."""
        return jobs.apply_policy(ctx.runtime, spec, progress=ctx.progress("converting the cache"), stop=ctx.stop)

    def _runtime_note(self, text: str) -> None:
        """From the model thread, as it is made: auto's choice, a window warning (before reading)."""
        kind = "warning" if text.startswith("warning:") else "system"
        self.call_from_thread(self.transcript.add, Note(text[0].upper() + text[1:], kind))

    def _loading_note(self, text: str, kind: str) -> None:
        for note in self.main_screen.query(".note.loading"):
            note.update(text)
            note.set_classes(f"note {kind}")

    def _model_ready(self, loaded: jobs.Loaded) -> None:
        self._loading_note(loaded_line(loaded), "info")
        self._policy_applied(loaded)

    def _policy_applied(self, loaded: jobs.Loaded) -> None:
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
                self._configure(ctx.runtime)
                self._apply_policy(ctx, policy)
                ctx.runtime.restore(data, progress=ctx.progress("restoring conversation"), stop=ctx.stop)
                raise VramchatError(f"could not load `{model_id}`: {e}\n\nBack on {old_id}; "
                                    "the conversation is kept.") from e
            ctx.runtime = rt
            rt.on_note = self._runtime_note
            self._configure(rt)
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
        self._policy_applied(loaded)
