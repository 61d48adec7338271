"""`bench` works after the README's set-up: scripts/setup.sh installs the `bench` extra."""
from __future__ import annotations

import hashlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_setup_installs_the_bench_extra_and_it_holds_what_the_suites_import():
    from app.bench import NEEDS
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[; ]", d)[0] for d in extras["bench"]}
    assert {"matplotlib", "optimum-quanto"} <= names
    assert set(NEEDS) == {"matplotlib", "optimum.quanto"}
    installs = re.findall(r'pip install -q -e "\.\[([^\]]*)\]"', (ROOT / "scripts" / "setup.sh").read_text())
    assert installs and "bench" in installs[0].split(",") and "test" in installs[0].split(",")


def test_a_venv_set_up_by_the_script_has_them():
    stamp = ROOT / ".venv" / ".vramchat-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "scripts" / "setup.sh").read_bytes())
    if not stamp.exists() or stamp.read_text().strip() != want.hexdigest()[:16]:
        pytest.skip("this environment was not set up by the current scripts/setup.sh")
    from app.bench import missing
    assert missing() == []
    assert importlib.util.find_spec("matplotlib") is not None
