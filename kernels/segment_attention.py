"""Segment attention: the paper's partial attention over shared KV segments.

One task reads one chunk of one shared segment's K/V (for one KV head) once and applies it to a tile of
queries stacked from every row under that segment (rows x query tokens x the GQA group's query heads), so
the K/V bytes are loaded once per tile instead of once per row.

Tensors (R query rows, Q query tokens per row, Hq = Hkv * G query heads, D head dim, T packed segment tokens):
    q          [R, Hq, Q, D]  model dtype, any strides (last dim contiguous): the layer's queries.
    seg_k/v    [Hkv, T, D]    model dtype, contiguous: every shared segment of this layer, packed along T.
    o_part     [P, Q, Hq, D]  float32: partial outputs, normalised within their chunk (P partial slots).
    lse_part   [P, Q, Hq]     float32: their log-sum-exp of scaled scores, natural log; -inf for no keys.

Stacked query index inside one segment: m = (row_local * Q + t) * G + g, where row_local indexes the
segment's rows in ``seg_rows`` and g the query head inside the KV head's group (query head = h * G + g).
The partial slot of (segment, row_local, chunk c) is ``row_slot[rows_lo + row_local] + c``.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import KernelLauncher, attend_keys, block_d, dot_precision, finish_softmax, log2_scale, stride_unit


class SegmentTasks(NamedTuple):
    """Work list of one forward pass, made by the planner once and reused by every layer.

    tasks:    int32 [n_tasks, 6], device: (kv_lo, kv_hi, rows_lo, m_lo, m_hi, chunk) per task; keys are
              packed tokens [kv_lo, kv_hi), queries are stacked indices [m_lo, m_hi) of the segment whose
              rows start at ``rows_lo`` in ``seg_rows``.
    seg_rows: int32 [n_pairs], device: query-row ids, grouped by segment.
    row_slot: int32 [n_pairs], device: first partial slot of each (segment, row) pair.
    block_m:  queries per tile (power of two, >= every task's m_hi - m_lo).
    block_n:  keys per inner tile (power of two; capped by :func:`tile_config`). A task's keys run in whole
              tiles from kv_lo; only its last tile may be partial, and only that one is masked.
    host:     the same task table as Python tuples, for the CPU reference (no device sync needed).
    """

    tasks: torch.Tensor
    seg_rows: torch.Tensor
    row_slot: torch.Tensor
    block_m: int
    block_n: int
    host: tuple


def segment_attention_reference(q, seg_k, seg_v, plan: SegmentTasks, o_part, lse_part, sm_scale: float) -> None:
    """PyTorch reference of :func:`segment_attention` (same signature); accumulates in float32 or wider."""
    R, Hq, Q, D = q.shape
    Hkv = seg_k.shape[0]
    G = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    seg_rows = plan.seg_rows.long()
    row_slot = plan.row_slot.long()
    heads = torch.arange(Hkv, device=q.device)
    for kv_lo, kv_hi, rows_lo, m_lo, m_hi, chunk in plan.host:
        m = torch.arange(m_lo, m_hi, device=q.device)
        row_local, t, g = m // (Q * G), (m // G) % Q, m % G
        row = seg_rows[rows_lo + row_local]
        hq = heads[:, None] * G + g[None, :]  # [Hkv, M]
        qm = q[row[None, :], hq, t[None, :]].to(acc)  # [Hkv, M, D]
        k = seg_k[:, kv_lo:kv_hi].to(acc)
        v = seg_v[:, kv_lo:kv_hi].to(acc)
        s = torch.einsum("hmd,hnd->hmn", qm, k) * sm_scale
        lse = torch.logsumexp(s, dim=-1)  # [Hkv, M]
        o = torch.einsum("hmn,hnd->hmd", torch.exp(s - lse[..., None]), v)
        slot = row_slot[rows_lo + row_local] + chunk
        o_part[slot[None, :], t[None, :], hq] = o.to(o_part.dtype)
        lse_part[slot[None, :], t[None, :], hq] = lse.to(lse_part.dtype)


@triton.jit(do_not_specialize=["Q", "s_qr", "s_qh", "s_qt", "s_kh", "s_kn", "s_vh", "s_vn", "s_op", "s_ot", "s_oh",
                               "s_lp", "s_lt"])
def _segment_attention_kernel(
    q_ptr, k_ptr, v_ptr, tasks_ptr, seg_rows_ptr, row_slot_ptr, o_ptr, lse_ptr,
    qk_scale,  # sm_scale * log2(e)
    Q,  # query tokens per row
    s_qr, s_qh, s_qt, s_kh, s_kn, s_vh, s_vn,  # element strides // STRIDE_UNIT
    s_op, s_ot, s_oh, s_lp, s_lt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    STRIDE_UNIT: tl.constexpr, DOT_PREC: tl.constexpr, ONE_Q: tl.constexpr,
):
    """Program (task, kv head h): keys [kv_lo, kv_hi) of seg_k/v[h] against stacked queries [m_lo, m_hi)."""
    task = tasks_ptr + tl.program_id(0) * 6
    h = tl.program_id(1)
    kv_lo = tl.load(task)
    kv_hi = tl.load(task + 1)
    rows_lo = tl.load(task + 2)
    m_lo = tl.load(task + 3)
    m_hi = tl.load(task + 4)
    chunk = tl.load(task + 5)

    offs_m = m_lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m_hi
    if ONE_Q:  # decoding: one query token per row (index math on a compile-time Q)
        row_local = offs_m // G
        t = offs_m * 0
    else:
        row_local = offs_m // (Q * G)
        t = (offs_m // G) % Q
    hq = h * G + offs_m % G
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    row = tl.load(seg_rows_ptr + rows_lo + row_local, mask=mask_m, other=0)
    q_off = row.to(tl.int64) * (s_qr * STRIDE_UNIT) + hq * (s_qh * STRIDE_UNIT) + t * (s_qt * STRIDE_UNIT)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    k_base = k_ptr + h.to(tl.int64) * (s_kh * STRIDE_UNIT)
    v_base = v_ptr + h.to(tl.int64) * (s_vh * STRIDE_UNIT)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Whole key tiles without any mask, then the ragged tail (at most one tile); no causal limit here.
    n_full = kv_lo + (kv_hi - kv_lo) // BLOCK_N * BLOCK_N
    q_col = offs_m * 0 + kv_hi
    acc, m_i, l_i = attend_keys(q, k_base, v_base, s_kn * STRIDE_UNIT, s_vn * STRIDE_UNIT, kv_lo, n_full, q_col,
                                offs_d, mask_d, acc, m_i, l_i, qk_scale, BLOCK_N, False, DOT_PREC,
                                BLOCK_D == D)
    acc, m_i, l_i = attend_keys(q, k_base, v_base, s_kn * STRIDE_UNIT, s_vn * STRIDE_UNIT, n_full, kv_hi, q_col,
                                offs_d, mask_d, acc, m_i, l_i, qk_scale, BLOCK_N, True, DOT_PREC,
                                BLOCK_D == D)
    o, lse = finish_softmax(acc, m_i, l_i)

    slot = (tl.load(row_slot_ptr + rows_lo + row_local, mask=mask_m, other=0) + chunk).to(tl.int64)
    o_off = slot * (s_op * STRIDE_UNIT) + t * (s_ot * STRIDE_UNIT) + hq * (s_oh * STRIDE_UNIT)
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], o, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + slot * (s_lp * STRIDE_UNIT) + t * (s_lt * STRIDE_UNIT) + hq, lse, mask=mask_m)


_launch_segment = KernelLauncher(_segment_attention_kernel)


def tile_config(block_m: int, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a BLOCK_M x BLOCK_D query tile, chosen by the attention benchmark's
    ``--tune`` sweep (bf16, D=128): 64-query tiles at (64, 4, 3) ran the compute-bound shared segments fastest,
    ahead of 128-query tiles at (64, 8, 3); small tiles (memory-bound, few rows per segment) at (64, 4, 2)."""
    if block_d > 128:
        return 32, 8 if block_m >= 64 else 4, 2
    if block_m <= 32:
        return 64, 4, 2
    return 64, 8 if block_m >= 128 else 4, 3


def bind_segment_attention(q, seg_k, seg_v, plan: SegmentTasks, o_part, lse_part, sm_scale: float):
    """``launch(q, seg_k, seg_v)`` doing :func:`segment_attention` on tensors shaped, strided and aligned like
    these (the plan, o_part and lse_part are bound), or None when the plan has no task."""
    R, Hq, Q, D = q.shape
    Hkv = seg_k.shape[0]
    n_tasks = len(plan.host)
    if n_tasks == 0:
        return None
    strides = (*q.stride()[:3], seg_k.stride(0), seg_k.stride(1), seg_v.stride(0), seg_v.stride(1),
               *o_part.stride()[:3], *lse_part.stride()[:2])
    unit = stride_unit(*strides)
    bd = block_d(D)
    bm = max(16, plan.block_m)
    max_bn, num_warps, num_stages = tile_config(bm, bd)
    fixed = (plan.tasks, plan.seg_rows, plan.row_slot, o_part, lse_part)
    launch = _launch_segment.bind(
        (n_tasks, Hkv, 1),
        (q, seg_k, seg_v, *fixed),
        (log2_scale(sm_scale), Q, *[s // unit for s in strides]),
        dict(G=Hq // Hkv, D=D, BLOCK_M=bm, BLOCK_N=min(plan.block_n, max_bn), BLOCK_D=bd, STRIDE_UNIT=unit,
             DOT_PREC=dot_precision(q.dtype), ONE_Q=Q == 1),
        num_warps=num_warps, num_stages=num_stages,
    )
    return lambda q, k, v: launch(q, k, v, *fixed)


def segment_attention(q, seg_k, seg_v, plan: SegmentTasks, o_part, lse_part, sm_scale: float) -> None:
    """Partial attention of every task in ``plan`` (one launch, grid (n_tasks, Hkv)); see the module docstring.

    Writes o_part/lse_part at the slots the plan assigns; no host synchronisation.
    """
    launch = bind_segment_attention(q, seg_k, seg_v, plan, o_part, lse_part, sm_scale)
    if launch is not None:
        launch(q, seg_k, seg_v)
