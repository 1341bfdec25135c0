#!/usr/bin/env bash
# Regenerate the Python stubs (with .pyi types) in generated/ from proto/. Run after editing any .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-generated}"
mkdir -p "$out"
# PYTHON: the interpreter that has grpcio-tools (tests pass their own); default: the one on PATH.
py="${PYTHON:-python}"
# mypy-protobuf's protoc plugins live beside that interpreter (a venv's bin/), which need not be on PATH.
PATH="$(dirname "$(command -v "$py")"):$PATH"
"$py" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  $(find proto -name '*.proto' | sort)
# protoc writes no __init__.py; the stubs are a regular package so `pip install .` ships them.
find "$out" -type d -exec sh -c 'touch "$1/__init__.py"' _ {} \;
rm -f "$out/__init__.py"
