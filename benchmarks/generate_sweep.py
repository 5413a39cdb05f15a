"""``flashforge-hf bench generate``: end-to-end greedy generation, stock vs FlashForge
(:func:`flashforge_hf.comparison.compare`), on synthetic shared-prefix batches (random token ids) over a sweep of
batch sizes: TTFT, time per output token, tokens/s, KV-cache bytes and (CUDA) peak memory per workload and batch
size, written as CSV plus a PNG plot (the plot needs matplotlib: ``pip install "flashforge-hf[bench]"``).

    flashforge-hf bench generate --shape tiny --workload few-shot --batch-sizes 1 2 --out-dir /tmp/b   # CPU
    python benchmarks/generate_sweep.py --shape llama-1b --batch-sizes 1 16 64                         # CUDA
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flashforge_bench.harness import SHAPES, random_model, tree_batch, write_csv
from flashforge_hf.cli import positive_int
from flashforge_hf.comparison import FLASHFORGE, compare, same_tokens
from flashforge_hf.models import load_model, resolve_device, resolve_dtype

# Synthetic workloads: every row is shared_len tokens shared by the whole batch, then its own suffix_len tokens.
WORKLOADS = {
    "doc-qa": dict(shared_len=4096, suffix_len=32, description="one long document, many short questions"),
    "few-shot": dict(shared_len=768, suffix_len=96, description="a few-shot prompt, questions of a paragraph"),
}



def bench_generate(model, workloads: list[str], batch_sizes: list[int], max_new_tokens: int, *,
                   shared_len: int | None = None, suffix_len: int | None = None, progress: bool = True) -> list[dict]:
    """Stock vs FlashForge on each workload and batch size (greedy, exactly ``max_new_tokens`` tokens per row).
    Returns one CSV-ready dict per (workload, batch size, mode)."""
    from tqdm.auto import tqdm

    device = model.get_input_embeddings().weight.device
    cases = [(w, b) for w in workloads for b in batch_sizes]
    results = []
    for workload, batch in tqdm(cases, desc="bench generate", disable=not progress):
        spec = WORKLOADS[workload]
        shared = shared_len or spec["shared_len"]
        suffix = suffix_len or spec["suffix_len"]
        ids, mask = tree_batch(((shared, 1), (suffix, batch)), model.config.vocab_size, device)
        stock, ours = compare(model, ids, mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              do_sample=False, progress=False)
        for run in (stock, ours):
            results.append(dict(workload=workload, batch=batch, shared_len=shared, suffix_len=suffix,
                                max_new_tokens=max_new_tokens, **run.metrics(), identical_tokens=same_tokens(stock, ours)))
    return results


def plot(rows: list[dict], path: Path, title: str) -> None:
    """A PNG with, per metric (TTFT, time per output token, tokens/s, KV bytes, CUDA peak memory), one line per
    (workload, mode) against batch size. Needs matplotlib (``pip install matplotlib``, or ``pip install flashforge-hf[bench]``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("The bench plot needs matplotlib: pip install matplotlib  (CSV was written)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("ttft_s", "time to first token (s)"), ("tpot_s", "time per output token (s)"),
               ("tokens_per_s", "tokens/s"), ("kv_bytes", "KV-cache MiB")]
    if all(r["peak_bytes"] is not None for r in rows):
        metrics.append(("peak_bytes", "peak memory of generate (MiB)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4))
    series = sorted({(r["workload"], r["mode"]) for r in rows})
    for ax, (key, label) in zip(axes, metrics):
        for workload, mode in series:
            pts = [(r["batch"], r[key]) for r in rows if (r["workload"], r["mode"]) == (workload, mode)]
            xs, ys = zip(*pts)
            if key.endswith("_bytes"):
                ys = [y / 2**20 for y in ys]
            ax.plot(xs, ys, marker="o", linestyle="-" if mode == FLASHFORGE else "--", label=f"{workload} {mode}")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flashforge-hf bench generate",
        description="End-to-end greedy generation, stock vs FlashForge, on synthetic shared-prefix batches (random "
        "token ids): TTFT, time per output token, tokens/s, KV-cache bytes and (CUDA) peak memory per workload and "
        "batch size. Workloads: " + "; ".join(f"{k}: {v['description']} ({v['shared_len']} shared + "
                                               f"{v['suffix_len']} own tokens per row)" for k, v in WORKLOADS.items())
        + ". CSV and PNG (the plot needs matplotlib: pip install matplotlib).")
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny",
                    help="Llama shape with random weights (default tiny); ignored with --model")
    ap.add_argument("--model", metavar="PATH", help="a local model folder instead of a random-weight shape")
    ap.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                    help="workload presets (default: all)")
    ap.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4, 16], metavar="N",
                    help="batch sizes to sweep (default 1 4 16)")
    ap.add_argument("--shared-len", type=int, help="override the workloads' shared prefix length (tokens)")
    ap.add_argument("--suffix-len", type=int, help="override the workloads' per-row suffix length (tokens)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per row (default 32)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; default auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="default auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out-dir", default="bench_results", metavar="DIR",
                    help="where bench_generate.csv and bench_generate.png go (default ./bench_results)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        model = load_model(args.model, device, dtype)
        name = Path(args.model).name
    else:
        model = random_model(args.shape, device, dtype)
        name = f"{args.shape} (random weights)"
    rows = bench_generate(model, args.workload, args.batch_sizes, args.max_new_tokens,
                          shared_len=args.shared_len, suffix_len=args.suffix_len)
    out = Path(args.out_dir)
    csv_path, png_path = out / "bench_generate.csv", out / "bench_generate.png"
    write_csv(rows, csv_path)
    print(f"wrote {csv_path}")
    for r in rows:
        print(f"{r['workload']:>9} batch {r['batch']:>4} {r['mode']:>10}: TTFT {r['ttft_s'] * 1e3:9.1f} ms  "
              f"TPOT {r['tpot_s'] * 1e3:8.2f} ms  {r['tokens_per_s']:9.1f} tok/s  KV {r['kv_bytes'] / 2**20:9.1f} MiB"
              f"  identical {r['identical_tokens']}")
    try:
        plot(rows, png_path, f"stock vs flashforge generate: {name}, {device}, {str(dtype).removeprefix('torch.')}")
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
