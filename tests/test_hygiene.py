"""Layering rules: the engine never loads the UI; dependencies point down."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["policies", "offload", "app.runtime", "app.runtime.engine"])
def test_engine_never_imports_textual_or_rich(module):
    code = (f"import sys; import {module}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich') or m.startswith('app.ui'));"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _imports(pkg: str):
    for path in (ROOT / pkg).rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield path, a.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module


@pytest.mark.parametrize("pkg,forbidden", [
    ("policies", ("app", "offload", "textual", "rich")),
    ("offload", ("app", "textual", "rich")),
    ("app/runtime", ("app.ui", "textual", "rich")),
])
def test_dependencies_point_down(pkg, forbidden):
    bad = [(str(p.relative_to(ROOT)), m) for p, m in _imports(pkg)
           if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad


def test_no_unsafe_loading():
    """Pickles only with weights_only=True; remote code only when the user asks."""
    for pkg in ("app", "policies", "offload"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            for line in text.splitlines():
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path}: {line.strip()}"
                if "trust_remote_code=True" in line:
                    raise AssertionError(f"{path}: hard-coded trust_remote_code=True")


_SLOTS = {"selector", "store", "spill", "reader", "ffn", "sel", "part", "comp"}


def test_no_attribute_probing_on_slot_parts():
    """The cache's contract lives in policies/slots.py: nothing asks a slot part whether it
    happens to have an attribute (getattr/hasattr on `.selector`, `.store`, `sel`, ...)."""
    bad = []
    for pkg in ("app", "policies", "offload"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("getattr", "hasattr") and node.args):
                    target = node.args[0]
                    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                    if name in _SLOTS:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
