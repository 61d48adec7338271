"""The message box: multi-line, Enter sends, Ctrl+J (or Shift+Enter) inserts a newline,
Up/Down walk the history from the first/last line, Tab completes slash commands.

NOTE: send and newline are handled in the box's own key handler, in order with the
characters, not as priority bindings. A priority binding runs when the app first sees
the key, before the box has inserted the characters queued ahead of it: a burst such as
`tmux send-keys "question" Enter` (or a pasted line ending in a newline) then sent the
old, empty text and left the question in the box."""
from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from app.ui import commands


class ChatInput(TextArea):
    BINDINGS = [
        Binding("enter", "send", "Send", id="send"),
        Binding("ctrl+j,shift+enter", "newline", "Newline", id="newline"),
    ]

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Hint(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         compact=True, **kwargs)
        self.sent: list[str] = []
        self._history_pos: int | None = None  # index into history while browsing
        self._draft = ""
        self.saved_names: list[str] = []  # for /open completion; set by the app

    def action_send(self) -> None:
        text = self.text.strip()
        if not text:
            return
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._history_pos = None
        self.clear()
        self.post_message(self.Submitted(text))

    def _own_keys(self) -> dict:
        """key -> this box's bindings, with the app's keymap (config [keymap]) applied as
        Textual applies it to the binding chain (on a copy, per lookup)."""
        bindings = self._bindings.copy()
        bindings.apply_keymap(self.app._keymap)  # NOTE: Textual keeps the keymap here (8.x)
        return bindings.key_to_bindings

    def action_newline(self) -> None:
        self.insert("\n")

    def _show(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    def history_step(self, step: int) -> bool:
        """Move through the history; True when it moved."""
        if not self.sent:
            return False
        if self._history_pos is None:
            if step > 0:
                return False
            self._draft = self.text
            self._history_pos = len(self.sent) - 1
        else:
            pos = self._history_pos + step
            if pos < 0:
                return True  # stay at the oldest entry
            if pos >= len(self.sent):
                self._history_pos = None
                self._show(self._draft)
                return True
            self._history_pos = pos
        self._show(self.sent[self._history_pos])
        return True

    async def _on_key(self, event: events.Key) -> None:
        for binding in self._own_keys().get(event.key, ()):
            if binding.action in ("send", "newline"):
                event.stop()
                event.prevent_default()
                self.action_send() if binding.action == "send" else self.action_newline()
                return
        row = self.cursor_location[0]
        if event.key == "up" and row == 0 and self.history_step(-1):
            event.stop()
            event.prevent_default()
            return
        if event.key == "down" and row == self.document.line_count - 1 and self.history_step(+1):
            event.stop()
            event.prevent_default()
            return
        if event.key == "tab" and self.text.startswith("/"):
            new, hints = commands.complete(self.text, self.saved_names)
            if new != self.text:
                self._show(new)
            self.post_message(self.Hint("   ".join(hints) if hints else commands.hint(new)))
            event.stop()
            event.prevent_default()
            return
        await super()._on_key(event)

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        self.post_message(self.Hint(commands.hint(self.text)))
