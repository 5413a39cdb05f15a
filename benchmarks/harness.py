"""What the benchmarks share: the card's name and ceilings, the git commit, timing of kernel calls, relative error,
random-weight Llama models and tree-shaped prompt batches, and writing results.

Installed with flashforge-hf as the package ``flashforge_bench`` (this folder, see pyproject.toml); the library
never imports it, except the CLI's ``bench`` subcommand, lazily.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch

from flashforge_hf.ceilings import Ceilings, ceilings_for

ROTATE_BYTES = 100e6  # timed inputs are copied until at least this many bytes cycle (more than the L2: 50 MB on an H100, 60 MB on an H200)
MAX_COPIES = 16


# ---- the card ------------------------------------------------------------------------------------------------
def card_name(device: torch.device) -> tuple[str, str]:
    """``(card, tag)``: the device's name and a short file tag (h100, h200, ... or cpu)."""
    if device.type != "cuda":
        return "CPU", "cpu"
    card = torch.cuda.get_device_name(device)
    low = card.lower()
    return card, next((t for t in ("h200", "h100", "a100") if t in low), low.split()[-1])


def card_ceilings(device: torch.device) -> Ceilings:
    """The ceilings the floors divide by (flashforge_hf.ceilings: a table for known cards, else measured once),
    printed once as :meth:`Ceilings.describe` says them."""
    c = ceilings_for(device)
    print(c.describe(), flush=True)
    return c


def floor_terms(c: Ceilings, nbytes: float, flops: float, unit: float = 1e6) -> dict:
    """The floor of ``nbytes`` moved and ``flops`` done, both terms and the floor itself (the larger), in
    ``unit`` per second (1e6: microseconds): ``{"floor_bytes": ..., "floor_flops": ..., "floor": ...}``."""
    bytes_s, flops_s = c.floor_s(nbytes, flops)
    return dict(floor_bytes=bytes_s * unit, floor_flops=flops_s * unit, floor=max(bytes_s, flops_s) * unit)


def git_commit(root: Path | None = None) -> str:
    """HEAD of the checkout ``root`` (default: the one these benchmarks run from), with "+dirty" when tracked files
    differ from it; "unknown" when ``root`` is not the top of a git checkout: a copy of the code inside another
    repository (as a GPU machine's carried folder is), or an installed copy, must not report that repository's
    HEAD; pass --commit."""
    root = (root or Path(__file__).resolve().parents[1]).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return "unknown"
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now() -> str:
    """The date of a run, as the results files record it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---- timing kernel calls ---------------------------------------------------------------------------------------
def n_copies(bytes_per_call: float) -> int:
    """Copies of a call's inputs so that at least ROTATE_BYTES cycle (at most MAX_COPIES)."""
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / bytes_per_call)))


def time_calls(calls, rep_ms: int, graph_calls=None) -> dict:
    """Median us per call, the calls taken in turn (inputs rotated over copies): eager (triton's do_bench, L2
    flushed before each call), replayed from a CUDA graph (do_bench_cudagraph, of ``graph_calls`` where the graph
    needs other calls, e.g. wrappers made for capture), and the wall time of a back-to-back eager loop (host
    launch cost included)."""
    import triton.testing

    it = itertools.cycle(calls)
    call = lambda: next(it)()  # noqa: E731
    graph_it = itertools.cycle(graph_calls or calls)
    eager = triton.testing.do_bench(call, warmup=10, rep=rep_ms, return_mode="median") * 1e3
    graph = triton.testing.do_bench_cudagraph(lambda: next(graph_it)(), rep=rep_ms, return_mode="median") * 1e3
    n = max(20, min(2000, int(rep_ms * 1e3 / max(graph, 1.0))))
    loops = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        torch.cuda.synchronize()
        loops.append((time.perf_counter() - t0) / n * 1e6)
    return dict(eager_us=eager, graph_us=graph, loop_us=statistics.median(loops))


def host_us(fn, n: int = 2000, repeats: int = 5) -> float:
    """Median host microseconds per call of fn (fn's GPU work must be shorter than its host cost)."""
    for _ in range(20):
        fn()
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    torch.cuda.synchronize()
    return statistics.median(runs)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``x`` against ``ref`` (float32 or wider), NaN when ``x`` holds a NaN."""
    if torch.isnan(x).any():
        return float("nan")
    return ((x.to(ref.dtype) - ref).norm() / ref.norm()).item()


# ---- models and prompts ----------------------------------------------------------------------------------------
# Llama shapes (random weights): what matters for attention and KV memory is layers, heads and head dim.
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0, max_positions: int = 131072):
    """A Llama of the named shape with random weights, loaded with attn_implementation="flashforge"."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}: choose one of {', '.join(SHAPES)}, or pass --model PATH.")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="flashforge")
    return model.eval()


def tree_batch(levels, vocab: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts shaped by a tree: ``levels[i] = (tokens, fanout)``, each node of level i-1 (one root above
    level 0) has ``fanout`` children of ``tokens`` random ids in [3, vocab); one prompt per leaf, all equally
    long (no padding). ``((shared, 1), (suffix, batch))`` is ``batch`` rows sharing ``shared`` tokens.
    Returns ``(input_ids, attention_mask)``, int64 [prompts, sum of tokens]."""
    g = torch.Generator().manual_seed(seed)
    prompts = math.prod(f for _, f in levels)
    parts, nodes = [], 1
    for tokens, fanout in levels:
        nodes *= fanout
        level = torch.randint(3, vocab, (nodes, tokens), generator=g)
        parts.append(level.repeat_interleave(prompts // nodes, 0))
    ids = torch.cat(parts, 1).to(device)
    return ids, torch.ones_like(ids)


# ---- results ---------------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    """Write the result dicts as CSV: ``columns`` (default the keys of the first row), missing values empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """The rows of a results CSV (values as text); none when it does not exist."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
