#!/usr/bin/env bash
# Regenerates the checked-in Python code for every .proto file under proto/.
set -euo pipefail
cd "$(dirname "$0")/.."
for proto in $(find proto -name '*.proto' | sort); do
  extra=()
  if grep -q '^service ' "$proto"; then extra=(--grpc_python_out=.); fi
  .venv/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. "${extra[@]}" "$proto"
done
