"""The import graph points one way: policies <- offload <- app.runtime <- app (plan, cli,
server, ui). No module of app.runtime imports app's upper modules (at top level or in a
function), and app.runtime's modules import each other without cycles."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("app.ui", "app.cli", "app.ask", "app.plan", "app.server", "app.bench", "app.heads", "app.models", "app.config")


def _imports(path: Path, package: str):
    """(module imported, whether inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                names = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
            else:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += names
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_runtime_never_imports_upward():
    bad = []
    for f in sorted((ROOT / "app/runtime").glob("*.py")):
        for mod in _imports(f, "app.runtime"):
            if mod.startswith(UPPER):
                bad.append(f"{f.name}: {mod}")
    assert not bad, bad


def test_runtime_modules_have_no_cycles():
    mods = {f.stem: f for f in (ROOT / "app/runtime").glob("*.py")}
    graph = {m: {i.split(".")[2] for i in _imports(f, "app.runtime")
                 if i.startswith("app.runtime.") and i.split(".")[2] in mods and i.split(".")[2] != m}
             for m, f in mods.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()
    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles


def test_nothing_outside_the_runtime_reaches_into_it():
    """The app, the benches and the server use the runtime's public API: no `rt._x`."""
    import re
    bad = []
    pattern = re.compile(r"\b(rt|runtime|self\.runtime|ctx\.runtime)\._[a-z]")
    for f in sorted((ROOT / "app").rglob("*.py")):
        if f.parent.name == "runtime" and f.parent.parent.name == "app":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, bad


def test_runtime_and_ui_modules_stay_short():
    long = [f"{f.relative_to(ROOT)}: {n}" for d in ("app/runtime", "app/ui") for f in sorted((ROOT / d).glob("*.py"))
            if (n := len(f.read_text().splitlines())) > 300]
    assert not long, long
