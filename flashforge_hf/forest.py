"""Segment-forest attention of one layer: shared segments, then each row's suffix, then the merge.

Tier 2 of the package: it calls the kernel launchers (CUDA tensors) or their PyTorch references
(every other device) with the plan made once per forward pass, and knows nothing of transformers.
"""

from __future__ import annotations

import torch

from .kernels import merge, segment_attention, suffix_attention
from .planner import ForestPlan


def forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan: ForestPlan, sm_scale: float, out=None) -> torch.Tensor:
    """Exact attention of every query over its row's ancestor segments plus its own suffix.

    q: [R, Hq, Q, D] model dtype (any strides, last dim contiguous); seg_k/seg_v: [Hkv, T, D] packed shared
    segments (T may be 0); suf_k/suf_v: [R, Hkv, C, D] suffix buffers. Returns out [R, Q, Hq, D] in q's dtype
    (the layout transformers' attention functions return). Log-sum-exps are natural-log, float32.
    """
    R, Hq, Q, D = q.shape
    if out is None:
        out = torch.empty(R, Q, Hq, D, dtype=q.dtype, device=q.device)
    o_part, lse_part = plan.partial_buffers(Hq, D, q.device)
    cuda = q.is_cuda
    if plan.segments is not None:
        fn = segment_attention.segment_attention if cuda else segment_attention.segment_attention_reference
        fn(q, seg_k, seg_v, plan.segments, o_part, lse_part, sm_scale)
    fn = suffix_attention.suffix_attention if cuda else suffix_attention.suffix_attention_reference
    fn(q, suf_k, suf_v, plan.suffix, o_part, lse_part, sm_scale)
    fn = merge.merge_partials if cuda else merge.merge_partials_reference
    fn(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0, plan.suffix.n_splits, out)
    return out
