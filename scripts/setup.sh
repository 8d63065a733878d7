#!/usr/bin/env bash
# Creates .venv (if missing) and installs chunkstore with its test tools into it.
# Sourced by demo.sh and test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# An editable install leaves the package's bytecode to its first import, which an environment
# with PYTHONDONTWRITEBYTECODE never writes: compile it now, so commands start from bytecode.
.venv/bin/python -m compileall -q chunkstore client server >/dev/null
