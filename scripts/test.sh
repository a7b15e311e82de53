#!/usr/bin/env bash
# The tests in one command: set up, then run pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(bash scripts/setup.sh | tail -n 1)"
exec "$PY" -m pytest -q "$@"
