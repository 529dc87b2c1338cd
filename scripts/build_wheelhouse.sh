#!/usr/bin/env bash
# Builds the wheelhouse that benchmarks/device_suite.sh installs from. A lent GPU machine reaches no package registry,
# so whatever the suite needs beyond that machine's image travels with the working tree as wheels.
#
#   .whl/      for the device (carried: `run` with carry [".whl"]): the wheels listed in benchmarks/device_wheels.txt,
#              sides `ours` and `original`, for its interpreter (CPython 3.12, manylinux x86-64; DEVICE_PYTHON_VERSION
#              to change). No torch: the machine has its own, and a CUDA torch is far over the 64 MiB that travels.
#              Not our own package either: device_suite.sh builds its wheel from the carried tree, since the wheel's
#              20 MB of embedded weights would otherwise travel twice and put the tree over the limit.
#   .whl-cpu/  for the CPU dry run only (never carried): the same wheels for this machine's interpreter where the
#              .whl/ ones do not install on it (compiled wheels: regex, tokenizers; cp311 here), plus the packages of
#              the list's `provided` side (the device image has them) that this interpreter lacks: torchvision (the
#              release paired with the local torch), requests and its needs.
#
# Usage: bash scripts/build_wheelhouse.sh [--device-only]. Safe to re-run: present wheels are kept, wheels that the list
# no longer names are removed. Downloads use pip's own configuration (this machine's registries). PYTHON chooses the
# interpreter (default .venv/bin/python, which has torch, else python3). Ends by checking that the tree plus .whl/
# stays under the 64 MiB that a device call sends.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE_ONLY=0
for argument in "$@"; do
    case "$argument" in
        --device-only) DEVICE_ONLY=1 ;;
        *) echo "usage: bash scripts/build_wheelhouse.sh [--device-only]" >&2; exit 2 ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
DEVICE_PYTHON=${DEVICE_PYTHON_VERSION:-3.12}
HELPER=benchmarks/_device_suite.py
WHL=.whl
CPU=.whl-cpu
mkdir -p "$WHL"

side() { "$PY" "$HELPER" wheels "$1"; }
mapfile -t DEVICE_REQS < <(side ours; side original)
mapfile -t PROVIDED_REQS < <(side provided)

# pip matches each manylinux_2_N tag exactly, so the usual ones are all named (the device notes' list, plus 2_34 and
# 2_35 that some recent compiled wheels carry).
DEVICE_FLAGS=(--no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp
              --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64
              --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
              --platform manylinux1_x86_64)

# Wheels the list no longer names would travel for nothing (and a second version of one package confuses readers).
while read -r stale; do
    [ -n "$stale" ] && { echo "removing $stale (not in benchmarks/device_wheels.txt)"; rm -f "$stale"; }
done < <("$PY" "$HELPER" stale-wheels "$WHL" "${DEVICE_REQS[@]}")

# One download per missing wheel, so that a failure names the package.
while read -r requirement; do
    [ -z "$requirement" ] && continue
    echo "downloading $requirement for CPython $DEVICE_PYTHON (device)"
    "$PY" -m pip download -q "${DEVICE_FLAGS[@]}" -d "$WHL" "$requirement"
done < <("$PY" "$HELPER" missing-wheels --python "$DEVICE_PYTHON" --dir "$WHL" "${DEVICE_REQS[@]}")
left=$("$PY" "$HELPER" missing-wheels --python "$DEVICE_PYTHON" --dir "$WHL" "${DEVICE_REQS[@]}")
if [ -n "$left" ]; then
    echo "build_wheelhouse.sh: no wheel for CPython $DEVICE_PYTHON manylinux x86-64 in $WHL for: $left" >&2
    exit 1
fi

if [ "$DEVICE_ONLY" = 0 ]; then
    if ! "$PY" -c "import torch" 2>/dev/null; then
        # The dry run runs the benchmarks on this interpreter's torch; without one there is nothing to prepare.
        echo "build_wheelhouse.sh: $PY has no torch, so no dry-run wheels ($CPU) are prepared" \
            "(run scripts/setup.sh, or set PYTHON)." >&2
    else
        mkdir -p "$CPU"
        TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
        # torch 2.x.y pairs with torchvision 0.(x+15).y, as scripts/setup_original_env.sh pairs them.
        TV=$("$PY" -c 'import sys; a, b, c = (sys.argv[1].split(".") + ["0"])[:3]; print(f"0.{int(b) + 15}.{c}")' \
            "$TORCH")
        mapfile -t NEED_PROVIDED < <("$PY" "$HELPER" missing-dists "${PROVIDED_REQS[@]}" |
                                     sed "s/^torchvision$/torchvision==$TV/")
        while read -r stale; do
            [ -n "$stale" ] && { echo "removing $stale (not needed by the dry run)"; rm -f "$stale"; }
        done < <("$PY" "$HELPER" stale-wheels "$CPU" "${DEVICE_REQS[@]}" "${NEED_PROVIDED[@]}")
        while read -r requirement; do
            [ -z "$requirement" ] && continue
            echo "downloading $requirement for this interpreter (dry run only)"
            "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CPU" "$requirement"
        done < <("$PY" "$HELPER" missing-wheels --dir "$WHL" --dir "$CPU" "${DEVICE_REQS[@]}" "${NEED_PROVIDED[@]}")
        left=$("$PY" "$HELPER" missing-wheels --dir "$WHL" --dir "$CPU" "${DEVICE_REQS[@]}" "${NEED_PROVIDED[@]}")
        if [ -n "$left" ]; then
            echo "build_wheelhouse.sh: no wheel for $PY in $WHL or $CPU for: $left" >&2
            exit 1
        fi
    fi
fi

echo "$WHL: $(ls "$WHL"/*.whl | wc -l) wheels, $(du -sh "$WHL" | cut -f1)"
if [ -d "$CPU" ]; then
    echo "$CPU: $(ls "$CPU"/*.whl 2>/dev/null | wc -l) wheels, $(du -sh "$CPU" | cut -f1) (dry run only, not carried)"
fi
# What a `run` with carry [".whl"] sends must stay under 64 MiB.
if ! sizes=$("$PY" "$HELPER" tree-size "$WHL"); then
    echo "build_wheelhouse.sh: what a device call would send is over 64 MiB: $sizes" >&2
    exit 1
fi
echo "a device call with carry [\"$WHL\"] sends $sizes"
