"""Saving and reopening conversations in the app: autosave after every turn (and while an
answer streams), /save, /open. A mixin of `VramchatApp`; the files are store.py's, the cache
beside each one the runtime's (`save_cache`)."""
from __future__ import annotations

from pathlib import Path

from app.runtime.snapshot import SnapshotError
from app.runtime.types import VramchatError
from app.ui import store
from app.ui.chat_input import ChatInput
from app.ui.screens import ConversationPicker
from app.ui.transcript import Note
from app.ui.worker import Job


class Saving:
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
            save_cache(ctx, path)

    def save(self, name: str = "") -> None:
        if not self.needs_model():
            return
        if name:
            self.conv_name = store.safe_name(name)
        conv_name = self.conv_name

        def fn(ctx):
            path = store.save(self.conv_dir, conv_name, ctx.runtime.to_json())
            save_cache(ctx, path)
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

    async def _after_restore_failed(self, error) -> None:
        if self.runtime is not None:
            await self.transcript.add(Note(f"Conversation autosaved as {self.conv_name}; /open it to retry.",
                                           "error"))


def save_cache(ctx, path: Path) -> None:
    """The cache beside the conversation saved at `path`; a failure is reported, never raised
    (the conversation is saved; reopening it reads it again)."""
    try:
        ctx.runtime.save_cache(store.cache_path(path))
    except (OSError, SnapshotError) as e:
        ctx.warn(f"Cache file not saved ({e}); the conversation is, and reopening it reads it again")
