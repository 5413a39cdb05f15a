"""Segment-forest attention of one layer: shared segments, then each row's suffix, then the merge.

It calls the kernel launchers (CUDA tensors) with the plan made once per forward pass, and knows nothing of
transformers or of the cache. Every other device runs the same math in a few batched PyTorch ops per layer
(:func:`_forest_attention_host`: one matmul per segment task for all its rows, one for the suffixes, one
gathered log-sum-exp merge; its index tables are made at the first layer and kept on the plan); where that does
not apply (a segment task covering part of a row's queries, several suffix splits, score tensors past
``_HOST_MAX_SCORES`` elements) the kernels' PyTorch references run, which are slower (hundreds of small ops per
layer) but blocked for long prefills.

On CUDA the launches of a plan are bound once, at the first layer that calls with a given tensor geometry
(device, shapes, strides, dtype, 16-byte alignment), and kept on the plan: every other layer only hands its
tensors to the bound launches. Captured into a CUDA graph, a layer with shared segments is three launches: the
segment kernel on a side stream of the device (:func:`side_stream`) beside the suffix kernel (writing its
partials), the two becoming parallel branches that join before the merge kernel, so that the segment tasks
(tensor-core work) and the suffix programs (streaming reads) share the SMs. Launched eagerly (no capture),
where a decode step's time is the host's, a layer is the segment kernel, then the suffix kernel merging the
row's partials itself when it has one split (two launches on the current stream; with several splits the merge
kernel follows). Without shared segments the suffix kernel merges and writes the output itself (one launch)
when it has one split; otherwise the merge kernel follows. The suffix kernel's merge and the merge kernel fold
the same partials in the same order with the same arithmetic (kernels/merge.py), so eager steps and graph
replays give identical results. Triton compiles for and launches on the current device, so a layer on another
GPU (device_map) binds and launches under that device; a launch bound on one device and run on another fails
with "invalid resource handle".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import merge, segment_attention, suffix_attention
from .planner import ForestPlan


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream on which captured layers run the segment kernel (one per device, made at first use)."""
    stream = _side_streams.get(device.index)
    if stream is None:
        stream = _side_streams[device.index] = torch.cuda.Stream(device)
    return stream


_side_streams: dict[int, torch.cuda.Stream] = {}


def _bind_layer(q, seg_k, seg_v, suf_k, suf_v, plan: ForestPlan, sm_scale: float, out, new_kv):
    """``launch(q, seg_k, seg_v, suf_k, suf_v, out, new_k, new_v)``: every kernel of one layer for tensors like
    these."""
    R, Hq, Q, D = q.shape
    o_part, lse_part = plan.partial_buffers(Hq, D, q.device)
    seg = None
    if plan.segments is not None:
        seg = segment_attention.bind_segment_attention(q, seg_k, seg_v, plan.segments, o_part, lse_part, sm_scale)

    def bind_suffix(merged: bool):
        return suffix_attention.bind_suffix_attention(q, suf_k, suf_v, plan.suffix, o_part, lse_part,
                                                      plan.row_slot_off, out, sm_scale, merged, new_kv)

    # One split: the suffix kernel merges (uncaptured layers, and layers without segments); the unmerged launch
    # and the merge kernel serve captured layers with segments and split suffixes. Both suffix launches are one
    # compiled variant.
    merged = bind_suffix(True) if plan.suffix.n_splits == 1 else None
    if seg is None and merged is not None:
        return lambda q, sk, sv, fk, fv, out, nk, nv: merged(q, fk, fv, out, nk, nv)
    suf = bind_suffix(False)
    mrg = merge.bind_merge_partials(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0, plan.suffix.n_splits, out)
    if seg is None:
        return lambda q, sk, sv, fk, fv, out, nk, nv: (suf(q, fk, fv, out, nk, nv), mrg(out))
    side = side_stream(q.device)
    fork, join = torch.cuda.Event(), torch.cuda.Event()

    def launch(q, sk, sv, fk, fv, out, nk, nv):
        if not torch.cuda.is_current_stream_capturing():  # eager: one stream (see the module docstring)
            seg(q, sk, sv)
            if merged is not None:
                merged(q, fk, fv, out, nk, nv)
            else:
                suf(q, fk, fv, out, nk, nv)
                mrg(out)
            return
        main = torch.cuda.current_stream()
        fork.record(main)  # the side stream waits for q (and for the previous layer's merge of the partials)
        side.wait_event(fork)
        torch.cuda.set_stream(side)
        try:
            seg(q, sk, sv)
        finally:
            torch.cuda.set_stream(main)
        suf(q, fk, fv, out, nk, nv)
        join.record(side)
        main.wait_event(join)  # all later work on main (frees of q, k, v included) is ordered after the segments
        mrg(out)
    return launch


def forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan: ForestPlan, sm_scale: float, out=None,
                     new_kv=None) -> torch.Tensor:
    """Exact attention of every query over its row's ancestor segments plus its own suffix.

    q: [R, Hq, Q, D] model dtype (any strides, last dim contiguous); seg_k/seg_v: [Hkv, T, D] packed shared
    segments (T may be 0); suf_k/suf_v: [R, Hkv, C, D] suffix buffers. Returns out [R, Q, Hq, D] in q's dtype
    (the layout transformers' attention functions return). Log-sum-exps are natural-log, float32.
    ``new_kv``: decoding one token per row (Q = 1), its (keys, values) [R, Hkv, 1, D], which become column
    ``end - 1`` of the suffix buffers (on CUDA the suffix kernel stores them and attends to them itself).
    """
    R, Hq, Q, D = q.shape
    if out is None:
        out = torch.empty(R, Q, Hq, D, dtype=q.dtype, device=q.device)
    if q.is_cuda and q.device.index != torch.cuda.current_device():
        # device_map leaves the current device at the first GPU (see the module docstring)
        with torch.cuda.device(q.device):
            return forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan, sm_scale, out, new_kv)
    if q.is_cuda:
        new = new_kv if new_kv is not None else (q, q)
        tensors = (q, seg_k, seg_v, suf_k, suf_v, out, *new)
        misaligned = (q.data_ptr() | seg_k.data_ptr() | seg_v.data_ptr() | suf_k.data_ptr() | suf_v.data_ptr()
                      | out.data_ptr() | new[0].data_ptr() | new[1].data_ptr()) % 16
        key = (q.device.index, sm_scale, q.dtype, q.shape, q.stride(), seg_k.shape, seg_k.stride(), seg_v.stride(),
               suf_k.shape, suf_k.stride(), suf_v.stride(), out.stride(),
               new_kv is not None and (new[0].stride(), new[1].stride()),
               misaligned and tuple(t.data_ptr() % 16 == 0 for t in tensors))
        launch = plan.launches.get(key)
        if launch is None:
            launch = plan.launches[key] = _bind_layer(q, seg_k, seg_v, suf_k, suf_v, plan, sm_scale, out, new_kv)
        launch(*tensors)
        return out
    if new_kv is not None:
        suffix_attention.write_new_kv(q, suf_k, suf_v, new_kv, int(plan.suffix.end))  # host read: non-CUDA devices
    if _forest_attention_host(q, seg_k, seg_v, suf_k, suf_v, plan, sm_scale, out):
        return out
    o_part, lse_part = plan.partial_buffers(Hq, D, q.device)
    if plan.segments is not None:
        segment_attention.segment_attention_reference(q, seg_k, seg_v, plan.segments, o_part, lse_part, sm_scale)
    suffix_attention.suffix_attention_reference(q, suf_k, suf_v, plan.suffix, o_part, lse_part, sm_scale)
    merge.merge_partials_reference(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0, plan.suffix.n_splits, out)
    return out


# ---- non-CUDA devices: the same attention in a few batched PyTorch ops per layer ------------------------------
_HOST_MAX_SCORES = 1 << 24  # score elements per op above which the blocked references run instead (long prefills)


@dataclass
class HostTables:
    """What every layer of one forward pass shares on a non-CUDA device (see :func:`_host_prepare`).

    tasks: per segment task (kv_lo, kv_hi, rows int64 [r], partial slots int64 [r]);
    idx:   int64 [R, n]: each row's partial slots for the merge, padded with slot ``pad`` (kept at lse -inf);
    end, start, bias, empty: the suffix mask of the latest ``end`` and starts (see :func:`_suffix_bias`)."""

    tasks: list
    idx: torch.Tensor
    pad: int
    end: int | None = None
    start: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    empty: bool = False


def _host_prepare(q, suf_k, plan: ForestPlan) -> HostTables | None:
    """What every layer of one forward pass shares on a non-CUDA device, made at its first layer and kept on the
    plan (``plan.launches["host"]``): per segment task its rows and partial slots as index tensors, and the merge's
    gather indices. None when the fast path does not apply (a task that covers part of a row's queries, several
    suffix splits, or score tensors too large): the references run."""
    R, Hq, Q, D = q.shape
    Hkv = suf_k.shape[1]
    G = Hq // Hkv
    dev = q.device
    suf = plan.suffix
    if suf.n_splits != 1:
        return None
    tasks = []
    if plan.segments is not None:
        seg_rows = plan.segments.seg_rows.tolist()
        row_slot = plan.segments.row_slot.tolist()
        per_row = Q * G
        for kv_lo, kv_hi, rows_lo, m_lo, m_hi, chunk in plan.segments.host:
            if m_lo % per_row or m_hi % per_row or Hkv * (m_hi - m_lo) * (kv_hi - kv_lo) > _HOST_MAX_SCORES:
                return None
            lo, hi = rows_lo + m_lo // per_row, rows_lo + m_hi // per_row
            rows = torch.tensor(seg_rows[lo:hi], dtype=torch.long, device=dev)
            slots = torch.tensor([s + chunk for s in row_slot[lo:hi]], dtype=torch.long, device=dev)
            tasks.append((kv_lo, kv_hi, rows, slots))
    # Merge: each row's segment slots (row_slot_off) then its suffix slot, padded with a slot whose lse is -inf.
    bounds = plan.row_slot_off.tolist()
    slots = [list(range(bounds[r], bounds[r + 1])) + [suf.slot0 + r] for r in range(R)]
    n = max(map(len, slots))
    pad = plan.n_slots  # one extra slot past the plan's, kept at lse -inf
    idx = torch.tensor([s + [pad] * (n - len(s)) for s in slots], dtype=torch.long, device=dev)
    return HostTables(tasks, idx, pad)


def _suffix_bias(prep: HostTables, plan: ForestPlan, R: int, Q: int, end: int, dtype) -> tuple[torch.Tensor, bool]:
    """The suffix mask as an additive bias [R, 1, 1, Q, end] (query t of row r sits at column end - Q + t and sees
    columns [start[r], end - Q + t]) and whether some query sees no column. Remade when ``end`` or the starts
    change: a plan of the static decode loop serves several steps, each one column further, and moves the starts
    of finished rows in place (PrefixSharingCache.retire_rows)."""
    start = plan.suffix.start
    if prep.end != end or not torch.equal(prep.start, start):
        dev = start.device
        cols = torch.arange(end, device=dev)
        qcol = end - Q + torch.arange(Q, device=dev)
        prep.start = start.clone()
        start = start.long()
        visible = (cols[None, None, :] >= start[:, None, None]) & (cols[None, None, :] <= qcol[None, :, None])
        bias = torch.zeros(R, 1, 1, Q, end, dtype=dtype, device=dev)
        bias.masked_fill_(~visible[:, None, None], float("-inf"))
        prep.end, prep.bias, prep.empty = end, bias, bool((~visible).all(-1).any())
    return prep.bias, prep.empty


def _softmax_times(s: torch.Tensor, v: torch.Tensor, mm, masked_rows: bool = False):
    """(softmax(s) @ v, logsumexp(s) with a trailing 1) with one exp pass; ``s`` is overwritten. Rows of ``s``
    that are all -inf (``masked_rows``) give zeros and -inf."""
    m = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m).exp_()
    if masked_rows:
        p = p.nan_to_num_(0.0)
    den = p.sum(dim=-1, keepdim=True)
    o = mm(p, v).div_(den)
    if masked_rows:
        o = o.nan_to_num_(0.0)
    return o, den.log_().add_(m)


def _forest_attention_host(q, seg_k, seg_v, suf_k, suf_v, plan: ForestPlan, sm_scale: float, out) -> bool:
    """forest_attention on a non-CUDA device in batched ops (same math as the references: float32 or wider
    partials, log-sum-exp merge). Returns False, having done nothing, where it does not apply."""
    prep = plan.launches.get("host", False)
    if prep is False:
        prep = plan.launches["host"] = _host_prepare(q, suf_k, plan)
    R, Hq, Q, D = q.shape
    end = int(plan.suffix.end)  # host read: non-CUDA devices only
    if prep is None or end == 0 or R * Hq * Q * end > _HOST_MAX_SCORES:
        return False
    Hkv = suf_k.shape[1]
    G = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    bias, empty_rows = _suffix_bias(prep, plan, R, Q, end, acc)
    pad, idx = prep.pad, prep.idx
    # Partials [P + 1, Q, Hq, (D)]: the plan's slots, plus the padding slot.
    o_part = torch.empty(pad + 1, Q, Hq, D, dtype=acc, device=q.device)
    lse_part = torch.empty(pad + 1, Q, Hq, dtype=acc, device=q.device)
    lse_part[pad] = float("-inf")
    o_part[pad] = 0
    qa = q.to(acc)
    for kv_lo, kv_hi, rows, slots in prep.tasks:
        r = rows.numel()
        # Queries of the task's rows stacked per KV head: [Hkv, r * G * Q, D] (order r, g, t).
        qs = qa.index_select(0, rows).reshape(r, Hkv, G * Q, D).transpose(0, 1).reshape(Hkv, r * G * Q, D)
        s = torch.bmm(qs, seg_k[:, kv_lo:kv_hi].to(acc).transpose(1, 2)).mul_(sm_scale)  # [Hkv, M, n]
        o, lse = _softmax_times(s, seg_v[:, kv_lo:kv_hi].to(acc), torch.bmm)  # [Hkv, M, D], [Hkv, M, 1]
        o_part.index_copy_(0, slots, o.view(Hkv, r, G, Q, D).permute(1, 3, 0, 2, 4).reshape(r, Q, Hq, D))
        lse_part.index_copy_(0, slots, lse.view(Hkv, r, G, Q).permute(1, 3, 0, 2).reshape(r, Q, Hq))
    # Suffix: scores [R, Hkv, G * Q, n] against each row's own columns [0, end), masked by the bias.
    s = torch.matmul(qa.reshape(R, Hkv, G * Q, D), suf_k[:, :, :end].to(acc).transpose(-1, -2)).mul_(sm_scale)
    s = s.view(R, Hkv, G, Q, end).add_(bias).view(R, Hkv, G * Q, end)
    o, lse = _softmax_times(s, suf_v[:, :, :end].to(acc), torch.matmul, empty_rows)  # [R, Hkv, G * Q, D]
    slot0 = plan.suffix.slot0
    o_part[slot0 : slot0 + R] = o.reshape(R, Hq, Q, D).transpose(1, 2)
    lse_part[slot0 : slot0 + R] = lse.reshape(R, Hq, Q).transpose(1, 2)
    # Merge: out = sum_j exp(lse_j - logsumexp_j lse_j) * o_j over each row's slots; all -inf gives zeros.
    lse_g = lse_part[idx]  # [R, n, Q, Hq]
    total = torch.logsumexp(lse_g, dim=1, keepdim=True)
    w = (lse_g - total).exp_().nan_to_num_(0.0)
    out.copy_((w[..., None] * o_part[idx]).sum(1))
    return True
