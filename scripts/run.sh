#!/usr/bin/env bash
# Sets up .venv/ if needed, then runs vramchat. With no arguments: the terminal app on
# the embedded default model. Any arguments go to main.py (e.g. `ask --doc f.md "q"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python main.py "$@"
