#!/usr/bin/env bash
# The main job in one command: set up, then run the demo recipe end to end
# (MiniLM extracts tweet features once; UniPT and a linear probe train from them; a table compares them).
# Extra arguments go to `unipt run`, e.g. `scripts/demo.sh --full` or `scripts/demo.sh train.unipt.epochs=8`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(bash scripts/setup.sh | tail -n 1)"
exec "$PY" -m unipt.pipelines run tweets-minilm "$@"
