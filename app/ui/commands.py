"""Slash commands: the table, parsing, Tab completion, and the command-palette policy provider."""
from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from textual.command import DiscoveryHit, Hit, Hits, Provider

from app.runtime.auto import AUTO, SUMMARY as AUTO_SUMMARY, check_spec
from policies.registry import REGISTRY, SpecError

DOC_SUFFIXES = (".txt", ".md", ".pdf")


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str


COMMANDS = {c.name: c for c in [
    Command("load", "/load PATH", "read a .txt/.md/.pdf document into the conversation (no PATH: file picker)"),
    Command("policy", "/policy SPEC", "switch the KV-cache policy live, e.g. locret+kivi (no SPEC: picker)"),
    Command("system", "/system TEXT", "set the system prompt (no TEXT: remove it)"),
    Command("clear", "/clear", "start a new conversation and free the cache"),
    Command("save", "/save [NAME]", "save the conversation as JSON + Markdown"),
    Command("open", "/open [NAME]", "open a saved conversation (no NAME: pick one)"),
    Command("model", "/model NAME", "switch model (a `main.py models` name such as ollama:qwen2.5:7b, "
            "an HF id, a folder or .gguf; Tab completes); the conversation follows"),
    Command("copy", "/copy [code]", "copy the last answer (or its last code block) to the clipboard"),
    Command("help", "/help", "keys and commands"),
]}


def parse(text: str) -> tuple[str, str] | None:
    """'/policy  full ' -> ('policy', 'full'); None when the text is not a slash command."""
    text = text.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    return name.lower(), arg.strip()


def _common_prefix(words: list[str]) -> str:
    return os.path.commonprefix(words) if words else ""


def _complete_policy(arg: str) -> tuple[str, list[str]]:
    head, plus, last = arg.rpartition("+")
    if ":" in last:
        name = last.partition(":")[0]
        entry = REGISTRY.get(name)
        return arg, [f"{k}= ({o.help or o.kind})" for k, o in entry.options.items()] if entry else []
    summary = {AUTO: AUTO_SUMMARY} if not plus else {}  # auto stands alone
    summary.update((n, e.summary) for n, e in REGISTRY.items())
    names = sorted(n for n in summary if n.startswith(last))
    prefix = head + plus
    if len(names) == 1:
        return prefix + names[0], [f"{names[0]}: {summary[names[0]]}"]
    return prefix + (_common_prefix(names) or last), [f"{n}: {summary[n]}" for n in names]


def _complete_path(arg: str, suffixes=DOC_SUFFIXES) -> tuple[str, list[str]]:
    expanded = os.path.expanduser(arg)
    matches = []
    for p in sorted(glob.glob(glob.escape(expanded) + "*"))[:200]:
        if os.path.isdir(p):
            matches.append(p + os.sep)
        elif p.lower().endswith(suffixes):
            matches.append(p)
    if not matches:
        return arg, []
    common = _common_prefix(matches)
    done = common if len(common) > len(expanded) else expanded
    if arg.startswith("~"):
        home = os.path.expanduser("~")
        done = "~" + done[len(home):] if done.startswith(home) else done
    return done, [os.path.basename(m.rstrip(os.sep)) + (os.sep if m.endswith(os.sep) else "") for m in matches]


_models: tuple[float, list[str]] = (0.0, [])


def model_names() -> list[str]:
    """Names of the models on disk (app/runtime/stores.py), rescanned at most every 30 s: a
    scan reads every GGUF header, too slow for every Tab."""
    global _models
    if time.monotonic() - _models[0] > 30:
        from app import config
        from app.runtime import stores
        try:
            dirs = config.load_config().model_dirs
        except config.ConfigError:
            dirs = []
        _models = (time.monotonic(), stores.names(dirs))
    return _models[1]


def _complete_model(arg: str) -> tuple[str, list[str]]:
    if arg.startswith((".", "/", "~")):
        return _complete_path(arg, (".gguf",))
    names = [n for n in model_names() if n.startswith(arg)]
    if len(names) == 1:
        return names[0], names
    return (_common_prefix(names) or arg), names[:50]


def complete(text: str, saved: list[str] = ()) -> tuple[str, list[str]]:
    """Tab completion: (new text, hint lines). Text that cannot be completed comes back as is."""
    if not text.startswith("/") or "\n" in text:
        return text, []
    name, space, arg = text[1:].partition(" ")
    if not space:
        names = sorted(n for n in COMMANDS if n.startswith(name.lower()))
        if len(names) == 1:
            return f"/{names[0]} ", [f"{COMMANDS[names[0]].usage}: {COMMANDS[names[0]].help}"]
        prefix = _common_prefix(names)
        hints = [f"{COMMANDS[n].usage}: {COMMANDS[n].help}" for n in names]
        return (f"/{prefix}" if len(prefix) > len(name) else text), hints
    if name == "policy":
        new, hints = _complete_policy(arg)
    elif name == "load":
        new, hints = _complete_path(arg)
    elif name == "open":
        names = [s for s in saved if s.startswith(arg)]
        new = names[0] if len(names) == 1 else (_common_prefix(names) or arg)
        hints = names
    elif name == "model":
        new, hints = _complete_model(arg)
    elif name == "copy":
        new, hints = ("code" if "code".startswith(arg) and arg else arg), ["code: the last code block"]
    else:
        return text, [f"{COMMANDS[name].usage}: {COMMANDS[name].help}"] if name in COMMANDS else []
    return f"/{name} {new}", hints


def hint(text: str) -> str:
    """The line under the input: what the command being typed does."""
    if not text.startswith("/") or "\n" in text:
        return ""
    name, space, _ = text[1:].partition(" ")
    if space and name in COMMANDS:
        return f"{COMMANDS[name].usage}: {COMMANDS[name].help}"
    names = [n for n in COMMANDS if n.startswith(name.lower())]
    if not names:
        return f"unknown command /{name}; /help lists them"
    return "   ".join(COMMANDS[n].usage for n in names) + "   (Tab completes)"


def is_document(path: Path) -> bool:
    return path.suffix.lower() in DOC_SUFFIXES


class PolicyCommands(Provider):
    """Command palette: 'policy …' switches to a registered policy, or to the spec typed."""

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        app = self.app
        for name, summary in [(AUTO, AUTO_SUMMARY)] + [(n, e.summary) for n, e in sorted(REGISTRY.items())]:
            label = f"Policy: {name}"
            score = matcher.match(label)
            if score > 0:
                yield Hit(score, matcher.highlight(label), partial(app.switch_policy, name), help=summary)
        spec = query.strip()
        if spec.lower().startswith("policy"):
            spec = spec[6:].strip(" :")
        if spec:
            try:
                check_spec(spec)
            except SpecError:
                return
            yield Hit(1.0, f"Policy: switch to {spec}", partial(app.switch_policy, spec),
                      help="switch the KV-cache policy to this spec")

    async def discover(self) -> Hits:
        for name, entry in sorted(REGISTRY.items()):
            yield DiscoveryHit(f"Policy: {name}", partial(self.app.switch_policy, name), help=entry.summary)
