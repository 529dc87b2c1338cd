#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with every extra. Safe to re-run.
# Pins torch to the local CPU wheel (torch==2.13.0) when the machine has it, so that pip does not
# pull several GB of CUDA packages; elsewhere any torch that satisfies pyproject.toml is accepted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip 2>/dev/null || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
    if ! "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null; then
        "$VPY" -m pip install -q "torch>=2.4"
    fi
fi
"$VPY" -m pip install -q -e ".[dev,train,eval,video]"
