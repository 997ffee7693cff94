#!/usr/bin/env bash
# Set up a development environment in .venv: torch first (the CPU build where there is no CUDA GPU,
# so nobody downloads a multi-GB CUDA build by accident), then surogate itself with its test extras.
# Safe to re-run: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SUROGATE_VENV:-.venv}
# Pinned torch for machines without CUDA; override with e.g. SUROGATE_TORCH="torch==2.11.0".
TORCH_SPEC=${SUROGATE_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA GPU found; installing torch with CUDA support" >&2
    "${PIP[@]}" install torch
  else
    echo "setup: no CUDA GPU; installing the CPU build $TORCH_SPEC" >&2
    "${PIP[@]}" install "$TORCH_SPEC"
  fi
fi

"${PIP[@]}" install -e ".[dev]"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, surogate; print("surogate", surogate.__version__, "torch", torch.__version__)'))" >&2
