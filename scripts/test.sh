#!/usr/bin/env bash
# Install the service with its dev tools into .venv and run the whole test suite with coverage.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy rl_service
exec .venv/bin/python -m pytest --cov=rl_service --cov-report=term "$@"
