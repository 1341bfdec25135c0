#!/usr/bin/env bash
# Install the service with its dev tools into .venv and run the whole test suite with coverage, as CI does.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The Node.js simulation's two dependencies, so that its cross-language test runs (it skips, saying why, without).
# npm ci wipes and refetches node_modules every time, so it runs only when package-lock.json changed since.
sim=examples/node-simulation
if command -v npm >/dev/null; then
  lock=$(cksum < "$sim/package-lock.json")
  if [ "$(cat "$sim/node_modules/.rl-service-lock" 2>/dev/null)" != "$lock" ]; then
    if npm ci --prefix "$sim" --no-audit --no-fund --loglevel=error; then
      echo "$lock" > "$sim/node_modules/.rl-service-lock"
    else
      echo "warning: npm ci failed; tests/integration/test_node_simulation.py will be skipped" >&2
    fi
  fi
fi
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy rl_service
exec .venv/bin/python -m pytest --cov=rl_service --cov-report=term "$@"
