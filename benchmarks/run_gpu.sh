#!/bin/bash
# What a GPU machine checks and measures, in one go, from the repo root:
#   [FLASHINFER_DIR=DIR] [OUT=DIR] [COMMIT=SHA] [LIMITS="STAGE=SECONDS ..."] [GPU_TESTS="FILE ..."] \
#       bash benchmarks/run_gpu.sh [STAGE ...]
# Stages, run in the order given (default: all, in this order):
#   tests      the GPU tests ($GPU_TESTS, default tests/gpu; test_multi_gpu.py needs 2 GPUs), 4 workers where
#              pytest-xdist is installed
#   ceilings   the card's rates as flashforge_hf.ceilings.measure finds them (for its MEASURED table)
#   resources  each decode kernel's registers, spills and shared memory as this machine's Triton compiles them
#   breakdown  each kernel of a layer alone, per attention case (bench attention --breakdown)
#   tune       the whole layer under the segment kernel's tile configurations and waves (--tune layer)
#   waves      one segment wave, two, and the planner's choice, per attention case (benchmarks/planner_waves.py)
#   attention  the attention benchmark, FlashInfer's paths beside ours: benchmarks/results/attention_<card>.*
#   generate   the end-to-end benchmark on the workloads that its targets name, graphs and compiled:
#              benchmarks/results/generate_<card>.*
# FLASHINFER_DIR: a folder holding FlashInfer's setup.sh (sourced first; FlashInfer's kernels JIT-compile at first
# use, minutes once per machine, so that warm-up starts in the background at once and the attention stage waits for
# it). Without it the FlashInfer columns say "not installed". OUT (default /tmp/flashforge-gpu) receives the whole
# log (log.txt), the breakdown/tune/waves results and a copy of every results file the run writes under
# benchmarks/results (copied after each stage; the attention and generate benchmarks rewrite theirs after each case
# or workload, so a stage stopped at its limit keeps what it finished). LIMITS: seconds a stage may take before it
# is stopped (e.g. "tests=240 attention=300"; a stopped stage counts as failed and the next one runs). COMMIT is
# recorded in the results where the checkout has no git metadata.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/flashforge-gpu}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
commit=(); [[ -n "${COMMIT:-}" ]] && commit=(--commit "$COMMIT")
stages=("$@"); [[ ${#stages[@]} -eq 0 ]] && stages=(tests ceilings resources breakdown tune waves attention generate)
for stage in "${stages[@]}"; do
    case $stage in
        tests|ceilings|resources|breakdown|tune|waves|attention|generate) ;;
        *) echo "error: unknown stage '$stage' (tests, ceilings, resources, breakdown, tune, waves, attention, generate)" >&2
           exit 2 ;;
    esac
done
declare -A limit=()
for item in ${LIMITS:-}; do
    name=${item%%=*} seconds=${item#*=}
    if [[ " ${stages[*]} " != *" $name "* || ! $seconds =~ ^[0-9]+$ ]]; then
        echo "error: LIMITS takes STAGE=SECONDS for stages of this run, got '$item'" >&2
        exit 2
    fi
    limit[$name]=$seconds
done
if [[ -n "${FLASHINFER_DIR:-}" && ! -f "${FLASHINFER_DIR}/setup.sh" ]]; then
    echo "error: no setup.sh in FLASHINFER_DIR=$FLASHINFER_DIR (unset it to run without FlashInfer)" >&2
    exit 2
fi
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s)
start_mark=$(mktemp); trap 'rm -f "$start_mark"' EXIT  # results files newer than this one are copied to $OUT
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
limited() { local stage=$1; shift; if [[ -n "${limit[$stage]:-}" ]]; then timeout "${limit[$stage]}" "$@"; else "$@"; fi; }

# the benchmarks import as the installed package flashforge_bench: install the checkout if this Python lacks it
if ! python3 -c "import flashforge_bench.attention" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "error: installing the checkout failed" >&2; exit 1; }
fi
warm=""
if [[ -n "${FLASHINFER_DIR:-}" ]]; then
    set +u; source "$FLASHINFER_DIR/setup.sh"; set -u  # setup.sh reads variables that may be unset
    if [[ " ${stages[*]} " == *" attention "* ]]; then
        python3 benchmarks/attention.py --cases 8x1024+100 --no-write > "$OUT/flashinfer_warmup.log" 2>&1 &
        warm=$!
        say "FlashInfer warming up in the background (log: $OUT/flashinfer_warmup.log)"
    fi
fi

status=0
for stage in "${stages[@]}"; do
    say "$stage"
    case $stage in
        tests) workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 4)  # Triton compiles in parallel
               read -ra files <<< "${GPU_TESTS:-tests/gpu}"
               limited tests python3 -m pytest "${files[@]}" -q "${workers[@]}" -p no:cacheprovider --durations=10 ;;
        ceilings) limited ceilings python3 -c "import torch; from flashforge_hf.ceilings import measure; print(measure(torch.device('cuda')))" ;;
        resources) limited resources python3 benchmarks/kernel_resources.py --json "$OUT/kernel_resources.json" ;;
        breakdown) limited breakdown python3 benchmarks/attention.py --breakdown --out "$OUT/breakdown" ;;
        tune) limited tune python3 benchmarks/attention.py --tune layer --out "$OUT/tune_layer" ;;
        waves) limited waves python3 benchmarks/planner_waves.py "${commit[@]}" ;;
        attention) [[ -n "$warm" ]] && { wait "$warm"; warm=""; }
                   limited attention python3 benchmarks/attention.py "${commit[@]}" ;;
        generate) limited generate python3 benchmarks/generate.py \
                      --workloads doc-qa-4k tree parallel-sampling few-shot-8b batch-1 profile \
                      --methods flashforge-graph flashforge-compiled "${commit[@]}" ;;
    esac || { status=1; say "$stage failed or was stopped"; }
    # after every stage, so that a call cut short still returns what the finished stages wrote
    find benchmarks/results -type f -newer "$start_mark" -exec cp {} "$OUT/" \;
done
say "done (results files written by this run are copied to $OUT)"
exit $status
