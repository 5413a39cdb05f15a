"""End-to-end generate on random-weight Llama-3-8B / 3.2-1B shapes: stock, stock with chunked prefill, the
prefix-reuse pattern and FlashForge on shared-prefix workloads, with correctness checks, a decode-step profile
and a capacity search; see flashforge_hf/bench_e2e.py (the logic, importable from an installed package).

    python benchmarks/generate.py --workloads doc-qa-4k doc-qa-16k profile     # needs CUDA at --scale full
    python benchmarks/generate.py --scale tiny --out-dir /tmp/e2e               # CPU, seconds
"""

from flashforge_hf.bench_e2e import main

if __name__ == "__main__":
    raise SystemExit(main())
