#!/usr/bin/env bash
# Every GPU measurement of this repository in one command, for a lent device machine (one H200, its own python3 with
# torch and CUDA, no network), run from the repository root:
#
#   bash scripts/build_wheelhouse.sh                       # here, once: .whl/ (carried) and .whl-cpu/ (dry run only)
#   DEVICE_SUITE_DRY=1 bash benchmarks/device_suite.sh     # here: the same suite on CPU with small shapes
#   bash benchmarks/device_suite.sh                        # there: `run` with carry [".whl"]
#
# Parts, in order (each under `timeout` with its own budget; a part that fails or runs out of time keeps what it wrote,
# and the suite goes on with the next):
#   install_ours       our wheel (built from this tree) + .whl/'s `ours` wheels, `pip --target` into a temp folder
#   install_original   .whl/'s `original` wheels (open-flamingo 2.0.1 on transformers 4.36.2) into a second folder
#   gpu_tests          the tests marked `gpu` (pytest -m gpu, on the files that hold such tests)
#   vs_original_of3b   bench_vs_original.py --shape of3b --bf16 (all cases, training step included)
#   decode             bench_decode.py --device cuda
#   train_step_of3b    bench_train_step.py --shape of3b --bf16
#   vs_original_of9b   bench_vs_original.py --shape of9b --bf16, generation cases (no training step: time, memory)
#   vs_original_of4b   the same at of4b, only when enough time is left
# The dry run (DEVICE_SUITE_DRY=1) runs the same parts and the same install path on this machine's python (.venv's)
# with CPU and small shapes (bench_vs_original's small_mpt for of3b and of9b: their MPT path; small for of4b, which is
# skipped there unless DEVICE_SUITE_OF4B_MIN_S allows it), fp32 (--bf16 is GPU-only), no compiled configurations.
#
# Output, under $OUT (else ./device-out; a dry run without OUT uses a temporary folder): summary.md (each part's
# status and wall time, then every table), results.json (every part's JSON: all samples), logs.tar.gz (each part's
# stdout/stderr, the original's worker log, pytest's JUnit XML). They are rewritten after every part, so a run stopped
# from outside still leaves the parts it finished. Three files: the device tool returns at most eight.
#
# Settings (environment): DEVICE_SUITE_TOTAL_S (wall-time limit of the whole suite; 530 on a device, inside the 9
# minutes a call is planned for; 1500 dry), BUDGET_<part> (seconds for one part), DEVICE_SUITE_PARTS (comma-separated
# parts to run; the installs always run), DEVICE_SUITE_PYTHON (the interpreter with torch; python3 on a device,
# .venv/bin/python dry), DEVICE_SUITE_OF4B_MIN_S (seconds that must be left to start of4b), DEVICE_SUITE_KEEP=1 (keep
# the temporary folder: targets, workdirs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
SELF="$REPO/benchmarks/device_suite.sh"
HELPER="$REPO/benchmarks/_device_suite.py"

ALL_PARTS=(install_ours install_original gpu_tests vs_original_of3b decode train_step_of3b vs_original_of9b
           vs_original_of4b)

# ----------------------------------------------------------------------------------------------------------------------
# Budgets (seconds). Device figures are first estimates, not measurements: the first device run's summary (wall time
# per part) is what to size them by. The dry run's are generous because this CPU machine is shared.
# ----------------------------------------------------------------------------------------------------------------------
budget_default() {
    if [ "${DEVICE_SUITE_DRY:-0}" = 1 ]; then
        case "$1" in
            install_ours|install_original) echo 240 ;;
            gpu_tests) echo 180 ;;
            vs_original_*) echo 360 ;;
            *) echo 240 ;;
        esac
    else
        # The parts before of9b take at most 400 s, so that of9b starts with at least 120 s of the 530; it and of4b
        # get what is left (their budget is cut to it), which is less than a 9B build and run needs unless the
        # earlier parts finish early: for a full of9b row, run that part alone (DEVICE_SUITE_PARTS=vs_original_of9b).
        case "$1" in
            install_ours) echo 45 ;;
            install_original) echo 35 ;;
            gpu_tests) echo 70 ;;
            vs_original_of3b) echo 150 ;;
            decode) echo 40 ;;
            train_step_of3b) echo 60 ;;
            *) echo 400 ;;
        esac
    fi
}

# ----------------------------------------------------------------------------------------------------------------------
# Installing: pip with no index and no configuration (this machine's pip.conf names local wheel folders that would hide
# a wheel missing from the wheelhouse), --no-deps with explicit lists, so that torch and the rest of the machine's own
# packages are never replaced, each side in its own --target folder.
# ----------------------------------------------------------------------------------------------------------------------
side_wheels() { "$SUITE_PY" "$HELPER" wheels "$1"; }

pip_target() {  # TARGET REQUIREMENT-OR-WHEEL...
    local target=$1
    shift
    local links=(--find-links "$REPO/.whl")
    if [ "$SUITE_DRY" = 1 ]; then links+=(--find-links "$REPO/.whl-cpu"); fi
    # pip's progress goes to stderr (the part's log); stdout holds what the summary shows.
    PIP_CONFIG_FILE=/dev/null "$SUITE_PY" -m pip --isolated install --no-index "${links[@]}" --no-deps --no-compile \
        --no-cache-dir --disable-pip-version-check --target "$target" "$@" >&2
}

part_install_ours() {
    echo "build our wheel from this tree; pip install --no-index --no-deps --target \$T_OURS it + .whl (ours)" \
        >"$SUITE_PART_DIR/command.txt"
    # The wheel is built from a copy, so that setuptools' build/ and egg-info never land in the working tree, and
    # without build isolation, since nothing can be fetched (the machine's setuptools builds it).
    local source="$SUITE_SCRATCH/source" dist="$SUITE_SCRATCH/dist"
    rm -rf "$source" "$dist"
    mkdir -p "$source" "$dist"
    cp -r pyproject.toml README.md src "$source/"
    find "$source/src" \( -name '__pycache__' -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    local expect=(openflamingo-hf)
    if PIP_CONFIG_FILE=/dev/null "$SUITE_PY" -m pip --isolated wheel --no-index --no-deps --no-build-isolation \
        --no-cache-dir --disable-pip-version-check -w "$dist" "$source" >&2; then
        pip_target "$SUITE_T_OURS" "$dist"/openflamingo_hf-*.whl
    else
        # No wheel (the machine's setuptools failed): the package as files still lets every benchmark run.
        echo "WARNING: building our wheel failed; copying src/openflamingo_hf into the target instead" >&2
        mkdir -p "$SUITE_T_OURS"
        cp -r "$source/src/openflamingo_hf" "$SUITE_T_OURS/"
        expect=()
    fi
    mapfile -t wheels < <(side_wheels ours)
    pip_target "$SUITE_T_OURS" "${wheels[@]}"
    PYTHONPATH="$SUITE_T_OURS" "$SUITE_PY" "$HELPER" check-side --side ours --target "$SUITE_T_OURS" \
        --expect "${expect[@]}" "${wheels[@]}" --imports openflamingo_hf transformers \
        --json "$SUITE_PART_DIR/result.json"
}

part_install_original() {
    echo "pip install --no-index --no-deps --target \$T_ORIGINAL .whl (original); _original_worker.py --check" \
        >"$SUITE_PART_DIR/command.txt"
    mapfile -t wheels < <(side_wheels original)
    pip_target "$SUITE_T_ORIGINAL" "${wheels[@]}"
    if [ "$SUITE_DRY" = 1 ]; then
        # What the device image provides to the original's side and this python lacks (torchvision, requests), from
        # .whl-cpu into a third folder that only the original's side sees (transformers 5 would try the PyPI
        # torchvision, whose C++ ops do not load beside a CPU torch; the worker works around that, transformers not).
        mapfile -t provided < <("$SUITE_PY" "$HELPER" missing-dists $(side_wheels provided))
        if [ "${#provided[@]}" -gt 0 ]; then
            pip_target "$SUITE_T_PROVIDED" "${provided[@]}"
        fi
    fi
    PYTHONPATH="$SUITE_ORIGINAL_PATH" "$SUITE_PY" "$HELPER" check-side --side original --target "$SUITE_T_ORIGINAL" \
        --expect "${wheels[@]}" --json "$SUITE_PART_DIR/result.json"
    # The worker's own import check: open_clip, open_flamingo and its training loop, as the benchmark imports them.
    PYTHONPATH="$SUITE_ORIGINAL_PATH" "$SUITE_PY" benchmarks/_original_worker.py --check
    echo "the original imports: open_flamingo / open_clip / transformers from $SUITE_T_ORIGINAL"
}

part_gpu_tests() {
    mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py || true)
    if [ "${#files[@]}" = 0 ]; then  # pytest without files would collect the whole suite
        echo "no test file marks a test gpu" | tee "$SUITE_PART_DIR/command.txt"
        return 0
    fi
    local command=("$SUITE_PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$SUITE_PART_DIR/junit.xml"
                   "${files[@]}")
    echo "python -m pytest -q -m gpu ${files[*]}" >"$SUITE_PART_DIR/command.txt"
    PYTHONPATH="$SUITE_T_OURS" "${command[@]}"
}

vs_original() {  # SHAPE-ARGS... (the device's or the dry run's)
    local arguments=("$@" --json "$SUITE_PART_DIR/result.json" --workdir "$SUITE_WORK"
                     --original-python "$SUITE_PY" --original-path "$SUITE_ORIGINAL_PATH")
    echo "bench_vs_original.py $*" >"$SUITE_PART_DIR/command.txt"
    PYTHONPATH="$SUITE_T_OURS" "$SUITE_PY" benchmarks/bench_vs_original.py "${arguments[@]}"
}

part_vs_original_of3b() {
    if [ "$SUITE_DRY" = 1 ]; then
        vs_original --shape small_mpt --device cpu --cases greedy_b1 --reps 1 --warmup 0 --no-compile
    else
        vs_original --shape of3b --bf16 --device cuda --reps 3 --train-reps 3
    fi
}

part_vs_original_of9b() {
    if [ "$SUITE_DRY" = 1 ]; then
        vs_original --shape small_mpt --device cpu --cases prefill_16shot --reps 1 --warmup 0 --no-compile
    else
        vs_original --shape of9b --bf16 --device cuda --cases greedy_b1,greedy_b8,prefill_16shot,beam3 --reps 2
    fi
}

part_vs_original_of4b() {
    if [ "$SUITE_DRY" = 1 ]; then
        vs_original --shape small --device cpu --cases greedy_b1 --reps 1 --warmup 0 --no-compile
    else
        vs_original --shape of4b --bf16 --device cuda --cases greedy_b1,greedy_b8,prefill_16shot,beam3 --reps 2
    fi
}

part_decode() {
    local arguments=(--device cuda)
    if [ "$SUITE_DRY" = 1 ]; then arguments=(--device cpu --new-tokens 4 --repeats 1 --shots 1 --no-compile); fi
    echo "bench_decode.py ${arguments[*]}" >"$SUITE_PART_DIR/command.txt"
    PYTHONPATH="$SUITE_T_OURS" "$SUITE_PY" benchmarks/bench_decode.py "${arguments[@]}" \
        --json "$SUITE_PART_DIR/result.json"
}

part_train_step_of3b() {
    local arguments=(--shape of3b --bf16 --device cuda --steps 3 --warmup 1 --repeats 1)
    if [ "$SUITE_DRY" = 1 ]; then arguments=(--shape small --device cpu --steps 1 --warmup 0 --repeats 1); fi
    echo "bench_train_step.py ${arguments[*]}" >"$SUITE_PART_DIR/command.txt"
    PYTHONPATH="$SUITE_T_OURS" "$SUITE_PY" benchmarks/bench_train_step.py "${arguments[@]}" \
        --json "$SUITE_PART_DIR/result.json"
}

# ----------------------------------------------------------------------------------------------------------------------
# One part, run by the suite as `bash device_suite.sh --part NAME` under `timeout` (which stops the whole process
# group: the original's worker and bench_train_step's children too). Its settings come in SUITE_* variables.
# ----------------------------------------------------------------------------------------------------------------------
if [ "${1:-}" = "--part" ]; then
    "part_$2"
    exit $?
fi
if [ "${1:-}" = "--plan" ]; then  # the parts and their budgets in this mode, one per line; runs nothing
    for part in "${ALL_PARTS[@]}"; do
        budget_variable="BUDGET_$part"
        echo "$part ${!budget_variable:-$(budget_default "$part")}"
    done
    exit 0
fi
if [ $# -gt 0 ]; then
    echo "usage: [DEVICE_SUITE_DRY=1] bash benchmarks/device_suite.sh [--plan]" >&2
    exit 2
fi

# ----------------------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------------------
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
DRY=${DEVICE_SUITE_DRY:-0}
if [ "$DRY" = 1 ]; then
    TOTAL=${DEVICE_SUITE_TOTAL_S:-1500}
    OF4B_MIN=${DEVICE_SUITE_OF4B_MIN_S:-100000}  # not in a dry run unless asked: a third small run adds nothing
    DEFAULT_PY=.venv/bin/python
    [ -x "$DEFAULT_PY" ] || DEFAULT_PY=python3
    # This CPU machine is shared: one thread per process keeps the dry run from crowding it.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
else
    TOTAL=${DEVICE_SUITE_TOTAL_S:-530}
    OF4B_MIN=${DEVICE_SUITE_OF4B_MIN_S:-150}
    DEFAULT_PY=python3
fi
RESERVE=10    # seconds kept for the last report
MIN_START=30  # no part starts with less than this left: it could not even import torch and load a model
PY=${DEVICE_SUITE_PYTHON:-$DEFAULT_PY}
PY=$(command -v "$PY") || { echo "device_suite.sh: no interpreter $PY" >&2; exit 1; }
# An absolute path without resolving links: a venv's python is a link, and resolving it would leave the venv.
case "$PY" in /*) ;; *) PY="$REPO/$PY" ;; esac
for wheels in .whl $([ "$DRY" = 1 ] && echo .whl-cpu); do
    if [ ! -d "$wheels" ]; then
        echo "device_suite.sh: $wheels/ is missing: run \`bash scripts/build_wheelhouse.sh\` first" \
            "(here, with network; then carry .whl to the device)" >&2
        exit 1
    fi
done

if [ -n "${OUT:-}" ]; then
    OUT_DIR=$OUT
elif [ "$DRY" = 1 ]; then
    OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/device-suite-dry-out.XXXXXX")
else
    OUT_DIR="$REPO/device-out"
fi
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/summary.md" "$OUT_DIR/results.json" "$OUT_DIR/logs.tar.gz"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/device-suite.XXXXXX")
STATE="$SCRATCH/state"
mkdir -p "$STATE/parts" "$SCRATCH/work"
: >"$STATE/parts.tsv"
cleanup() {
    # Each part's workdir (state dicts of several GB) is gone already. Deleting the installed targets (thousands of
    # files: 19 s on the shared CPU machine) would spend the device's time on a machine that is given back anyway.
    if [ "${DEVICE_SUITE_KEEP:-0}" = 1 ] || [ "$DRY" != 1 ]; then echo "kept $SCRATCH"; else rm -rf "$SCRATCH"; fi
}
trap cleanup EXIT

export SUITE_PY="$PY" SUITE_DRY="$DRY" SUITE_SCRATCH="$SCRATCH"
export SUITE_T_OURS="$SCRATCH/site-ours" SUITE_T_ORIGINAL="$SCRATCH/site-original" \
    SUITE_T_PROVIDED="$SCRATCH/site-provided"
SUITE_ORIGINAL_PATH="$SUITE_T_ORIGINAL"
if [ "$DRY" = 1 ]; then SUITE_ORIGINAL_PATH="$SUITE_T_ORIGINAL:$SUITE_T_PROVIDED"; fi
export SUITE_ORIGINAL_PATH
# Nothing is downloaded: say so to the hub clients (no network there; here, no accidental fetch), and keep their
# caches out of the home folder. The parts set PYTHONPATH themselves; an inherited one must not leak into either side.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$SCRATCH/hf-home" TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
unset PYTHONPATH

SELECTED=",${DEVICE_SUITE_PARTS:-$(IFS=,; echo "${ALL_PARTS[*]}")},"
MODE=$([ "$DRY" = 1 ] && echo "dry (CPU, small shapes)" || echo "device")

write_report() {  # FINISHED(0/1)
    printf '{"mode": "%s", "total_s": %s, "elapsed_s": %s, "finished": %s, "python": "%s", "parts": "%s"}\n' \
        "$MODE" "$TOTAL" "$(elapsed)" "$([ "$1" = 1 ] && echo true || echo false)" "$PY" "${SELECTED//,/ }" \
        >"$STATE/suite.json"
    "$PY" "$HELPER" report "$STATE" "$OUT_DIR" || echo "device_suite.sh: the report failed" >&2
    tar czf "$OUT_DIR/logs.tar.gz" -C "$STATE" . 2>/dev/null || true
}

status_of() { awk -F'\t' -v name="$1" '$1 == name { status = $2 } END { print status }' "$STATE/parts.tsv"; }

record() {  # NAME STATUS RC SECONDS BUDGET NOTE
    local command=""
    [ -f "$STATE/parts/$1/command.txt" ] && command=$(head -c 400 "$STATE/parts/$1/command.txt" | tr '\t\n' '  ')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$command" >>"$STATE/parts.tsv"
    echo "[device_suite] $1: $2 (${4:--} s of ${5:--} s) $6"
}

run_part() {  # NAME NEEDED-PART...
    local name=$1
    shift
    case "$SELECTED" in *",$name,"*) ;; *) case "$name" in install_*) ;; *) return 0 ;; esac ;; esac
    local directory="$STATE/parts/$name"
    mkdir -p "$directory"
    local budget_variable="BUDGET_$name"
    local budget=${!budget_variable:-$(budget_default "$name")}
    local need
    for need in "$@"; do
        if [ "$(status_of "$need")" != passed ]; then
            record "$name" skipped "" "" "$budget" "$need did not pass"
            write_report 0
            return 0
        fi
    done
    local left=$(( TOTAL - $(elapsed) - RESERVE )) note=""
    if [ "$name" = vs_original_of4b ] && [ "$left" -lt "$OF4B_MIN" ]; then
        record "$name" skipped "" "" "$budget" "${left} s left, it starts with at least $OF4B_MIN s"
        write_report 0
        return 0
    fi
    if [ "$left" -lt "$MIN_START" ]; then
        record "$name" skipped "" "" "$budget" "only ${left} s of the suite's time left"
        write_report 0
        return 0
    fi
    if [ "$budget" -gt "$left" ]; then
        note="budget cut from $budget s to the $left s left"
        budget=$left
    fi
    echo "[device_suite] $name: starting, budget $budget s ($(elapsed) s elapsed of $TOTAL s)"
    local t0 rc status
    t0=$(date +%s.%N)
    set +e
    SUITE_PART_DIR="$directory" SUITE_WORK="$SCRATCH/work/$name" \
        timeout -k 15 "$budget" bash "$SELF" --part "$name" >"$directory/stdout.txt" 2>"$directory/stderr.txt"
    rc=$?
    set -e
    local seconds
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case "$rc" in
        0) status=passed ;;
        124|137) status=timeout; note="${note:+$note; }stopped at its $budget s budget" ;;
        *)  # the last line of its stderr says why, most of the time
            status=failed
            note="${note:+$note; }exit status $rc: $(grep -v '^\s*$' "$directory/stderr.txt" | tail -n 1 | cut -c1-160)"
            ;;
    esac
    # Keep the part's logs (the original's worker log), drop its big files (state dicts of several GB).
    if [ -d "$SCRATCH/work/$name" ]; then
        find "$SCRATCH/work/$name" -name '*.log' -exec cp {} "$directory/" \;
        rm -rf "$SCRATCH/work/$name"
    fi
    record "$name" "$status" "$rc" "$seconds" "$budget" "$note"
    write_report 0
}

echo "[device_suite] $MODE run, python $PY, time limit $TOTAL s, results in $OUT_DIR"
"$PY" "$HELPER" machine "$STATE/machine.json" || echo '{}' >"$STATE/machine.json"
if ! grep -q '"torch": "' "$STATE/machine.json"; then  # the machine's description imports torch: one import, not two
    echo "device_suite.sh: $PY cannot import torch (set DEVICE_SUITE_PYTHON)" >&2
    exit 1
fi
write_report 0
run_part install_ours
run_part install_original
run_part gpu_tests install_ours
run_part vs_original_of3b install_ours install_original
run_part decode install_ours
run_part train_step_of3b install_ours
run_part vs_original_of9b install_ours install_original
run_part vs_original_of4b install_ours install_original
write_report 1
cat "$OUT_DIR/summary.md" | sed -n '1,/^## /p' | sed '$d'
echo "[device_suite] done in $(elapsed) s: $OUT_DIR/summary.md, results.json, logs.tar.gz"
# Failed or stopped parts make the suite fail; parts skipped for time (of4b) do not.
if awk -F'\t' '$2 == "failed" || $2 == "timeout" || ($2 == "skipped" && $6 ~ /did not pass/) { bad = 1 }
               END { exit !bad }' "$STATE/parts.tsv"; then
    exit 1
fi
