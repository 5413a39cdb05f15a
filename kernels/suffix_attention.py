"""Suffix attention: each row's own KV (ragged, possibly empty), flash-decoding style with splits.

Tensors (R rows, Q query tokens per row, Hq = Hkv * G query heads, D head dim, C buffer columns):
    q          [R, Hq, Q, D]   model dtype, any strides (last dim contiguous).
    suf_k/v    [R, Hkv, C, D]  model dtype, any strides (last dim contiguous): each row's suffix buffer.
    o_part     [P, Q, Hq, D]   float32: partial outputs, normalised within their split.
    lse_part   [P, Q, Hq]      float32: natural-log log-sum-exp of scaled scores; -inf for no keys.

Row r's valid columns are [start[r], end). Query token t of every row sits at column end - Q + t and sees
columns start[r] .. end - Q + t (causal among the new tokens; a query left of start[r], i.e. left padding,
sees nothing here). Split j covers columns [j * split_len, (j + 1) * split_len) and writes partial slot
slot0 + j * R + r (the suffix slots follow the segment slots, so the segment part of a plan stays valid
while decoding changes the number of splits).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import LOG2E, KernelLauncher, block_d, dot_precision, finish_softmax, online_softmax_step, stride_unit


class SuffixTasks(NamedTuple):
    """start: int32 [R] device; slot0, end, split_len, n_splits: Python ints (runtime values, never specialised)."""

    start: torch.Tensor
    slot0: int
    end: int
    split_len: int
    n_splits: int


def suffix_attention_reference(q, suf_k, suf_v, plan: SuffixTasks, o_part, lse_part, sm_scale: float) -> None:
    """PyTorch reference of :func:`suffix_attention` (same signature); accumulates in float32 or wider."""
    R, Hq, Q, D = q.shape
    Hkv = suf_k.shape[1]
    G = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    end = plan.end
    qg = q.to(acc).reshape(R, Hkv, G, Q, D)
    cols = torch.arange(end, device=q.device)
    qcol = end - Q + torch.arange(Q, device=q.device)
    visible = (cols[None, None, :] >= plan.start.long()[:, None, None]) & (cols[None, None, :] <= qcol[None, :, None])
    for j in range(plan.n_splits):
        lo, hi = j * plan.split_len, min((j + 1) * plan.split_len, end)
        k = suf_k[:, :, lo:hi].to(acc)
        v = suf_v[:, :, lo:hi].to(acc)
        s = torch.einsum("rhgqd,rhnd->rhgqn", qg, k) * sm_scale
        s = s.masked_fill(~visible[:, None, None, :, lo:hi], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [R, Hkv, G, Q]
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no visible key: all zeros
        o = torch.einsum("rhgqn,rhnd->rhgqd", p, v)
        slot = plan.slot0 + j * R + torch.arange(R, device=q.device)
        o_part[slot] = o.reshape(R, Hq, Q, D).transpose(1, 2).to(o_part.dtype)
        lse_part[slot] = lse.reshape(R, Hq, Q).transpose(1, 2).to(lse_part.dtype)


@triton.jit(do_not_specialize=["R", "Q", "end", "split_len", "slot0", "q_tiles", "s_qr", "s_qh", "s_qt", "s_kr",
                               "s_kh", "s_kn", "s_vr", "s_vh", "s_vn", "s_op", "s_ot", "s_oh", "s_lp", "s_lt"])
def _suffix_attention_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, o_ptr, lse_ptr,
    qk_scale,  # sm_scale * log2(e)
    R, Q, end, split_len, slot0, q_tiles,
    s_qr, s_qh, s_qt, s_kr, s_kh, s_kn, s_vr, s_vh, s_vn,  # element strides // STRIDE_UNIT
    s_op, s_ot, s_oh, s_lp, s_lt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    STRIDE_UNIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (row r, query tile, kv head h, split j): stacked queries m = t * G + g of the tile against
    columns [max(j * split_len, start[r]), min((j + 1) * split_len, end)), causal per query token."""
    r = tl.program_id(0) // q_tiles
    tile = tl.program_id(0) % q_tiles
    h = tl.program_id(1)
    j = tl.program_id(2)
    QG = Q * G
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < QG
    t = offs_m // G
    hq = h * G + offs_m % G
    q_col = end - Q + t  # the column of query token t; it sees columns <= q_col
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    r64 = r.to(tl.int64)
    q_off = r64 * (s_qr * STRIDE_UNIT) + hq * (s_qh * STRIDE_UNIT) + t * (s_qt * STRIDE_UNIT)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    lo = tl.maximum(j * split_len, tl.load(start_ptr + r))
    last_t = (tl.minimum((tile + 1) * BLOCK_M, QG) - 1) // G
    hi = tl.minimum(tl.minimum((j + 1) * split_len, end), end - Q + last_t + 1)
    k_base = k_ptr + r64 * (s_kr * STRIDE_UNIT) + h * (s_kh * STRIDE_UNIT)
    v_base = v_ptr + r64 * (s_vr * STRIDE_UNIT) + h * (s_vh * STRIDE_UNIT)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * (s_kn * STRIDE_UNIT) + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * (s_vn * STRIDE_UNIT) + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(mask_n[None, :] & (offs_n[None, :] <= q_col[:, None]), s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, v, acc, m_i, l_i, DOT_PREC)
    o, lse = finish_softmax(acc, m_i, l_i)

    slot = (slot0 + j * R + r).to(tl.int64)
    o_off = slot * (s_op * STRIDE_UNIT) + t * (s_ot * STRIDE_UNIT) + hq * (s_oh * STRIDE_UNIT)
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], o, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + slot * (s_lp * STRIDE_UNIT) + t * (s_lt * STRIDE_UNIT) + hq, lse, mask=mask_m)


_launch_suffix = KernelLauncher(_suffix_attention_kernel)


def suffix_attention(q, suf_k, suf_v, plan: SuffixTasks, o_part, lse_part, sm_scale: float) -> None:
    """Split attention over each row's suffix (one launch, grid (R * query tiles, Hkv, n_splits)); see the
    module docstring. Writes every suffix slot (o = 0, lse = -inf where a query sees no key); no host sync."""
    R, Hq, Q, D = q.shape
    Hkv = suf_k.shape[1]
    G = Hq // Hkv
    bd = block_d(D)
    bm = min(max(16, triton.next_power_of_2(Q * G)), 64 if bd > 128 else 128)
    bn = 64 if bd <= 128 else 32
    q_tiles = triton.cdiv(Q * G, bm)
    strides = (*q.stride()[:3], *suf_k.stride()[:3], *suf_v.stride()[:3], *o_part.stride()[:3],
               *lse_part.stride()[:2])
    unit = stride_unit(*strides)
    _launch_suffix(
        (R * q_tiles, Hkv, plan.n_splits),
        (q, suf_k, suf_v, plan.start, o_part, lse_part),
        (sm_scale * LOG2E, R, Q, plan.end, plan.split_len, plan.slot0, q_tiles, *[s // unit for s in strides]),
        dict(G=G, D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, STRIDE_UNIT=unit, DOT_PREC=dot_precision(q.dtype)),
        num_warps=8 if bm * bd >= 128 * 128 else 4, num_stages=2 if bd >= 256 else 3,
    )
