#!/usr/bin/env bash
# Idempotent set-up shared by serve.sh and test.sh: a virtual environment in .venv with the CPU build of
# torch 2.13.0 (installed first, so the project's torch range never pulls a multi-GB CUDA build) and the
# project itself. Re-running it on a ready checkout takes a few seconds.
#   scripts/setup.sh [extras]      e.g. scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
if [[ ! -x .venv/bin/python ]]; then
    "${PYTHON:-python3}" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || "${pip[@]}" "torch==2.13.0"
if [[ -n "$extras" ]]; then
    "${pip[@]}" -e ".[$extras]"
else
    "${pip[@]}" -e .
fi
