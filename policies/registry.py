"""Policy registry and the spec parser.

A spec is `name[:key=val,key=val][+name[:...]]...`, e.g. `locret:budget=2048+kivi:bits=2`.
Each policy fills one slot of a layer's cache (see `policies.base`); two policies that
claim the same slot, an unknown name, an unknown option or a bad value is a `SpecError`
naming the offending part.

Every module that registers policies is listed in `MODULES` and imported by `load` when
`policies` is imported, so a spec parses in any process that imports `policies`.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

SLOTS = ("selector", "store", "spill", "reader", "ffn")
MODULES = ("policies.full", "policies.kivi", "policies.locret", "policies.streaming", "policies.h2o",
           "policies.snapkv", "policies.anchor", "policies.lighttransfer", "policies.ffnskip", "offload")


class SpecError(ValueError):
    """A policy spec or option that cannot be used; the message names the bad part."""


class NoHeadsError(SpecError):
    """`locret` found no retaining heads for this model (none ship, none were trained here):
    the one refusal a person can fix by training them (`main.py train-heads`, the app's dialog)."""


@dataclass(frozen=True)
class Opt:
    """One option of a policy: its type, default and the range it must fall in."""

    kind: type | str  # int, float, str, bool, "fraction" (1/16 or 0.0625), "path"
    default: Any
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def parse(self, policy: str, key: str, raw: Any) -> Any:
        where = f"option `{key}` of policy `{policy}`"
        try:
            if isinstance(raw, str):
                text = raw.strip()
                if self.kind is bool:
                    low = text.lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = low in ("1", "true", "yes", "on")
                elif self.kind is int:
                    value = int(text)
                elif self.kind is float:
                    value = float(text)
                elif self.kind == "fraction":
                    value = float(Fraction(text))
                else:  # str, path
                    value = text
            else:
                value = raw
                if self.kind is int and (isinstance(raw, bool) or not isinstance(raw, int)):
                    raise ValueError
                if self.kind in (float, "fraction"):
                    value = float(raw)
        except (ValueError, ZeroDivisionError, TypeError):
            kind = self.kind.__name__ if isinstance(self.kind, type) else self.kind
            raise SpecError(f"{where}: {raw!r} is not a valid {kind}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{where}: {raw!r} is not a finite number")
        if self.kind in ("path", str) and self.choices is None and value == "":
            raise SpecError(f"{where}: empty value")
        if self.choices is not None and value not in self.choices:
            raise SpecError(f"{where}: {raw!r} is not one of {', '.join(map(str, self.choices))}")
        if self.min is not None and value < self.min:
            raise SpecError(f"{where}: {value} is below the minimum {self.min:g}")
        if self.max is not None and value > self.max:
            raise SpecError(f"{where}: {value} is above the maximum {self.max:g}")
        return value


@dataclass
class Policy:
    """A parsed, validated policy: its registered class plus option values."""

    name: str
    slot: str
    opts: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> str:
        entry = REGISTRY[self.name]
        changed = {k: self.opts[k] for k, o in entry.options.items() if k in self.opts and self.opts[k] != o.default}
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{k}={fmt_value(v)}" for k, v in changed.items())


def fmt_value(v: Any) -> str:
    """An option value as the canonical spec writes it: bools on/off (as the README does),
    floats short where that reads back the same value."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


@dataclass
class Entry:
    name: str
    slot: str
    options: dict[str, Opt]
    build: Callable  # (policy: Policy, info: ModelInfo, layer: int | None) -> the slot's part (layer None: ffn)
    summary: str
    check: Callable | None = None  # (opts) -> None, raises SpecError for cross-option rules
    place: Callable | None = None  # (slots) -> slot, for a policy whose slot depends on the others


REGISTRY: dict[str, Entry] = {}


def register(name: str, slot: str, options: dict[str, Opt], summary: str, check: Callable | None = None,
             place: Callable | None = None):
    """Decorator for a builder `(policy, info, layer) -> part`; registers policy `name`.
    `info` is the model's `policies.base.ModelInfo`, `layer` the decoder layer's index
    (None for the one model-level `ffn` part, which `KVCache` builds once).

    `place(slots) -> slot`, if given, picks the slot once the whole spec is parsed (`offload`
    is the spill behind an evicting selector, the store otherwise); `slot` is its default."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}")

    def deco(build):
        REGISTRY[name] = Entry(name, slot, options, build, summary, check, place)
        return build

    return deco


def load() -> None:
    """Import every module in `MODULES`; each registers its policies as it is imported.
    NOTE: `offload` imports `policies` (whose `__init__` calls this): whichever is imported
    first, the other finds it half-imported in sys.modules, and `offload` registers once
    the outer import ends, before any spec is parsed."""
    for name in MODULES:
        importlib.import_module(name)


def _show(s: str) -> str:
    return f"`{s}`" if s.isprintable() else repr(s)


def parse_policy(text: str) -> Policy:
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise SpecError(f"empty policy name in {text!r} (a spec looks like locret:budget=2048+kivi)")
    entry = REGISTRY.get(name)
    if entry is None:
        raise SpecError(f"unknown policy {_show(name)}; known: {', '.join(sorted(REGISTRY))}")
    opts = {k: o.default for k, o in entry.options.items()}
    if rest.strip():
        seen = set()
        for item in rest.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise SpecError(f"policy `{name}`: option {item.strip()!r} must look like key=value")
            if key not in entry.options:
                known = ", ".join(entry.options) or "none"
                raise SpecError(f"policy `{name}` has no option {_show(key)} (its options: {known})")
            if key in seen:
                raise SpecError(f"policy `{name}`: option `{key}` given twice")
            seen.add(key)
            opts[key] = entry.options[key].parse(name, key, raw)
    if entry.check is not None:
        entry.check(opts)
    return Policy(name, entry.slot, opts)


def spec_of(slots: dict[str, Policy]) -> str:
    """The canonical spec of parsed slots: slots in `SLOTS` order, each policy with only the
    options that differ from their defaults, in the order it registers them, and no `full`
    selector in front of other parts (it is what a cache has without one)."""
    parts = [slots[s].spec() for s in SLOTS if s in slots]
    if parts and parts[0] == "full" and len(parts) > 1:
        parts = parts[1:]
    return "+".join(parts)


def canonical_spec(spec: str) -> str:
    """The one form of `spec` used for display, comparison and files: two specs that build
    the same cache have the same canonical form (`kivi+locret` and `locret+kivi`;
    `h2o+offload:rank=false,terms=true` and `h2o+offload:terms=on,rank=off`). Raises SpecError."""
    return spec_of(parse_spec(spec))


def parse_spec(spec: str) -> dict[str, Policy]:
    """Parse `a+b:k=v+c` into {slot: Policy}. Raises SpecError naming the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty policy spec; try `full`, or see `--help` for the list")
    slots: dict[str, Policy] = {}
    for part in spec.split("+"):
        pol = parse_policy(part)
        if pol.slot in slots:
            raise SpecError(
                f"`{pol.name}` and `{slots[pol.slot].name}` both decide the cache's {pol.slot}; "
                "keep one of them")
        slots[pol.slot] = pol
    for pol in list(slots.values()):
        place = REGISTRY[pol.name].place
        slot = place(slots) if place is not None else pol.slot
        if slot != pol.slot:
            if slot in slots:
                raise SpecError(f"`{pol.name}` and `{slots[slot].name}` both decide the cache's {slot} here; "
                                "keep one of them")
            del slots[pol.slot]
            pol.slot = slot
            slots[slot] = pol
    return slots
