"""The model thread's work for each command, as plain functions of a runtime: no Textual here,
so each is tested with a runtime alone. The app (actions.py) wraps them in `worker.Job`s and
shows what they return (transcript.py words it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.runtime.auto import AUTO
from app.runtime.types import ConversionResult, DocumentInfo, VramchatError
from policies.registry import NoHeadsError, SpecError


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


@dataclass(frozen=True)
class Switched:
    """A policy switch done: its result and what the new policy says a person should know."""
    result: ConversionResult
    warnings: list


def need_heads(rt, spec: str) -> NeedHeads:
    """What the heads dialog shows: the seconds `train-heads`' default recipe would take here."""
    from app.heads.train import estimate_seconds
    params = sum(p.numel() for p in rt.adapter.model.parameters())
    return NeedHeads(spec, rt.model_id, estimate_seconds(params, rt.adapter.info, rt.device.type), str(rt.device),
                     auto=rt.auto)


def apply_policy(rt, spec: str | None, progress=None, stop=None) -> Loaded:
    """After a load: switch the fresh runtime to `spec` (None, or `auto` on a runtime built
    under it: nothing to do). A spec that cannot apply leaves the model loaded, and says why."""
    need = error = None
    if spec is not None and not (spec == AUTO and rt.auto):
        try:
            rt.set_policy(spec, progress=progress, stop=stop)
        except NoHeadsError:
            need = need_heads(rt, spec)
        except (SpecError, VramchatError) as e:
            error = e
    auto = spec == AUTO and error is None or need is not None and need.auto
    return Loaded(rt, f"{AUTO}: {rt.policy}" if auto else rt.policy, rt.policy_warnings(), need, error)


def switch_policy(rt, spec: str, progress=None, stop=None) -> Switched | NeedHeads:
    try:
        result = rt.set_policy(spec, progress=progress, stop=stop)
    except NoHeadsError:
        return need_heads(rt, spec)
    return Switched(result, rt.policy_warnings())


def before_load(rt, path: str) -> str:
    """The line shown before a document is read: its tokens and what the policy will hold (the
    estimate of `main.py plan`); "" for a runtime that holds no cache here (a backend) or a file
    that cannot be read (reading says why)."""
    from app.runtime.engine import Runtime
    if not isinstance(rt, Runtime):
        return ""
    from app.plan import before_load as estimate
    try:
        return estimate(rt, path)
    except (VramchatError, SpecError):
        return ""


def read_document(rt, path: Path, progress=None, stop=None) -> tuple[DocumentInfo, str]:
    """Read the document at `path` into the conversation. -> (what was read, the start of its
    text for the card)."""
    info = rt.load_document(str(path), progress=progress, stop=stop)
    docs = [m for m in rt.messages if m.get("role") == "document"]
    return info, str(docs[-1].get("content", ""))[:4000] if docs else ""


def with_partial(rt, question: str, text: str) -> dict:
    """The conversation as it would reopen if the process died now: the answer so far, partial."""
    data = rt.to_json()
    msgs = data["messages"] = [dict(m) for m in data.get("messages", [])]
    if not msgs or msgs[-1].get("role") != "user" or msgs[-1].get("content") != question:
        msgs.append({"role": "user", "content": question})  # not yet appended by the runtime
    msgs.append({"role": "assistant", "content": text, "partial": True})
    return data
