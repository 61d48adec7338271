"""Modal screens: policy picker, document picker, saved-conversation picker, error dialog, help,
the viewer of an answer's source."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from app.ui import commands
from app.runtime.auto import check_spec
from policies.registry import REGISTRY, SLOTS, SpecError


def compose_spec(current: str, name: str) -> str:
    """Put policy `name` into spec `current`: replace the part that fills the same slot, or append.
    Parts that name no registered policy are dropped (they could never apply)."""
    slot = REGISTRY[name].slot
    parts = [p for p in current.split("+") if p.partition(":")[0].strip() in REGISTRY]
    for i, part in enumerate(parts):
        if REGISTRY[part.partition(":")[0].strip()].slot == slot:
            parts[i] = name
            return "+".join(parts)
    return "+".join(parts + [name]) if parts else name


class PolicyPicker(ModalScreen[str | None]):
    """Pick policies from the registry to build a spec; Enter applies it, Esc cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, current: str) -> None:
        super().__init__(classes="dialog-screen")
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="policy-picker") as box:
            box.border_title = "Switch KV-cache policy"
            yield Label(f"Current: {self.current}", id="policy-current")
            yield Input(self.current, placeholder="spec, e.g. locret:budget=2048+kivi", id="policy-spec")
            yield Static("", id="policy-error", markup=False)
            options = []
            for name, entry in sorted(REGISTRY.items(), key=lambda kv: (SLOTS.index(kv[1].slot), kv[0])):
                opts = ", ".join(f"{k}={o.default}" for k, o in entry.options.items())
                label = f"{name} ({entry.slot}): {entry.summary}" + (f"\n    options: {opts}" if opts else "")
                options.append(Option(label, id=name))
            yield OptionList(*options, id="policy-list")
            yield Static("Select a policy to put it in the spec (same slot: replaced; new slot: added with +). "
                         "Enter on the spec applies it; Esc cancels.", classes="dialog-help")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        spec_input = self.query_one("#policy-spec", Input)
        spec_input.value = compose_spec(spec_input.value, event.option.id)
        spec_input.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        spec = event.value.strip()
        try:
            check_spec(spec)
        except SpecError as e:
            self.query_one("#policy-error", Static).update(str(e))
            return
        self.dismiss(spec)


class DocumentTree(DirectoryTree):
    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or commands.is_document(p))]


class FilePicker(ModalScreen[str | None]):
    """Browse for a .txt/.md/.pdf document; a path can also be typed."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, root: str | Path = ".") -> None:
        super().__init__(classes="dialog-screen")
        self.root = Path(root)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="file-picker") as box:
            box.border_title = "Load a document (.txt, .md, .pdf)"
            yield Input(placeholder="or type a path and press Enter", id="file-path")
            yield DocumentTree(self.root, id="file-tree")

    def on_mount(self) -> None:
        self.query_one(DocumentTree).focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(str(event.path))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())


class ConversationPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, paths: list[Path]) -> None:
        super().__init__(classes="dialog-screen")
        self.paths = paths

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="open-picker") as box:
            box.border_title = "Open a saved conversation"
            if not self.paths:
                yield Static("No saved conversations yet; /save NAME saves one.")
            options = [Option(f"{p.stem:<32}{time.strftime('%Y-%m-%d %H:%M', time.localtime(p.stat().st_mtime))}",
                              id=str(p)) for p in self.paths]
            yield OptionList(*options, id="open-list")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class ErrorDialog(ModalScreen[None]):
    """Shows an error message verbatim; the conversation underneath is untouched."""

    BINDINGS = [Binding("escape,enter", "dismiss(None)", "Close")]

    def __init__(self, title: str, message: str) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="error-dialog") as box:
            box.border_title = self.title_text
            yield Static(self.message, markup=False, id="error-message")
            with Horizontal(classes="buttons"):
                yield Button("OK", variant="error", id="error-ok")

    def on_mount(self) -> None:
        self.query_one(Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)


class HeadsDialog(ModalScreen[str | None]):
    """`locret` for a model without retaining heads: train them now (they are kept, and a
    stopped run resumes), or read with `auto`, which holds the document without heads.
    Dismisses with "train", "auto" or None (Esc)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, model: str, spec: str, estimate_s: float, device: str) -> None:
        super().__init__(classes="dialog-screen")
        self.model, self.spec, self.estimate_s, self.device = model, spec, estimate_s, device

    def compose(self) -> ComposeResult:
        minutes = max(1, round(self.estimate_s / 60))
        with Vertical(classes="dialog", id="heads-dialog") as box:
            box.border_title = "No retaining heads for this model"
            yield Static(f"`{self.spec}` needs retaining heads trained for {self.model}; none ship for it "
                         f"and none were trained on this machine.\n\nTrain them now: about {minutes} min on "
                         f"{self.device} (an estimate). A progress bar shows each phase; Esc stops, and the "
                         "next training resumes where it stopped. They are kept for this model.\n\n"
                         "Or use `auto`: it holds the document with a policy that needs no heads.",
                         markup=False, id="heads-message")
            with Horizontal(classes="buttons"):
                yield Button("Train now", variant="primary", id="heads-train")
                yield Button("Use auto", id="heads-auto")
                yield Button("Cancel", id="heads-cancel")

    def on_mount(self) -> None:
        self.query_one("#heads-train", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss({"heads-train": "train", "heads-auto": "auto"}.get(event.button.id))


def help_markdown(keys: list[tuple[str, str]]) -> str:
    rows = "\n".join(f"| `{k}` | {d} |" for k, d in keys)
    cmds = "\n".join(f"| `{c.usage}` | {c.help} |" for c in commands.COMMANDS.values())
    return f"""\
## Keys

| key | does |
|---|---|
{rows}

## Commands

| command | does |
|---|---|
{cmds}

Every action is also in the command palette (**Ctrl+P**); type `policy` there to switch policies.
Keys can be changed in the `[keymap]` table of the config file.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__(classes="dialog-screen")
        self.keys = keys

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="help") as box:
            box.border_title = "vramchat help (Esc closes)"
            yield Markdown(help_markdown(self.keys))


class SourceViewer(ModalScreen[None]):
    """One source of an answer in its document: its line marked, with the lines around it.
    lines: [(line number, text, is the source's)] (sources.excerpt); missing: why the
    document's text is not shown, or ""."""

    BINDINGS = [Binding("escape,enter,q", "dismiss(None)", "Close")]

    def __init__(self, title: str, lines: list[tuple[int, str, bool]], source: dict, missing: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.lines, self.source, self.missing = title, lines, source, missing

    def compose(self) -> ComposeResult:
        width = len(str(max((n for n, _, _ in self.lines), default=0)))
        text = Content("\n").join(
            Content.assemble((f"{n:>{width}} ", "dim"), (line, "bold reverse") if mine else line)
            for n, line, mine in self.lines)
        s = self.source
        with VerticalScroll(classes="dialog", id="source-viewer") as box:
            box.border_title = f"Source: {self.title_text}"
            box.border_subtitle = (f"{s.get('weight', 0.0):.0%} of the answer's attention on documents · "
                                   f"{s.get('tier', '?')}")
            if self.missing:
                yield Static(self.missing, markup=False, classes="dialog-help")
            yield Static(text, id="source-text")
            yield Static("Esc closes.", classes="dialog-help")
