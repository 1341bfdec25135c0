#!/usr/bin/env bash
# Install the service into .venv if needed and start it on embedded defaults (127.0.0.1:50051, data in
# ./rl_service_data). setup.sh skips pip, silently, when nothing changed since the last install.
# Extra arguments go to server.py, e.g. scripts/serve.sh --port 50052
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python server.py "$@"
