"""Segment-forest attention of one layer: shared segments, then each row's suffix, then the merge.

Tier 2 of the package: it calls the kernel launchers (CUDA tensors) or their PyTorch references
(every other device) with the plan made once per forward pass, and knows nothing of transformers.

On CUDA the launches of a plan are bound once, at the first layer that calls with a given tensor geometry
(device, shapes, strides, dtype, 16-byte alignment), and kept on the plan: every other layer only hands its tensors
to the bound launches. With one suffix split the merge runs inside the suffix kernel (two launches per layer);
otherwise the merge kernel follows (three). The merge kernel is compiled in either case, so that a decode
whose suffix starts splitting compiles nothing. Triton compiles for and launches on the current device, so a
layer on another GPU (device_map) binds and launches under that device; a launch bound on one device and run
on another fails with "invalid resource handle".
"""

from __future__ import annotations

import torch

from .kernels import merge, segment_attention, suffix_attention
from .planner import ForestPlan


def _bind_layer(q, seg_k, seg_v, suf_k, suf_v, plan: ForestPlan, sm_scale: float, out):
    """``launch(q, seg_k, seg_v, suf_k, suf_v, out)``: every kernel of one layer for tensors like these."""
    R, Hq, Q, D = q.shape
    o_part, lse_part = plan.partial_buffers(Hq, D, q.device)
    seg = None
    if plan.segments is not None:
        seg = segment_attention.bind_segment_attention(q, seg_k, seg_v, plan.segments, o_part, lse_part, sm_scale)
    fused = plan.suffix.n_splits == 1
    suf = suffix_attention.bind_suffix_attention(q, suf_k, suf_v, plan.suffix, o_part, lse_part, plan.row_slot_off,
                                                 out, sm_scale, fused)
    mrg = merge.bind_merge_partials(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0, plan.suffix.n_splits, out)
    if seg is None:
        if fused:
            return lambda q, sk, sv, fk, fv, out: suf(q, fk, fv, out)
        return lambda q, sk, sv, fk, fv, out: (suf(q, fk, fv, out), mrg(out))
    if fused:
        return lambda q, sk, sv, fk, fv, out: (seg(q, sk, sv), suf(q, fk, fv, out))
    return lambda q, sk, sv, fk, fv, out: (seg(q, sk, sv), suf(q, fk, fv, out), mrg(out))


def forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan: ForestPlan, sm_scale: float, out=None) -> torch.Tensor:
    """Exact attention of every query over its row's ancestor segments plus its own suffix.

    q: [R, Hq, Q, D] model dtype (any strides, last dim contiguous); seg_k/seg_v: [Hkv, T, D] packed shared
    segments (T may be 0); suf_k/suf_v: [R, Hkv, C, D] suffix buffers. Returns out [R, Q, Hq, D] in q's dtype
    (the layout transformers' attention functions return). Log-sum-exps are natural-log, float32.
    """
    R, Hq, Q, D = q.shape
    if out is None:
        out = torch.empty(R, Q, Hq, D, dtype=q.dtype, device=q.device)
    if q.is_cuda and q.device.index != torch.cuda.current_device():
        # device_map leaves the current device at the first GPU (see the module docstring)
        with torch.cuda.device(q.device):
            return forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan, sm_scale, out)
    if q.is_cuda:
        tensors = (q, seg_k, seg_v, suf_k, suf_v, out)
        misaligned = (q.data_ptr() | seg_k.data_ptr() | seg_v.data_ptr() | suf_k.data_ptr() | suf_v.data_ptr()
                      | out.data_ptr()) % 16
        key = (q.device.index, sm_scale, q.dtype, q.shape, q.stride(), seg_k.shape, seg_k.stride(), seg_v.stride(),
               suf_k.shape, suf_k.stride(), suf_v.stride(), out.stride(),
               misaligned and tuple(t.data_ptr() % 16 == 0 for t in tensors))
        launch = plan.launches.get(key)
        if launch is None:
            launch = plan.launches[key] = _bind_layer(q, seg_k, seg_v, suf_k, suf_v, plan, sm_scale, out)
        launch(*tensors)
        return out
    o_part, lse_part = plan.partial_buffers(Hq, D, q.device)
    if plan.segments is not None:
        segment_attention.segment_attention_reference(q, seg_k, seg_v, plan.segments, o_part, lse_part, sm_scale)
    suffix_attention.suffix_attention_reference(q, suf_k, suf_v, plan.suffix, o_part, lse_part, sm_scale)
    merge.merge_partials_reference(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0, plan.suffix.n_splits, out)
    return out
