#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with every extra. Safe to re-run: when pyproject.toml (and
# this script) have not changed since the last install, nothing is reinstalled (the package is installed editable,
# so source changes need no reinstall); delete .venv/.openflamingo-installed to force one.
# Pins torch to the local CPU wheel (torch==2.13.0) when the machine has it, so that pip does not
# pull several GB of CUDA packages; elsewhere any torch that satisfies pyproject.toml is accepted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.openflamingo-installed
WANT=$(cat pyproject.toml scripts/setup.sh | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "setup: .venv is up to date (pyproject.toml unchanged since the last install)."
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# pip's own progress lines show what is being downloaded and installed; a first install takes a few minutes.
"$VPY" -m pip install -q --upgrade pip 2>/dev/null || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch"
    if ! "$VPY" -m pip install "torch==2.13.0" 2>/dev/null; then
        "$VPY" -m pip install "torch>=2.4"
    fi
fi
echo "setup: installing openflamingo-hf with its dev, train, eval and video extras"
"$VPY" -m pip install --progress-bar on -e ".[dev,train,eval,video]"
echo "$WANT" > "$STAMP"
echo "setup: done."
