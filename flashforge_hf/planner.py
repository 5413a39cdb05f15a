"""Planner: turns a segment forest into the task tables that every layer of one forward pass reuses.

Runs on the host from Python ints the cache already knows (segment lengths, each row's path of segments,
each row's suffix start); it never reads device memory. Its output lives in device tensors (one small
host-to-device copy per plan) and is reused by every layer.

Cost model (the paper's workload balancing): a task that applies ``n`` keys to ``m`` stacked queries costs
    max(bytes / bandwidth, flops / peak) + launch_overhead,   bytes = 2 * n * D * itemsize (K and V),
                                                              flops = 4 * m * n * D,
and each segment is split along its length into chunks so that the tasks of all segments together cover
every SM ``waves`` times with near-equal cost; the chunk boundaries are multiples of the kernel's key tile.

How many waves: more chunks balance the SMs better, but every chunk of every row writes a float32 partial
(Hq x (D + 1) x 4 bytes per query) that the merge reads back, and two segment tasks per SM leave no room beside
them for the suffix kernel's programs (shared memory: benchmarks/kernel_resources.py), so the layer's suffix pass
then runs after the segment pass instead of beside it. :func:`plan_segments` plans each of :data:`WAVES` and keeps
the one whose estimate is least: the segment work spread over the SMs (slowed when no SM holds two tasks),
overlapped with the suffix pass's K/V stream when each SM holds at most one segment task and added to it
otherwise, plus the partials' bytes written and read. The rates are the card's own
(:mod:`flashforge_hf.ceilings`); the two constants (a task's fixed cost, the single-task slowdown) are calibrated
on measured layer times (docs/design.md, "The cost model").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .ceilings import ceilings_for
from .kernels import segment_attention
from .kernels._common import block_d
from .kernels.segment_attention import SegmentTasks
from .kernels.suffix_attention import SuffixTasks


@dataclass(frozen=True)
class DeviceModel:
    """What the cost model needs to know about the card."""

    num_sms: int
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s that the segment kernel reaches on compute-bound tiles, in the model dtype
    task_overhead: float = 2e-6  # s: fixed cost of one task (prologue, merge share)

    @staticmethod
    def for_device(device: torch.device) -> "DeviceModel":
        if device.type != "cuda":
            return _CPU_MODEL
        return _cuda_model(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_model(index: int) -> DeviceModel:
    device = torch.device("cuda", index)
    rates = ceilings_for(device)
    return DeviceModel(num_sms=torch.cuda.get_device_properties(index).multi_processor_count,
                       bandwidth=rates.bandwidth, flops=rates.tile_flops)


_CPU_MODEL = DeviceModel(num_sms=1, bandwidth=2e10, flops=1e11)

MAX_BLOCK_M = 64  # most stacked queries per segment tile on CUDA (64 at most for head dims over 128)
WAVES = (1, 2)  # segment tasks per SM (over the KV heads) that the chunking may aim at; the cheapest is kept
# Segment work when no SM holds two tasks: one program per SM cannot overlap one tile's loads with another's math.
SINGLE_TASK_SLOWDOWN = 1.2


@dataclass
class ForestPlan:
    """Everything the attention of one forward pass needs beyond the layer's tensors.

    segments:      SegmentTasks, or None when no row has a shared ancestor.
    suffix:        SuffixTasks for the rows' own KV.
    row_slot_off:  int32 [R + 1] device: each row's range of segment partial slots (merge input).
    n_slots:       partial slots in all (segment chunks per row, then n_splits * R suffix slots).
    q_len:         query tokens per row in this forward.
    workspace:     float32 storage of the partial buffers, owned by the caller and shared across plans.
    launches:      bound kernel launches of this plan, keyed by the layer tensors' geometry (CUDA), or the
                   index tables of forest_attention's batched path (key "host", other devices); filled by
                   forest_attention at the first layer, reused by the others.
    """

    segments: SegmentTasks | None
    suffix: SuffixTasks
    row_slot_off: torch.Tensor
    n_slots: int
    q_len: int
    workspace: dict = field(default_factory=dict)
    launches: dict = field(default_factory=dict)

    def partial_buffers(self, num_heads: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (o_part [P, Q, Hq, D], lse_part [P, Q, Hq]) carved from ``workspace``, which the owner
        (the cache) keeps across layers and forward passes; it only grows, so decoding reallocates nothing."""
        need = self.n_slots * self.q_len * num_heads
        o, lse = self.workspace.get("o"), self.workspace.get("lse")
        if lse is None or lse.numel() < need or o.numel() < need * head_dim or o.device != torch.device(device):
            o = torch.empty(need * head_dim, dtype=torch.float32, device=device)
            lse = torch.empty(need, dtype=torch.float32, device=device)
            self.workspace.update(o=o, lse=lse)
        return (
            o[: need * head_dim].view(self.n_slots, self.q_len, num_heads, head_dim),
            lse[:need].view(self.n_slots, self.q_len, num_heads),
        )


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


@dataclass(frozen=True)
class SegmentLoad:
    """The shared segments of one plan as the cost model sees them: ``rows_of[s]`` the rows under segment s,
    ``m_of[s]`` its stacked queries (rows x query tokens x GQA group), ``tiles[s]`` its query tiles of
    ``block_m``; per KV head, on the card ``dev``."""

    rows_of: dict
    seg_len: list
    m_of: dict
    tiles: dict
    block_m: int
    block_n: int
    head_dim: int
    itemsize: int
    num_kv_heads: int
    num_rows: int
    dev: DeviceModel
    on_gpu: bool

    @property
    def segs(self) -> list[int]:
        return sorted(self.rows_of)

    def task_cost(self, n: int, m: int) -> float:
        """Seconds of one task applying ``n`` keys to ``m`` stacked queries (see the module docstring)."""
        byts = 2 * n * self.head_dim * self.itemsize
        flops = 4 * _pow2_at_least(m, 16) * n * self.head_dim
        return max(byts / self.dev.bandwidth, flops / self.dev.flops) + self.dev.task_overhead

    def chunking(self, waves: int) -> tuple[dict, dict]:
        """(chunks, keys per chunk) of every segment for ``waves`` tasks per SM, each of near-equal cost; chunks
        hold whole key tiles, so rounding can leave fewer (never empty) chunks than wanted."""
        target_tasks = max(1, waves * self.dev.num_sms // self.num_kv_heads)
        per_task = sum(self.tiles[s] * self.task_cost(self.seg_len[s], self.block_m) for s in self.segs) / target_tasks
        chunks, step = {}, {}
        for s in self.segs:
            n = self.seg_len[s]
            want = 1
            if self.on_gpu and per_task > 0:
                want = min(max(1, round(self.task_cost(n, self.block_m) / per_task)), math.ceil(n / self.block_n))
            step[s] = math.ceil(math.ceil(n / want) / min(self.block_n, n)) * min(self.block_n, n)
            chunks[s] = math.ceil(n / step[s])
        return chunks, step

    def suffix_seconds(self, suffix_cols: int) -> float:
        """Seconds of the same layer's suffix pass: every row's K/V over ``suffix_cols`` columns at the bandwidth."""
        return 2 * self.num_rows * self.num_kv_heads * suffix_cols * self.head_dim * self.itemsize / self.dev.bandwidth

    def estimate(self, chunks: dict, suffix_cols: int = 0) -> float:
        """Seconds of the segment pass (its K/V read once, its tiles' FLOPs, a fixed cost per task spread over
        the SMs; slower when no SM holds two tasks) beside or after a suffix pass over ``suffix_cols`` columns
        (beside it when each SM holds at most one segment task), and of the partials' round trip."""
        dev, hkv, d = self.dev, self.num_kv_heads, self.head_dim
        programs = hkv * sum(self.tiles[s] * chunks[s] for s in self.segs)
        byts = hkv * sum(2 * self.seg_len[s] * d * self.itemsize for s in self.segs)
        flops = hkv * sum(4 * self.tiles[s] * self.block_m * self.seg_len[s] * d for s in self.segs)
        work = max(byts / dev.bandwidth, flops / dev.flops) + programs * dev.task_overhead / dev.num_sms
        suffix = self.suffix_seconds(suffix_cols)
        if programs <= dev.num_sms:
            work = max(work * SINGLE_TASK_SLOWDOWN, suffix)
        else:
            work += suffix
        partials = sum(chunks[s] * self.m_of[s] for s in self.segs) * hkv * (d + 1) * 4 * 2
        return work + partials / dev.bandwidth

    def best_waves(self, suffix_cols: int = 0) -> int:
        """The entry of :data:`WAVES` whose chunking has the least estimate beside a suffix pass over
        ``suffix_cols`` columns (1 off the GPU)."""
        if not self.on_gpu:
            return 1
        return min(WAVES, key=lambda w: self.estimate(self.chunking(w)[0], suffix_cols))


def segment_load(paths, seg_len, q_len: int, group: int, num_kv_heads: int, head_dim: int, itemsize: int,
                 dev: DeviceModel) -> SegmentLoad | None:
    """The :class:`SegmentLoad` of rows with these ``paths``, or None when no row has a shared segment."""
    rows_of: dict[int, list[int]] = {}
    for r, path in enumerate(paths):
        for s in path:
            rows_of.setdefault(s, []).append(r)
    if not rows_of:
        return None
    on_gpu = dev is not _CPU_MODEL
    m_of = {s: len(rows) * q_len * group for s, rows in rows_of.items()}
    if on_gpu:
        block_m = min(MAX_BLOCK_M if head_dim <= 128 else 64, _pow2_at_least(max(m_of.values()), 16))
        block_n = segment_attention.tile_config(block_m, block_d(head_dim))[0]
    else:
        block_m, block_n = _pow2_at_least(max(m_of.values()), 1), 64
    tiles = {s: math.ceil(m / block_m) for s, m in m_of.items()}
    return SegmentLoad(rows_of, list(seg_len), m_of, tiles, block_m, block_n, head_dim, itemsize, num_kv_heads,
                       len(paths), dev, on_gpu)


def plan_segments(
    paths: list[list[int]],
    seg_start: list[int],
    seg_len: list[int],
    q_len: int,
    group: int,
    num_kv_heads: int,
    head_dim: int,
    itemsize: int,
    device: torch.device,
    waves: int | None = None,
    device_model: DeviceModel | None = None,
    suffix_cols: int = 0,
) -> tuple[SegmentTasks | None, list[int]]:
    """Split and order the shared segments' tasks; returns (tasks, row_slot_off as Python ints).
    ``waves``: tasks per SM to aim at (default: :meth:`SegmentLoad.best_waves` beside a suffix pass over
    ``suffix_cols`` columns, see the module docstring). ``device_model``: the card to plan for (default:
    ``device``'s own; a GPU model plans GPU tiles and chunks for tensors on any device, which tests use)."""
    load = segment_load(paths, seg_len, q_len, group, num_kv_heads, head_dim, itemsize,
                        device_model or DeviceModel.for_device(device))
    if load is None:
        return None, [0] * (len(paths) + 1)
    chunks, step = load.chunking(waves if waves is not None else load.best_waves(suffix_cols))
    # Partial slots: per row, its path's segment chunks in path order.
    row_slot_off = [0]
    base_of: dict[tuple[int, int], int] = {}
    for r, path in enumerate(paths):
        nxt = row_slot_off[-1]
        for s in path:
            base_of[(s, r)] = nxt
            nxt += chunks[s]
        row_slot_off.append(nxt)
    seg_rows, row_slot, tasks = [], [], []
    for s in load.segs:
        rows_lo = len(seg_rows)
        seg_rows += load.rows_of[s]
        row_slot += [base_of[(s, r)] for r in load.rows_of[s]]
        n = seg_len[s]
        for ci in range(chunks[s]):  # every chunk holds keys: each row's slots are all written
            kv_lo, kv_hi = seg_start[s] + ci * step[s], seg_start[s] + min(n, (ci + 1) * step[s])
            for m_lo in range(0, load.m_of[s], load.block_m):
                tasks.append((kv_lo, kv_hi, rows_lo, m_lo, min(load.m_of[s], m_lo + load.block_m), ci))
    tasks.sort(key=lambda t: -(t[1] - t[0]))  # longest first, so that the tail of the grid is made of short ones
    return _upload_tasks(tasks, seg_rows, row_slot, load, device), row_slot_off


def _upload_tasks(tasks: list[tuple], seg_rows: list[int], row_slot: list[int], load: SegmentLoad,
                  device) -> SegmentTasks:
    """The task tables in one host-to-device copy, each table starting 16-byte aligned (alignment picks the
    kernel variant)."""
    parts = [[x for t in tasks for x in t], seg_rows, row_slot]
    offs = [0]
    for part in parts:
        offs.append(offs[-1] + -(-len(part) // 4) * 4)
    flat = [0] * offs[-1]
    for part, o in zip(parts, offs):
        flat[o:o + len(part)] = part
    table = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
    return SegmentTasks(
        tasks=table[offs[0]:offs[0] + len(parts[0])].view(-1, 6),
        seg_rows=table[offs[1]:offs[1] + len(seg_rows)],
        row_slot=table[offs[2]:offs[2] + len(row_slot)],
        block_m=load.block_m,
        block_n=load.block_n,
        host=tuple(tasks),
    )


ONE_SPLIT = 1 << 30  # split_len of a suffix pass without splits: it covers any end (see plan_suffix_splits)


def plan_suffix_splits(num_rows: int, num_kv_heads: int, end: int, q_len: int, device: torch.device,
                       device_model: DeviceModel | None = None) -> tuple[int, int]:
    """(split_len, n_splits) for the suffix pass: split long suffixes so that small batches still fill the card.
    Without splits the answer is (:data:`ONE_SPLIT`, 1) whatever ``end`` is, so that plans made for different ends
    are equal (a CUDA graph captured with one replays correctly for every end up to the others' bounds).
    ``device_model``: the card to plan for (default: ``device``'s own, none off CUDA)."""
    if (device.type != "cuda" and device_model is None) or end == 0:
        return ONE_SPLIT, 1
    dev = device_model or DeviceModel.for_device(device)
    q_tiles = math.ceil(q_len * 8 / 64)  # rough query tiles per (row, kv head)
    programs = num_rows * num_kv_heads * q_tiles
    want = max(1, (2 * dev.num_sms) // max(programs, 1))
    split_len = max(256, math.ceil(end / want / 64) * 64)
    n_splits = math.ceil(end / split_len)
    return (split_len, n_splits) if n_splits > 1 else (ONE_SPLIT, 1)


class SegmentPart(NamedTuple):
    """The part of a plan that depends only on the forest and the query geometry (see :func:`segment_part`)."""

    tasks: SegmentTasks | None
    row_slot_off: list[int]  # [R + 1] host: each row's range of segment partial slots
    row_slot_off_dev: torch.Tensor  # the same, int32 on the plan's device


def segment_part(paths, seg_start, seg_len, q_len, group, num_kv_heads, head_dim, itemsize, device,
                 waves: int | None = None, suffix_cols: int = 0) -> SegmentPart:
    """The part of a plan that depends only on the forest, the query length and the segment waves (``waves``, or
    the best beside a suffix pass over ``suffix_cols`` columns; see :func:`plan_segments`), so that decoding
    (whose suffixes grow every step) makes it once per choice of waves."""
    seg_tasks, row_slot_off = plan_segments(paths, seg_start, seg_len, q_len, group, num_kv_heads, head_dim, itemsize,
                                            device, waves=waves, suffix_cols=suffix_cols)
    return SegmentPart(seg_tasks, row_slot_off, torch.tensor(row_slot_off, dtype=torch.int32).to(device, non_blocking=True))


def plan_forward(segments: SegmentPart, suffix_start: torch.Tensor, suffix_end: torch.Tensor, bound: int, q_len: int,
                 num_kv_heads: int, device) -> ForestPlan:
    """A forward pass's plan from its ``segments`` part (see :func:`segment_part`) and where the suffixes end:
    ``suffix_end`` int32 [1] on ``device`` (read by the kernel), ``bound`` a host upper bound of it that sizes
    the suffix splits. The plan stays valid while ``suffix_end`` grows up to ``bound`` (a CUDA graph replays it)."""
    seg_tasks, row_slot_off, row_slot_off_dev = segments
    R = len(row_slot_off) - 1
    split_len, n_splits = plan_suffix_splits(R, num_kv_heads, bound, q_len, device)
    slot0 = row_slot_off[-1]
    return ForestPlan(
        segments=seg_tasks,
        suffix=SuffixTasks(start=suffix_start, slot0=slot0, end=suffix_end, split_len=split_len, n_splits=n_splits),
        row_slot_off=row_slot_off_dev,
        n_slots=slot0 + n_splits * R,
        q_len=q_len,
    )


def make_plan(
    paths: list[list[int]],
    seg_start: list[int],
    seg_len: list[int],
    suffix_start: torch.Tensor,
    suffix_end: int,
    q_len: int,
    group: int,
    num_kv_heads: int,
    head_dim: int,
    itemsize: int,
    device: torch.device,
) -> ForestPlan:
    """Plan one forward pass. ``suffix_start`` is int32 [R] on ``device``; everything else is host data."""
    segments = segment_part(paths, seg_start, seg_len, q_len, group, num_kv_heads, head_dim, itemsize, device,
                            suffix_cols=suffix_end)
    end = torch.full((1,), suffix_end, dtype=torch.int32, device=device)
    return plan_forward(segments, suffix_start, end, suffix_end, q_len, num_kv_heads, device)
