"""The lock is what a fresh clone installs: it must cover pyproject.toml, satisfy its ranges,
and be what this environment runs (scripts/check-latest.sh sets VRAMCHAT_UNLOCKED=1 when it runs
the suite against the newest versions instead)."""
from __future__ import annotations

import os
import re
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("cpu", "cuda")


def _pins(path: Path, here: bool = False) -> dict[str, str]:
    """{name: version} of a lock; here=True: only the lines whose marker holds on this machine."""
    out = {}
    for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)(?: ; ([^\\\n]+))?", path.read_text(), re.M):
        if not here or m[3] is None or Marker(m[3].strip()).evaluate():
            out[canonicalize_name(m[1])] = m[2]
    return out


def _wanted() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in ("test", "bench") for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("kind", LOCKS)
def test_lock_pins_every_dependency_within_its_range(kind):
    pins = _pins(ROOT / "requirements" / f"{kind}.lock")
    env = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    for req in _wanted():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{kind}.lock has no pin for {req.name}: run bash scripts/lock.sh"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), \
            f"{kind}.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: run bash scripts/lock.sh"
    assert pins["torch"].endswith("+cpu") == (kind == "cpu")


def test_every_lock_line_has_hashes():
    for kind in (*LOCKS, "model"):
        text = (ROOT / "requirements" / f"{kind}.lock").read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
        for block in blocks:
            if "==" in block.split("\n")[0]:
                assert "--hash=sha256:" in block, f"{kind}.lock: {block.splitlines()[0]} has no hash"


@pytest.mark.skipif(os.environ.get("VRAMCHAT_UNLOCKED") == "1", reason="the drift check runs the newest versions")
def test_this_environment_runs_the_lock():
    kind = "cpu" if "+cpu" in metadata.version("torch") else "cuda"
    pins = _pins(ROOT / "requirements" / f"{kind}.lock", here=True)
    # NOTE: only what is installed in the environment: setuptools puts its vendored copies (with
    # their own dist-info) on sys.path once something imports it.
    dists = list(metadata.distributions(path=sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})))
    off = {}
    for dist in dists:
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and dist.version != pins[name]:
            off[name] = (pins[name], dist.version)
    missing = [n for n in pins if n not in {canonicalize_name(d.metadata["Name"]) for d in dists}]
    assert not off and not missing, f"{sys.prefix} differs from {kind}.lock (lock, installed): {off}; missing {missing}"
