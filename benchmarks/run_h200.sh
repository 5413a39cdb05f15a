#!/bin/bash
# The attention benchmark with FlashInfer at the full shapes, on the GPU machine, from the repo root:
#   FLASHINFER_DIR=/path/to/flashinfer bash benchmarks/run_h200.sh [--commit SHA] [more attention-benchmark options]
# FLASHINFER_DIR holds FlashInfer's setup.sh (and what it installs from); it is sourced first, so that FlashInfer
# imports in this shell (its first use JIT-compiles its kernels: minutes, once per machine). Writes
# benchmarks/results/attention_<card>.{csv,md,png} (the card's tag in the name: h200 on an H200), or under --out.
set -euo pipefail
if [[ -z "${FLASHINFER_DIR:-}" || ! -f "$FLASHINFER_DIR/setup.sh" ]]; then
    echo "error: set FLASHINFER_DIR to a folder holding FlashInfer's setup.sh (got '${FLASHINFER_DIR:-}')" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
set +u  # setup.sh reads variables that may be unset
source "$FLASHINFER_DIR/setup.sh"
set -u
# the benchmarks import as the installed package flashforge_bench: install the checkout if this Python lacks it
python3 -c "import flashforge_bench.attention" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import flashinfer" || { echo "error: FlashInfer does not import after setup.sh" >&2; exit 1; }
exec python3 benchmarks/attention.py "$@"
