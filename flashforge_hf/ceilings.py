"""The card's ceilings: the rates that the planner's cost model and the benchmarks' floors divide by.

    bandwidth     bytes/s of a large device-to-device copy, counting bytes read plus bytes written;
    matmul_flops  FLOP/s of a large bf16 matrix product (torch.matmul on random data);
    tile_flops    FLOP/s that the segment kernel reaches on compute-bound tiles (bf16, head dim 128, many
                  stacked queries against long segments): the rate its own tiles can run at, below the GEMM's.

Known cards take their values from :data:`MEASURED` (measured on those cards; the results file
benchmarks/results/ceilings.md says when and how). Any other CUDA card is measured once per
device type, at first use (about a second, some 600 MB of GPU memory), and the values are kept in
``ceilings.json`` under $FLASHFORGE_HF_CACHE (default ~/.cache/flashforge_hf), keyed by the card's name and
multiprocessor count; where that measurement runs out of memory, the reference card's values scaled by
multiprocessor count serve instead, said once.
A CPU is measured the same way (fp32 matmul, no tile rate of its own: the matmul's), for the benchmarks'
tiny CPU runs; the planner does not use it.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from .kernels import segment_attention
from .kernels._common import block_d
from .models import cache_dir


@dataclass(frozen=True)
class Ceilings:
    """One card's measured rates (see the module docstring)."""

    card: str
    bandwidth: float  # bytes/s, read plus written
    matmul_flops: float  # FLOP/s
    tile_flops: float  # FLOP/s
    source: str  # "table" (MEASURED) or "measured" (on this machine, possibly cached on disk)

    def floor_s(self, nbytes: float, flops: float, *, tiles: bool = False) -> tuple[float, float]:
        """(bytes term, FLOPs term) in seconds: ``nbytes`` at the bandwidth and ``flops`` at the matmul rate (at
        the tile rate with ``tiles``). The floor is the larger of the two."""
        return nbytes / self.bandwidth, flops / (self.tile_flops if tiles else self.matmul_flops)

    def describe(self) -> str:
        """One line for benchmark headers: the card, where the rates come from, and the rates."""
        return (f"card ceilings ({self.card}, {self.source}): bandwidth {self.bandwidth / 1e12:.2f} TB/s (device copy, "
                f"read + write), matmul {self.matmul_flops / 1e12:.3g} TFLOP/s (large matmul, bf16 on CUDA), "
                f"segment-kernel tiles {self.tile_flops / 1e12:.3g} TFLOP/s")


# name (as torch.cuda.get_device_properties reports it), multiprocessor count -> (bandwidth, matmul, tiles)
MEASURED: dict[tuple[str, int], tuple[float, float, float]] = {
    ("NVIDIA H100 80GB HBM3", 132): (3.0e12, 7.4e14, 4.5e14),
}
REFERENCE = ("NVIDIA H100 80GB HBM3", 132)  # scaled by multiprocessor count where a card cannot be measured


def ceilings_for(device: torch.device | str) -> Ceilings:
    """The ceilings of ``device``'s card: the table's, else measured once and cached (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_ceilings()
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return _cuda_ceilings(props.name, props.multi_processor_count, index)


@functools.lru_cache(maxsize=None)
def _cuda_ceilings(name: str, num_sms: int, index: int) -> Ceilings:
    known = MEASURED.get((name, num_sms))
    if known is not None:
        return Ceilings(name, *known, source="table")
    key = f"{name} ({num_sms} SMs)"
    path = cache_dir() / "ceilings.json"
    stored = _read(path)
    if key in stored:
        return Ceilings(**stored[key])
    try:
        found = measure(torch.device("cuda", index))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        bandwidth, matmul, tiles = MEASURED[REFERENCE]
        scale = num_sms / REFERENCE[1]
        warnings.warn(f"flashforge_hf: measuring the ceilings of {name} ran out of GPU memory; planning with the "
                      f"{REFERENCE[0]}'s, scaled by multiprocessor count, until a process measures them (free "
                      f"about 1 GiB, or call flashforge_hf.ceilings.measure before loading the model).", stacklevel=2)
        return Ceilings(name, bandwidth * scale, matmul * scale, tiles * scale, source="estimated")
    stored[key] = asdict(found)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=1))
    except OSError:  # a read-only home: measured again next process
        pass
    return found


@functools.lru_cache(maxsize=None)
def _cpu_ceilings() -> Ceilings:
    return measure(torch.device("cpu"))


def _read(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def measure(device: torch.device) -> Ceilings:
    """Measure the three rates on ``device`` (median of timed repeats after a warm-up, random data)."""
    cuda = device.type == "cuda"
    n_copy = (1 << 28) if cuda else (1 << 26)  # bytes per copy: several times the L2 (or the CPU's caches)
    src = torch.empty(n_copy // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    bandwidth = 2 * n_copy / _median_s(lambda: dst.copy_(src), device)
    del src, dst
    n, dtype = (4096, torch.bfloat16) if cuda else (1024, torch.float32)  # 32 MiB operands: large enough to saturate
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul = 2 * n**3 / _median_s(lambda: torch.matmul(a, b), device)
    del a, b
    tiles = _segment_tile_flops(device) if cuda else matmul
    name = torch.cuda.get_device_properties(device).name if cuda else "CPU"
    return Ceilings(name, bandwidth, matmul, tiles, source="measured")


def _segment_tile_flops(device: torch.device) -> float:
    """FLOP/s of the segment kernel on one shared segment of 32,768 keys read by 256 rows (8 KV heads, 4 query
    heads each, head dim 128, bf16): 16 tiles of 64 stacked queries per key chunk, chunks enough for two tasks
    per multiprocessor, which is compute-bound on any card."""
    hkv, g, d, rows, keys, block_m = 8, 4, 128, 256, 32768, 64
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    m = rows * g
    m_tiles = m // block_m
    chunks = max(1, 2 * num_sms // (hkv * m_tiles))
    step = keys // chunks
    tasks = [(c * step, (c + 1) * step, 0, t * block_m, (t + 1) * block_m, c) for c in range(chunks) for t in range(m_tiles)]
    block_n = segment_attention.tile_config(block_m, block_d(d))[0]
    plan = segment_attention.SegmentTasks(
        tasks=torch.tensor(tasks, dtype=torch.int32, device=device),
        seg_rows=torch.arange(rows, dtype=torch.int32, device=device),
        row_slot=torch.arange(rows, dtype=torch.int32, device=device) * chunks,
        block_m=block_m, block_n=block_n, host=tuple(tasks))
    q = torch.randn(rows, hkv * g, 1, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(hkv, keys, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    o_part = torch.empty(rows * chunks, 1, hkv * g, d, device=device, dtype=torch.float32)
    lse_part = torch.empty(rows * chunks, 1, hkv * g, device=device, dtype=torch.float32)
    launch = segment_attention.bind_segment_attention(q, k, v, plan, o_part, lse_part, d**-0.5)
    return 4 * m * keys * d * hkv / _median_s(lambda: launch(q, k, v), device)


def _median_s(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
