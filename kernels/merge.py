"""Merge: combine every partial result of each query by log-sum-exp into the final attention output.

Tensors (R rows, Q query tokens, Hq query heads, D head dim, P partial slots):
    o_part        [P, Q, Hq, D]  float32: partial outputs, each normalised within its own key range.
    lse_part      [P, Q, Hq]     float32: natural-log log-sum-exp of each partial; -inf when it saw no key.
    row_slot_off  [R + 1]        int32, device: row r owns slots [row_slot_off[r], row_slot_off[r + 1])
                                 (its shared-segment partials) and slots suffix_slot0 + j * R + r for
                                 j < n_suffix (its suffix splits); suffix_slot0 and n_suffix are Python ints.
    out           [R, Q, Hq, D]  model dtype, any strides (last dim contiguous): written in full.

out = sum_j exp(lse_j - M) o_j / sum_j exp(lse_j - M) with M = max_j lse_j, in float32; a query whose
partials are all -inf gets 0 (never NaN). The kernel folds a row's suffix splits first, then its segment
partials, each with _common.merge_step from the empty state, then _common.merge_result: with one suffix split,
the order and arithmetic of suffix_attention_merged's epilogue, so both give bitwise-identical outputs
(flashforge_hf/forest_attention.py runs the one in eager layers and the other in captured ones).
"""

import torch
import triton
import triton.language as tl

from ._common import KernelLauncher, block_d, merge_result, merge_slot, stride_unit


def merge_partials_reference(o_part, lse_part, row_slot_off, suffix_slot0: int, n_suffix: int, out) -> None:
    """PyTorch reference of :func:`merge_partials` (same signature), all rows at once."""
    bounds = row_slot_off.tolist()
    R = out.shape[0]
    slots = [list(range(bounds[r], bounds[r + 1])) + [suffix_slot0 + j * R + r for j in range(n_suffix)] for r in range(R)]
    n = max(map(len, slots))
    idx = torch.tensor([s + [0] * (n - len(s)) for s in slots], device=o_part.device)  # [R, n], padded with slot 0
    valid = torch.tensor([[j < len(s) for j in range(n)] for s in slots], device=o_part.device)
    lse = torch.where(valid[:, :, None, None], lse_part[idx], float("-inf"))  # [R, n, Q, Hq]
    m = lse.max(dim=1, keepdim=True).values
    w = torch.exp(lse - torch.where(torch.isfinite(m), m, 0.0))  # exp(-inf) = 0 for empty or padded partials
    den = w.sum(dim=1)
    num = torch.where(w[..., None] > 0, w[..., None] * o_part[idx], 0.0).sum(dim=1)  # padding never reads as NaN
    out.copy_(torch.where(den[..., None] > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None], 0.0))


@triton.jit(do_not_specialize=["R", "Q", "Hq", "slot0", "n_suffix", "s_op", "s_ot", "s_oh", "s_lp", "s_lt", "s_xr",
                               "s_xt", "s_xh"])
def _merge_kernel(
    o_ptr, lse_ptr, off_ptr, out_ptr, R, Q, Hq, slot0, n_suffix,
    s_op, s_ot, s_oh, s_lp, s_lt, s_xr, s_xt, s_xh,  # element strides // STRIDE_UNIT (x: out)
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):
    """Program (row r * Q + token t, head block): LSE-merge of the row's segment and suffix slots."""
    r = tl.program_id(0) // Q
    t = tl.program_id(0) % Q
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < Hq
    mask_hd = mask_h[:, None] & (offs_d < D)[None, :]
    o_op = s_op.to(tl.int64) * STRIDE_UNIT
    l_op = s_lp.to(tl.int64) * STRIDE_UNIT
    o_off = t * (s_ot * STRIDE_UNIT) + offs_h[:, None] * (s_oh * STRIDE_UNIT) + offs_d[None, :]
    lse_off = t * (s_lt * STRIDE_UNIT) + offs_h

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_H], dtype=tl.float32)
    # Suffix splits first, then segment partials: suffix_attention_merged's order (see the module docstring).
    for j in range(0, n_suffix):
        p = slot0 + j * R + r
        acc, m_i, den = merge_slot(o_ptr + p * o_op, lse_ptr + p * l_op, o_off, lse_off, mask_h, mask_hd,
                                    acc, m_i, den)
    for p in range(tl.load(off_ptr + r), tl.load(off_ptr + r + 1)):
        acc, m_i, den = merge_slot(o_ptr + p * o_op, lse_ptr + p * l_op, o_off, lse_off, mask_h, mask_hd,
                                    acc, m_i, den)
    res = merge_result(acc, den)
    x_off = r.to(tl.int64) * (s_xr * STRIDE_UNIT) + t * (s_xt * STRIDE_UNIT) + offs_h[:, None] * (s_xh * STRIDE_UNIT)
    tl.store(out_ptr + x_off + offs_d[None, :], res.to(out_ptr.dtype.element_ty), mask=mask_hd)


_launch_merge = KernelLauncher(_merge_kernel)


def bind_merge_partials(o_part, lse_part, row_slot_off, suffix_slot0: int, n_suffix: int, out):
    """``launch(out)`` doing :func:`merge_partials` into tensors shaped, strided and aligned like ``out`` (the
    partials and slot tables are bound); compiles the variant now."""
    R, Q, Hq, D = out.shape
    bd = block_d(D)
    # Blocks of 8 query heads with 4 warps; 2 heads with 1 warp where that leaves fewer than 256 programs (few
    # rows): more programs in flight than one block of all heads per row, which is what the merge's latency needs.
    bh, num_warps = min(8, triton.next_power_of_2(Hq)), 4
    if R * Q * triton.cdiv(Hq, bh) < 256:
        bh, num_warps = min(2, bh), 1
    strides = (*o_part.stride()[:3], *lse_part.stride()[:2], *out.stride()[:3])
    unit = stride_unit(*strides)
    launch = _launch_merge.bind(
        (R * Q, triton.cdiv(Hq, bh), 1),
        (o_part, lse_part, row_slot_off, out),
        (R, Q, Hq, suffix_slot0, n_suffix, *[s // unit for s in strides]),
        dict(D=D, BLOCK_H=bh, BLOCK_D=bd, STRIDE_UNIT=unit),
        num_warps=num_warps,
    )
    return lambda out: launch(o_part, lse_part, row_slot_off, out)


def merge_partials(o_part, lse_part, row_slot_off, suffix_slot0: int, n_suffix: int, out) -> None:
    """LSE-merge of every row's partials into ``out`` (one launch, grid (R * Q, head blocks)); see the module
    docstring. No host synchronisation."""
    bind_merge_partials(o_part, lse_part, row_slot_off, suffix_slot0, n_suffix, out)(out)
