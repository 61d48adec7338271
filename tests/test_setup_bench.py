"""`bench` works after the README's set-up: the locks scripts/setup.sh installs hold the `bench`
extra (tests/test_lock.py checks that they pin every package of it)."""
from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_locks_are_made_with_the_bench_and_test_extras():
    from app.bench import NEEDS
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[; ]", d)[0] for d in extras["bench"]}
    assert {"matplotlib", "optimum-quanto", "lm-eval"} <= names
    assert set(NEEDS) == {"matplotlib", "optimum.quanto", "lm_eval"}
    lock = (ROOT / "scripts" / "lock.sh").read_text()
    assert "--extra test --extra bench" in lock
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r'--require-hashes --no-deps .*-r "\$lock"', setup)


def test_this_environment_has_what_the_bench_imports():
    from app.bench import missing
    assert missing() == []
    assert importlib.util.find_spec("matplotlib") is not None
