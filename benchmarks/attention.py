"""One attention layer in decode: forest_attention vs SDPA over materialised KV vs sharing disabled, against
the memory floor; see flashforge_hf/bench_attention.py (the logic, importable from an installed package).

    python benchmarks/attention.py [--cases ...] [--tune]     # needs CUDA
"""

from flashforge_hf.bench_attention import main

if __name__ == "__main__":
    raise SystemExit(main())
