#!/bin/bash
# What a GPU machine checks and measures, in one go, from the repo root:
#   [FLASHINFER_DIR=DIR] [OUT=DIR] [COMMIT=SHA] bash benchmarks/run_gpu.sh [STAGE ...]
# Stages, run in the order given (default: all, in this order):
#   tests      the GPU tests (tests/gpu; test_multi_gpu.py needs 2 GPUs), 4 workers where pytest-xdist is installed
#   ceilings   the card's rates as flashforge_hf.ceilings.measure finds them (for its MEASURED table)
#   resources  each decode kernel's registers, spills and shared memory as this machine's Triton compiles them
#   breakdown  each kernel of a layer alone, per attention case (bench attention --breakdown)
#   tune       the whole layer under the segment kernel's tile configurations and waves (--tune layer)
#   attention  the attention benchmark, FlashInfer's paths beside ours: benchmarks/results/attention_<card>.*
#   generate   the end-to-end benchmark on the workloads that its targets name, graphs and compiled:
#              benchmarks/results/generate_<card>.*
# FLASHINFER_DIR: a folder holding FlashInfer's setup.sh (sourced first; FlashInfer's kernels JIT-compile at first
# use, minutes once per machine, so that warm-up starts in the background at once and the attention stage waits for
# it). Without it the FlashInfer columns say "not installed". Logs and the breakdown/tune CSVs go to $OUT
# (default /tmp/flashforge-gpu); COMMIT is recorded in the results where the checkout has no git metadata.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/flashforge-gpu}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
commit=(); [[ -n "${COMMIT:-}" ]] && commit=(--commit "$COMMIT")
stages=("$@"); [[ ${#stages[@]} -eq 0 ]] && stages=(tests ceilings resources breakdown tune attention generate)
for stage in "${stages[@]}"; do
    case $stage in
        tests|ceilings|resources|breakdown|tune|attention|generate) ;;
        *) echo "error: unknown stage '$stage' (tests, ceilings, resources, breakdown, tune, attention, generate)" >&2; exit 2 ;;
    esac
done
if [[ -n "${FLASHINFER_DIR:-}" && ! -f "${FLASHINFER_DIR}/setup.sh" ]]; then
    echo "error: no setup.sh in FLASHINFER_DIR=$FLASHINFER_DIR (unset it to run without FlashInfer)" >&2
    exit 2
fi
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# the benchmarks import as the installed package flashforge_bench: install the checkout if this Python lacks it
if ! python3 -c "import flashforge_bench.attention" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "error: installing the checkout failed" >&2; exit 1; }
fi
warm=""
if [[ -n "${FLASHINFER_DIR:-}" ]]; then
    set +u; source "$FLASHINFER_DIR/setup.sh"; set -u  # setup.sh reads variables that may be unset
    python3 benchmarks/attention.py --cases 8x1024+100 --no-write > "$OUT/flashinfer_warmup.log" 2>&1 &
    warm=$!
    say "FlashInfer warming up in the background (log: $OUT/flashinfer_warmup.log)"
fi

status=0
for stage in "${stages[@]}"; do
    say "$stage"
    case $stage in
        tests) workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 4)  # Triton compiles in parallel
               python3 -m pytest tests/gpu -q "${workers[@]}" -p no:cacheprovider --durations=10 ;;
        ceilings) python3 -c "import torch; from flashforge_hf.ceilings import measure; print(measure(torch.device('cuda')))" ;;
        resources) python3 benchmarks/kernel_resources.py --json "$OUT/kernel_resources.json" ;;
        breakdown) python3 benchmarks/attention.py --breakdown --out "$OUT/breakdown" ;;
        tune) python3 benchmarks/attention.py --tune layer --out "$OUT/tune_layer" ;;
        attention) [[ -n "$warm" ]] && { wait "$warm"; warm=""; }
                   python3 benchmarks/attention.py "${commit[@]}" ;;
        generate) python3 benchmarks/generate.py --workloads doc-qa-4k tree parallel-sampling few-shot-8b batch-1 profile \
                      --methods flashforge-graph flashforge-compiled "${commit[@]}" ;;
    esac || { status=1; say "$stage failed"; }
done
say "done"
exit $status
