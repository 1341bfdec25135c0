#!/usr/bin/env bash
# Create .venv and install the service into it. Usage: scripts/setup.sh [dev]
# torch is pinned by constraints.txt: here pip takes the CPU wheel on disk, elsewhere the normal PyPI wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt torch
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
else
  .venv/bin/python -m pip install --quiet -c constraints.txt .
fi
