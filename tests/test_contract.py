"""The contract in code: every registered part's methods take the parameters its slot class
declares (policies/slots.py), and the registry alone says which policies exist."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from app.runtime.engine import Runtime
from policies import REGISTRY, parse_spec, registry, slots
from policies.full import FullStore, KeepAll
from tiny import tiny_pair, tiny_policy_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """-> (ModelInfo of the tiny model, its policy files)."""
    files = tiny_policy_files(tmp_path_factory.mktemp("files"))
    return Runtime.from_model(*tiny_pair(0), model_id="tiny").adapter.info, files


def _specs(name: str, files) -> list[str]:
    """Specs that build `name` in every slot it can take (offload: spill and store)."""
    return {"locret": [f"locret:heads={files['heads']}"],
            "offload": [f"streaming:window=64+offload:channels_file={files['ch']}", "offload"],
            "doublesparse": [f"doublesparse:channels_file={files['ch']}"], "kivi": ["kivi:group=16"]}.get(name, [name])


def _declared(cls) -> dict:
    """{method name: parameter names} of every method the slot classes above `cls` declare."""
    out = {}
    for base in reversed(cls.__mro__):
        if base.__module__ == slots.__name__:
            for name, attr in vars(base).items():
                if not name.startswith("_") and (inspect.isfunction(attr) or isinstance(attr, staticmethod)):
                    out[name] = list(inspect.signature(getattr(base, name)).parameters)
    return out


def _drift(cls) -> list[str]:
    return [f"{cls.__name__}.{name}{tuple(got)}: declared {tuple(want)}"
            for name, want in _declared(cls).items()
            if (got := list(inspect.signature(getattr(cls, name)).parameters)) != want]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_part_takes_what_its_slot_declares(name, built):
    info, files = built
    made = set()
    for spec in _specs(name, files):
        for slot, pol in parse_spec(spec).items():
            if pol.name == name:
                made.add(type(REGISTRY[name].build(pol, info, None if slot == "ffn" else 0)))
    assert made, f"no spec built `{name}`"
    for cls in made:
        assert _declared(cls), f"{cls.__name__} is no slot class"
        assert not _drift(cls)


def test_the_default_parts_take_what_their_slots_declare():
    assert not _drift(FullStore) and not _drift(KeepAll)


def test_the_check_sees_drift():
    class Drifted(FullStore):
        def write_step(self, k, v, at, kernel):
            pass
    assert _drift(Drifted) == ["Drifted.write_step('self', 'k', 'v', 'at', 'kernel'): "
                               "declared ('self', 'k', 'v', 'step', 'start', 'kernel')"]


def test_every_policy_comes_from_a_module_the_registry_lists():
    assert {e.build.__module__ for e in REGISTRY.values()} == set(registry.MODULES)


@pytest.mark.parametrize("first", ["", "import offload", "import offload.host"])
def test_a_fresh_process_parses_every_policy(first):
    """No import for its side effect: `policies` alone knows `offload`'s policies, whichever
    package a process imports first."""
    code = (f"{first}\nfrom policies import REGISTRY, parse_spec\n"
            "slots = parse_spec('locret+offload')\n"
            "assert slots['spill'].name == 'offload', slots\n"
            "print(','.join(sorted(REGISTRY)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert out.stdout.split() == [",".join(sorted(REGISTRY))]
