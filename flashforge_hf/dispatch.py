"""From ``cache.update`` to the kernels: the hand-off that a layer's keys carry, and each forward pass's plan.

transformers' attention functions never see the cache: a layer calls ``cache.update(k, v, layer_idx)`` and
passes what it returns to the attention function. So :class:`~flashforge_hf.cache.PrefixSharingCache` returns
the keys with a :class:`HandOff` attached (attribute ``_flashforge``): the layer's storage, the
:class:`ForwardPass` it belongs to and, decoding one token per row, the token's K/V, which the suffix kernel
writes itself. The "flashforge" attention function (attention.py) finds it and calls :meth:`HandOff.run`,
which checks that the hand-off is for this layer, this model and the current forward pass, takes the pass's
plan and runs :func:`~flashforge_hf.forest_attention.forest_attention`.

Plans (:class:`ForestPlanner`, one per cache). A forward pass's plan is made at its first layer and reused by all
the others; layers on another device (``device_map``) get a copy of its few small tensors, made once per pass and
device. Decoding plans the forest's part once per query geometry and choice of segment waves (the segments do not
change; the waves follow the suffix length, see planner.py), and one-token passes take the plan of their bucket of
suffix ends (:func:`bucket_bound`), made for the bucket's largest end: the steps of a bucket neither plan nor bind
launches again, and transformers' eager loop runs the plans that the static loop's CUDA graphs replay (graphs.py),
so both give the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .forest_attention import forest_attention
from .planner import (DeviceModel, ForestPlan, SegmentPart, make_plan, plan_forward, plan_suffix_splits, segment_load,
                      segment_part)
from .prefix_tree import Forest

MIN_BUCKET = 256  # columns: the smallest bucket bound of decode plans


def bucket_bound(end: int, capacity: int) -> int:
    """The bound of the bucket holding suffix end ``end``: the next power of two >= end (at least
    :data:`MIN_BUCKET`), capped at ``capacity``; ``end`` itself past the capacity (buffers grown by an eager loop
    that was not told ``max_new_tokens``)."""
    if end > capacity:
        return end
    bound = MIN_BUCKET
    while bound < end:
        bound *= 2
    return min(bound, capacity)


@dataclass(frozen=True)
class SegmentPass:
    """A prefill pass of shared segments ``seg_ids``, left-padded into one batch: the flattened batch's columns
    ``src`` (int64 [n], device; a column of [Hkv, rows * width, D]) go to packed segment columns ``dst``."""

    seg_ids: tuple[int, ...]
    src: torch.Tensor
    dst: torch.Tensor


class ForestPlanner:
    """The plans of one cache's forward passes (host work from Python ints; one small copy to the device each).

    ``suffix_start`` int32 [R] and ``suffix_end`` int32 [1] are the cache's device tensors that the suffix kernel
    reads (so a plan stays valid while decoding advances the end); ``capacity`` the suffix buffers' columns.
    Kept across passes: the forest's part of decode plans, the current bucket's one-token plan, and per device
    the float32 storage of the partial buffers (it only grows).
    """

    def __init__(self, forest: Forest, suffix_start: torch.Tensor, suffix_end: torch.Tensor, capacity: int,
                 device: torch.device):
        self.forest = forest
        self.seg_len = [len(t) for t in forest.seg_tokens]
        self.seg_start = [sum(self.seg_len[:s]) for s in range(len(self.seg_len))]  # packed offsets
        self.paths = [list(p) for p in forest.paths]  # each row's shared segments, root first
        self.suffix_start, self.suffix_end = suffix_start, suffix_end
        self.capacity = capacity
        self.device = device
        self._loads: dict = {}  # (geometry, KV heads) -> the forest's SegmentLoad, which picks the waves
        self._segment_parts: dict = {}  # (geometry, waves) -> SegmentPart
        self._decode_plan: tuple | None = None  # (bound, geometry, plan) of the current bucket
        self._workspaces: dict = {}

    def plan(self, query: torch.Tensor, num_kv_heads: int, segments: SegmentPass | None, end: int) -> ForestPlan:
        """The plan of a forward pass with queries like ``query`` [R, Hq, Q, D]: prefilling ``segments``, else
        attending to the suffixes up to ``end`` (host int)."""
        R, Hq, Q, D = query.shape
        if Hq % num_kv_heads:
            raise ValueError(f"{Hq} query heads are not a multiple of {num_kv_heads} KV heads.")
        G, itemsize = Hq // num_kv_heads, query.element_size()
        if segments is not None:
            paths = [self._ancestors(s) for s in segments.seg_ids]
            n = [self.seg_len[s] for s in segments.seg_ids]
            start = torch.tensor([max(n) - x for x in n], dtype=torch.int32).to(self.device, non_blocking=True)
            plan = make_plan(paths, self.seg_start, self.seg_len, start, max(n), Q, G, num_kv_heads, D, itemsize,
                             self.device)
        else:
            plan = self._suffix_plan(end, Q, G, num_kv_heads, D, itemsize)
        plan.workspace = self.workspace(self.device)
        return plan

    def _suffix_plan(self, end: int, Q: int, G: int, num_kv_heads: int, D: int, itemsize: int) -> ForestPlan:
        geometry = (Q, G, D, itemsize)
        if Q != 1:
            return plan_forward(self._segment_part(geometry, num_kv_heads, end), self.suffix_start, self.suffix_end,
                                end, Q, num_kv_heads, self.device)
        bound = bucket_bound(end, self.capacity)
        if self._decode_plan is None or self._decode_plan[:2] != (bound, geometry):  # buckets only grow
            plan = plan_forward(self._segment_part(geometry, num_kv_heads, bound), self.suffix_start,
                                self.suffix_end, bound, 1, num_kv_heads, self.device)
            self._decode_plan = (bound, geometry, plan)
        return self._decode_plan[2]

    def _segment_part(self, geometry: tuple, num_kv_heads: int, suffix_cols: int) -> SegmentPart:
        """The forest's part of a plan for this query ``geometry`` beside a suffix pass over ``suffix_cols``
        columns: made once per choice of segment waves."""
        waves = self._waves(geometry, num_kv_heads, suffix_cols)
        if (geometry, waves) not in self._segment_parts:
            Q, G, D, itemsize = geometry
            self._segment_parts[geometry, waves] = segment_part(
                self.paths, self.seg_start, self.seg_len, Q, G, num_kv_heads, D, itemsize, self.device, waves=waves)
        return self._segment_parts[geometry, waves]

    def _waves(self, geometry: tuple, num_kv_heads: int, suffix_cols: int) -> int | None:
        """The segment waves of a pass with this query ``geometry`` beside a suffix pass over ``suffix_cols``
        columns (:meth:`~flashforge_hf.planner.SegmentLoad.best_waves`); None without shared segments."""
        if (geometry, num_kv_heads) not in self._loads:
            Q, G, D, itemsize = geometry
            self._loads[geometry, num_kv_heads] = segment_load(
                self.paths, self.seg_len, Q, G, num_kv_heads, D, itemsize, DeviceModel.for_device(self.device))
        load = self._loads[geometry, num_kv_heads]
        return None if load is None else load.best_waves(suffix_cols)

    def forget_decode_plans(self) -> None:
        """Entering or leaving static decoding: the next one-token pass plans afresh."""
        self._decode_plan = None

    def static_plan_key(self, bound: int, num_kv_heads: int) -> tuple:
        """What the plan of the one-token passes up to ``bound`` depends on besides the forest: the suffix splits
        and the segment waves (for the query geometry of the current decode plan). Bounds with equal keys get equal
        plans (same tables, buffers and launch arguments), so a CUDA graph captured under one stays valid under
        the other."""
        waves = None if self._decode_plan is None else self._waves(self._decode_plan[1], num_kv_heads, bound)
        return (*plan_suffix_splits(len(self.paths), num_kv_heads, bound, 1, self.device), waves)

    def workspace(self, device: torch.device) -> dict:
        """The partial buffers' storage on ``device`` (see :meth:`ForestPlan.partial_buffers`)."""
        return self._workspaces.setdefault(device, {})

    def _ancestors(self, s: int) -> list[int]:
        chain = []
        p = self.forest.seg_parent[s]
        while p >= 0:
            chain.append(p)
            p = self.forest.seg_parent[p]
        return chain[::-1]


class ForwardPass:
    """One forward pass through a cache: its plan, made at the first layer's attention, and the copies of its
    small tensors on the other devices that layers run on. ``done`` once the cache began the next pass."""

    def __init__(self, planner: ForestPlanner, config, segments: SegmentPass | None, end: int):
        self.planner, self.config, self.segments, self.end = planner, config, segments, end
        self.done = False
        self._plan: ForestPlan | None = None
        self._mirrors: dict = {}

    def plan_for(self, query: torch.Tensor, num_kv_heads: int) -> ForestPlan:
        """The pass's plan for layers on ``query``'s device."""
        if self._plan is None:
            self._plan = self.planner.plan(query, num_kv_heads, self.segments, self.end)
        return self._plan_on(self._plan, query.device)

    def local(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``t`` (a small tensor of this pass on the cache's device) on ``device``: copied once per pass, or
        ``t`` itself."""
        if t.device == device:
            return t
        key = (id(t), device)
        if key not in self._mirrors or self._mirrors[key][0] is not t:  # the source is kept: its id stays unique
            self._mirrors[key] = (t, t.to(device, non_blocking=True))
        return self._mirrors[key][1]

    def _plan_on(self, plan: ForestPlan, device: torch.device) -> ForestPlan:
        if device == self.planner.device:
            return plan
        key = ("plan", device)
        if key not in self._mirrors:
            local = lambda t: self.local(t, device)  # noqa: E731
            seg = plan.segments
            if seg is not None:
                seg = seg._replace(tasks=local(seg.tasks), seg_rows=local(seg.seg_rows), row_slot=local(seg.row_slot))
            suffix = plan.suffix._replace(start=local(plan.suffix.start), end=local(plan.suffix.end))
            self._mirrors[key] = ForestPlan(segments=seg, suffix=suffix, row_slot_off=local(plan.row_slot_off),
                                            n_slots=plan.n_slots, q_len=plan.q_len,
                                            workspace=self.planner.workspace(device))
        return self._mirrors[key]


@dataclass
class HandOff:
    """What one layer's attention needs for one forward pass: the layer's storage (seg_k/seg_v [Hkv, T, D];
    suf_k/suf_v [R, Hkv, C, D], or in a segment prefill the pass's own K/V), and ``new_kv``, decoding one token
    per row: its (keys, values) [R, Hkv, 1, D], written at column ``end - 1`` by the attention itself."""

    forward: ForwardPass
    layer_idx: int
    seg_k: torch.Tensor
    seg_v: torch.Tensor
    suf_k: torch.Tensor
    suf_v: torch.Tensor
    new_kv: tuple | None = None
    consumed: bool = False

    def run(self, module, query: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """Consume the hand-off and compute the layer's attention for ``query`` [R, Hq, Q, D]: returns
        [R, Q, Hq, D] in its dtype."""
        if self.consumed or self.forward.done:
            raise RuntimeError(
                f"Stale PrefixSharingCache hand-off for layer {self.layer_idx}: it belongs to an earlier forward pass."
            )
        if getattr(module, "layer_idx", self.layer_idx) != self.layer_idx:
            raise RuntimeError(
                f"PrefixSharingCache hand-off for layer {self.layer_idx} reached the attention of layer {module.layer_idx}."
            )
        if getattr(module, "config", self.forward.config) is not self.forward.config:
            raise ValueError(
                "This PrefixSharingCache was built for another model: build one per model with prefill_shared."
            )
        self.consumed = True
        plan = self.forward.plan_for(query, self.seg_k.shape[0])
        return forest_attention(query, self.seg_k, self.seg_v, self.suf_k, self.suf_v, plan, sm_scale,
                                new_kv=self.new_kv)
