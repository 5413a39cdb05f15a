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

``end`` is read from device memory (int32 [1]), so one bound launch (or one captured CUDA graph) serves every
``end`` up to ``n_splits * split_len``: splits past ``end`` find no keys and write o = 0, lse = -inf. A row
whose ``start`` is at or past ``end`` (a finished row, see graphs.py) costs no key loads.

``new_kv`` (decoding one token per row, Q = 1): the token's keys and values, each [R, Hkv, 1, D] in the model
dtype (any strides, last dim contiguous), are written at column ``end - 1`` of suf_k/suf_v by the program whose
split holds that column, which attends to them from registers (no program reads that column in this launch).
That saves the cache's own write (two launches per layer).

With one split, :func:`suffix_attention_merged` also does the merge (see merge.py) in the same program: it
folds the row's segment partials (slots [row_slot_off[r], row_slot_off[r + 1]), written by an earlier
launch) into its own result and writes out [R, Q, Hq, D] (model dtype, any strides, last dim contiguous),
saving the merge launch and the suffix partials' round trip; its output is bitwise that of the merge kernel
over the same partials (same order, same arithmetic). Both launchers run the same compiled variant (the merge
is a runtime switch), so a decode that starts or stops splitting compiles nothing new. flashforge_hf/forest_attention.py uses it for
one-split layers, except in a CUDA graph with shared segments: there the segment kernel runs beside this one
without the merge, and the merge kernel follows.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (KernelLauncher, attend_keys, block_d, dot_precision, finish_softmax, log2_scale, merge_result,
                      merge_slot, merge_step, stride_unit)
from .merge import merge_partials_reference


class SuffixTasks(NamedTuple):
    """start: int32 [R] device; end: int32 [1] device (at most n_splits * split_len); slot0, split_len, n_splits:
    Python ints (runtime values, never specialised)."""

    start: torch.Tensor
    slot0: int
    end: torch.Tensor
    split_len: int
    n_splits: int


def check_new_kv(q, suf_k, new_kv) -> None:
    """Raise ValueError unless ``q`` has one query token per row and ``new_kv`` is (keys, values), each
    [R, Hkv, 1, D] like ``suf_k``'s rows."""
    if q.shape[2] != 1:
        raise ValueError(f"new_kv is for decoding one token per row, but q has {q.shape[2]} query tokens per row")
    k, v = new_kv
    R, Hkv, _, D = suf_k.shape
    if k.shape != (R, Hkv, 1, D) or v.shape != k.shape or k.dtype != suf_k.dtype or v.dtype != suf_k.dtype:
        raise ValueError(f"new_kv must be two {[R, Hkv, 1, D]} tensors of {suf_k.dtype} (one decoded token per row), "
                         f"got {list(k.shape)} ({k.dtype}) and {list(v.shape)} ({v.dtype}).")


def write_new_kv(q, suf_k, suf_v, new_kv, end: int) -> None:
    """Store ``new_kv`` at column ``end - 1`` of the suffix buffers (what the kernels do with ``new_kv``), after
    :func:`check_new_kv`."""
    check_new_kv(q, suf_k, new_kv)
    suf_k[:, :, end - 1] = new_kv[0][:, :, 0]
    suf_v[:, :, end - 1] = new_kv[1][:, :, 0]


def suffix_attention_reference(q, suf_k, suf_v, plan: SuffixTasks, o_part, lse_part, sm_scale: float,
                               new_kv=None) -> None:
    """PyTorch reference of :func:`suffix_attention` (same signature); accumulates in float32 or wider.

    Query tokens go in blocks that keep each block's score tensor near 64 Mi elements, so that a long prefill
    (a document of tens of thousands of tokens on the CPU path) never materialises a Q x Q score matrix."""
    R, Hq, Q, D = q.shape
    Hkv = suf_k.shape[1]
    G = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    end = int(plan.end)  # a host read: the reference is for the CPU path and tests
    if new_kv is not None:
        write_new_kv(q, suf_k, suf_v, new_kv, end)
    qg = q.to(acc).reshape(R, Hkv, G, Q, D)
    cols = torch.arange(end, device=q.device)
    start = plan.start.long()[:, None, None]
    slot = plan.slot0 + torch.arange(R, device=q.device)
    block = max(1, (1 << 26) // max(1, R * Hq * min(end, plan.split_len)))
    for j in range(plan.n_splits):
        lo, hi = j * plan.split_len, min((j + 1) * plan.split_len, end)
        k = suf_k[:, :, lo:hi].to(acc)
        v = suf_v[:, :, lo:hi].to(acc)
        for t0 in range(0, Q, block):
            t1 = min(Q, t0 + block)
            qcol = end - Q + torch.arange(t0, t1, device=q.device)
            visible = (cols[None, None, lo:hi] >= start) & (cols[None, None, lo:hi] <= qcol[None, :, None])
            s = torch.einsum("rhgqd,rhnd->rhgqn", qg[:, :, :, t0:t1], k) * sm_scale
            s = s.masked_fill(~visible[:, None, None], float("-inf"))
            lse = torch.logsumexp(s, dim=-1)  # [R, Hkv, G, t1 - t0]
            p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no visible key: all zeros
            o = torch.einsum("rhgqn,rhnd->rhgqd", p, v)
            o_part[slot + j * R, t0:t1] = o.reshape(R, Hq, t1 - t0, D).transpose(1, 2).to(o_part.dtype)
            lse_part[slot + j * R, t0:t1] = lse.reshape(R, Hq, t1 - t0).transpose(1, 2).to(lse_part.dtype)


def suffix_attention_merged_reference(q, suf_k, suf_v, plan: SuffixTasks, o_part, lse_part, row_slot_off, out,
                                      sm_scale: float, new_kv=None) -> None:
    """PyTorch reference of :func:`suffix_attention_merged` (same signature): the suffix reference, then the
    merge reference. Also writes the suffix partials, which the kernel skips."""
    if plan.n_splits != 1:
        raise ValueError(f"suffix_attention_merged needs one suffix split, got {plan.n_splits}")
    suffix_attention_reference(q, suf_k, suf_v, plan, o_part, lse_part, sm_scale, new_kv)
    merge_partials_reference(o_part, lse_part, row_slot_off, plan.slot0, 1, out)


@triton.jit(do_not_specialize=["R", "Q", "split_len", "slot0", "q_tiles", "merge", "append", "s_qr", "s_qh", "s_qt",
                               "s_kr", "s_kh", "s_kn", "s_vr", "s_vh", "s_vn", "s_nr", "s_nh", "s_mr", "s_mh", "s_op",
                               "s_ot", "s_oh", "s_lp", "s_lt", "s_xr", "s_xt", "s_xh"])
def _suffix_attention_kernel(
    q_ptr, k_ptr, v_ptr, kn_ptr, vn_ptr, start_ptr, end_ptr, off_ptr, out_ptr, o_ptr, lse_ptr,
    qk_scale,  # sm_scale * log2(e)
    R, Q, split_len, slot0, q_tiles,
    merge,  # 1: merge with the row's segment partials and write out (one split only); 0: write the partial
    append,  # 1: the decoded token's K/V (kn, vn: [R, Hkv, 1, D]) are column end - 1: written there (Q = 1 only)
    s_qr, s_qh, s_qt, s_kr, s_kh, s_kn, s_vr, s_vh, s_vn,  # element strides // STRIDE_UNIT
    s_nr, s_nh, s_mr, s_mh,  # (n: new keys, m: new values)
    s_op, s_ot, s_oh, s_lp, s_lt, s_xr, s_xt, s_xh,  # (x: out)
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
    end = tl.load(end_ptr)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < QG
    t = offs_m // G
    hq = h * G + offs_m % G
    q_col = end - Q + t  # the column of query token t; it sees columns <= q_col
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    r64 = r.to(tl.int64)
    q_off = r64 * (s_qr * STRIDE_UNIT) + hq * (s_qh * STRIDE_UNIT) + t * (s_qt * STRIDE_UNIT)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=mask_md, other=0.0)

    lo = tl.maximum(j * split_len, tl.load(start_ptr + r))
    first_t = tile * BLOCK_M // G
    last_t = (tl.minimum((tile + 1) * BLOCK_M, QG) - 1) // G
    # Columns read from memory; with append the last one (end - 1) comes from registers, below.
    hi = tl.minimum(tl.minimum((j + 1) * split_len, end - append), end - Q + last_t + 1)
    # Columns every query of the tile sees: whole tiles of them go without masks, the rest is masked.
    n_full = tl.maximum(lo, tl.minimum(hi, end - Q + first_t + 1))
    n_full = lo + (n_full - lo) // BLOCK_N * BLOCK_N
    k_base = k_ptr + r64 * (s_kr * STRIDE_UNIT) + h * (s_kh * STRIDE_UNIT)
    v_base = v_ptr + r64 * (s_vr * STRIDE_UNIT) + h * (s_vh * STRIDE_UNIT)
    # append: the split holding the new column end - 1 loads the token now (its latency hidden behind the key
    # loop), stores it there (nothing in this launch reads that column) and attends to it after the loop.
    new_here = (j == (end - 1) // split_len) & (append != 0)
    new_mask = mask_d & ((offs_d * 0 + new_here) != 0)  # a tensor mask (what the interpreter needs)
    kn = tl.load(kn_ptr + r64 * (s_nr * STRIDE_UNIT) + h * (s_nh * STRIDE_UNIT) + offs_d, mask=new_mask, other=0.0)
    vn = tl.load(vn_ptr + r64 * (s_mr * STRIDE_UNIT) + h * (s_mh * STRIDE_UNIT) + offs_d, mask=new_mask, other=0.0)
    tl.store(k_base + (end - 1) * (s_kn * STRIDE_UNIT) + offs_d, kn, mask=new_mask)
    tl.store(v_base + (end - 1) * (s_vn * STRIDE_UNIT) + offs_d, vn, mask=new_mask)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_keys(q, k_base, v_base, s_kn * STRIDE_UNIT, s_vn * STRIDE_UNIT, lo, n_full, q_col,
                                offs_d, mask_d, acc, m_i, l_i, qk_scale, BLOCK_N, False, DOT_PREC,
                                BLOCK_D == D)
    acc, m_i, l_i = attend_keys(q, k_base, v_base, s_kn * STRIDE_UNIT, s_vn * STRIDE_UNIT, n_full, hi, q_col,
                                offs_d, mask_d, acc, m_i, l_i, qk_scale, BLOCK_N, True, DOT_PREC,
                                BLOCK_D == D)
    if new_here:
        if lo < end:  # the row sees the new column (a finished row's start is past the end)
            s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, s_new)  # an online-softmax step over one key (s_new is finite)
            alpha = tl.math.exp2(m_i - m_new)
            p_new = tl.math.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new.to(kn.dtype).to(tl.float32)[:, None] * vn.to(tl.float32)[None, :]
            m_i = m_new
    o, lse = finish_softmax(acc, m_i, l_i)

    o_in = t * (s_ot * STRIDE_UNIT) + hq * (s_oh * STRIDE_UNIT)  # offsets inside one partial slot
    lse_in = t * (s_lt * STRIDE_UNIT) + hq
    o_op = s_op.to(tl.int64) * STRIDE_UNIT
    l_op = s_lp.to(tl.int64) * STRIDE_UNIT
    if merge != 0:
        # This result first, then the row's segment partials, each folded by merge_step from the empty state: the
        # merge kernel's order and arithmetic (merge.py), so that both give the same bits.
        acc, m_i, den = merge_step(o, lse, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                                   tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
                                   tl.zeros([BLOCK_M], dtype=tl.float32))
        for p in range(tl.load(off_ptr + r), tl.load(off_ptr + r + 1)):
            acc, m_i, den = merge_slot(o_ptr + p * o_op, lse_ptr + p * l_op, o_in[:, None] + offs_d[None, :],
                                       lse_in, mask_m, mask_md, acc, m_i, den)
        res = merge_result(acc, den)
        x_off = r64 * (s_xr * STRIDE_UNIT) + t * (s_xt * STRIDE_UNIT) + hq * (s_xh * STRIDE_UNIT)
        tl.store(out_ptr + x_off[:, None] + offs_d[None, :], res.to(out_ptr.dtype.element_ty), mask=mask_md)
    else:
        slot = slot0 + j * R + r
        tl.store(o_ptr + slot * o_op + o_in[:, None] + offs_d[None, :], o, mask=mask_md)
        tl.store(lse_ptr + slot * l_op + lse_in, lse, mask=mask_m)


_launch_suffix = KernelLauncher(_suffix_attention_kernel)


def tile_config(block_m: int, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a BLOCK_M x BLOCK_D query tile. Decode tiles (BLOCK_M <= 32): 32-key
    tiles, 4 warps, 2 stages, whose shared memory (about 21 KB at D=128; 37 KB with 3 stages) leaves room for a
    segment task on the same SM (captured layers run the segment kernel beside this one, see
    flashforge_hf/forest_attention.py), which ran faster per layer than 3 stages. Prefill tiles keep
    (64, 4 or 8, 3)."""
    if block_d > 128:
        return 32, 8 if block_m >= 64 else 4, 2
    if block_m <= 32:
        return 32, 4, 2
    return 64, 8 if block_m >= 128 else 4, 3


def bind_suffix_attention(q, suf_k, suf_v, plan: SuffixTasks, o_part, lse_part, row_slot_off, out, sm_scale: float,
                          merge: bool, new_kv=None):
    """``launch(q, suf_k, suf_v, out, new_k, new_v)`` doing :func:`suffix_attention_merged` (merge=True; needs one
    split) or :func:`suffix_attention` (merge=False: ``out`` only fixes the variant and is not written) on tensors
    shaped, strided and aligned like these; the plan, partial buffers and row_slot_off are bound. With ``new_kv``
    (keys, values [R, Hkv, 1, D]; Q must be 1) the launch also writes the new token (see the module docstring);
    without, ``new_k``/``new_v`` are ignored (pass anything)."""
    R, Hq, Q, D = q.shape
    Hkv = suf_k.shape[1]
    G = Hq // Hkv
    if merge and plan.n_splits != 1:
        raise ValueError(f"the suffix kernel merges only with one suffix split, got {plan.n_splits}")
    if new_kv is not None:
        check_new_kv(q, suf_k, new_kv)
    bd = block_d(D)
    bm = min(max(16, triton.next_power_of_2(Q * G)), 64 if bd > 128 else 128)
    bn, num_warps, num_stages = tile_config(bm, bd)
    q_tiles = triton.cdiv(Q * G, bm)
    new_k, new_v = new_kv if new_kv is not None else (q, q)
    strides = (*q.stride()[:3], *suf_k.stride()[:3], *suf_v.stride()[:3],
               *(new_k.stride()[:2] + new_v.stride()[:2] if new_kv is not None else (0, 0, 0, 0)),
               *o_part.stride()[:3], *lse_part.stride()[:2], *(out.stride()[:3] if merge else (0, 0, 0)))
    unit = stride_unit(*strides)
    fixed = (plan.start, plan.end, row_slot_off, out, o_part, lse_part)
    launch = _launch_suffix.bind(
        (R * q_tiles, Hkv, plan.n_splits),
        (q, suf_k, suf_v, new_k, new_v, *fixed),
        (log2_scale(sm_scale), R, Q, plan.split_len, plan.slot0, q_tiles, int(merge), int(new_kv is not None),
         *[s // unit for s in strides]),
        dict(G=G, D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, STRIDE_UNIT=unit, DOT_PREC=dot_precision(q.dtype)),
        num_warps=num_warps, num_stages=num_stages,
    )
    start, end, off = plan.start, plan.end, row_slot_off
    return lambda q, k, v, out, nk, nv: launch(q, k, v, nk, nv, start, end, off, out, o_part, lse_part)


def suffix_attention(q, suf_k, suf_v, plan: SuffixTasks, o_part, lse_part, sm_scale: float, new_kv=None) -> None:
    """Split attention over each row's suffix (one launch, grid (R * query tiles, Hkv, n_splits)); see the
    module docstring. Writes every suffix slot (o = 0, lse = -inf where a query sees no key), and ``new_kv``
    into the suffix buffers when given; no host sync."""
    out = q.new_empty(0)  # not written; any tensor of the model dtype keeps the variant of the merged launcher
    _launch(q, suf_k, suf_v, plan, o_part, lse_part, plan.start, out, sm_scale, False, new_kv)


def suffix_attention_merged(q, suf_k, suf_v, plan: SuffixTasks, o_part, lse_part, row_slot_off, out,
                            sm_scale: float, new_kv=None) -> None:
    """One-split suffix attention merged with each row's segment partials into ``out`` (one launch, grid
    (R * query tiles, Hkv)); row_slot_off as in merge.py. Reads o_part/lse_part's segment slots (written
    before this launch), writes every element of out (and ``new_kv`` into the suffix buffers when given), leaves
    the suffix slots alone; no host sync."""
    _launch(q, suf_k, suf_v, plan, o_part, lse_part, row_slot_off, out, sm_scale, True, new_kv)


def _launch(q, suf_k, suf_v, plan, o_part, lse_part, row_slot_off, out, sm_scale, merge, new_kv):
    nk, nv = new_kv if new_kv is not None else (q, q)
    bind_suffix_attention(q, suf_k, suf_v, plan, o_part, lse_part, row_slot_off, out, sm_scale, merge,
                          new_kv)(q, suf_k, suf_v, out, nk, nv)
