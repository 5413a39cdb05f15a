"""PrefixSharingCache: a transformers ``Cache`` that stores each shared prompt segment once.

Per layer it holds
    seg_k / seg_v  [Hkv, T, D]     every shared segment of the batch, packed along T (stored once);
    suf_k / suf_v  [R, Hkv, C, D]  each row's own suffix (left-aligned on a common column grid: row r's
                                   valid columns are [suffix_start[r], cursor)), preallocated for the prompt
                                   plus ``max_new_tokens`` when known, else grown by doubling.

Hand-off to attention. transformers' attention functions never see the cache: a layer calls
``cache.update(k, v, layer_idx)`` and passes what it returns to the attention function. ``update`` stores the
new K/V and returns a view of the keys carrying a ``_flashforge`` attribute: a :class:`HandOff` naming this cache,
the layer, the forward pass and the plan. The "flashforge" attention function consumes it (checking that it is
for this layer and this forward pass) and runs the segment-forest attention. A hand-off that was not consumed
when the next layer (or forward) updates the cache means another attention implementation ran: that raises,
as does using the cache with a model whose attention implementation is not "flashforge".

Column grid. The cache reports ``get_seq_length()`` in the columns of the caller's left-padded batch, so that
``generate`` feeds exactly the last prompt column: column c of the batch is suffix-buffer column c - base.
Where the suffixes end (``end``, exclusive) lives in a device int32 [1] that the suffix kernel reads, so a plan
stays valid as decoding advances it.

Several devices (``device_map`` over GPUs). Each layer's storage lives on the device of that layer's K/V (the
device accelerate runs the layer on), so the cache is never copied between devices. The plan is made once per
forward pass on the cache's device (the device of the model's inputs) and its few small tensors are copied once
per forward pass to every other device a layer runs on, where they are reused by that device's layers.

Static decoding (graphs.py): after prefill, :meth:`PrefixSharingCache.begin_static` fixes the suffix buffers
(no growth) and makes each forward pass write its one new token per row at column ``end - 1`` and attend up to
``end`` (int32 [1], device; the suffix kernel itself writes the token, see forest_attention's ``new_kv``); the
caller advances ``end`` on the device after each step (and ``cursor`` on the host). Each step takes the plan of
its bucket, made for the bucket's largest ``end`` (:func:`bucket_bound`), so that one captured CUDA graph replays
every step of a bucket.

Decoding outside static mode (transformers' own loop) runs the same way: a forward pass of one token per row hands
the token to the attention, which writes it (no copy of its own), and takes the plan of its bucket (one plan
per bucket, reused by its steps, so they neither plan nor bind launches again). Its steps therefore run the
kernels of the static steps with the same plans, and give the same results.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .forest import forest_attention
from .planner import ForestPlan, make_plan, plan_forward, plan_suffix_splits, segment_part
from .prefix_tree import Forest

ATTN_IMPLEMENTATION = "flashforge"
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


class PrefixSharingLayer(CacheLayerMixin):
    """One layer's segment and suffix storage (see :class:`PrefixSharingCache`)."""

    def __init__(self):
        super().__init__()
        self.seg_k = self.seg_v = self.suf_k = self.suf_v = None

    def lazy_initialization(self, key_states, value_states):  # storage is sized by the cache, see _ensure_storage
        raise NotImplementedError

    def update(self, *args, **kwargs):  # the cache updates its layers itself
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return 0, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.seg_k, self.seg_v, self.suf_k, self.suf_v) if t is not None)

    def reset(self):
        raise NotImplementedError("PrefixSharingCache does not support reset(); build a new cache with prefill_shared.")

    def offload(self):
        raise NotImplementedError("PrefixSharingCache does not support offloading.")

    def prefetch(self):
        raise NotImplementedError("PrefixSharingCache does not support offloading.")

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError(
            "PrefixSharingCache does not support crop() (used by assisted/speculative decoding and contrastive "
            "search); use flashforge_hf.generate without an assistant model, or a DynamicCache."
        )

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError(
            "PrefixSharingCache does not support batch_repeat_interleave(); pass num_return_sequences/num_beams to "
            "prefill_shared (or use flashforge_hf.generate), which shares the prompt among the copies."
        )

    def batch_select_indices(self, indices):
        raise NotImplementedError("PrefixSharingCache does not support batch selection (batch_select_indices).")

    def reorder_cache(self, beam_idx):
        raise AssertionError("reordered by PrefixSharingCache.reorder_cache")


@dataclass
class HandOff:
    """What one layer's attention needs from the cache for one forward pass (see module docstring)."""

    cache_ref: "weakref.ref[PrefixSharingCache]"  # weak: the cache holds its last hand-off (no reference cycle)
    layer_idx: int
    forward_id: int
    seg_k: torch.Tensor
    seg_v: torch.Tensor
    suf_k: torch.Tensor
    suf_v: torch.Tensor
    new_kv: tuple | None = None  # static decoding: the token's (keys, values), written by the attention itself
    consumed: bool = False

    def run(self, module, query: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """Consume the hand-off and compute the layer's attention: returns [R, Q, Hq, D]."""
        cache = self.cache_ref()
        if cache is None or self.consumed or self.forward_id != cache._forward_id:
            raise RuntimeError(
                f"Stale PrefixSharingCache hand-off for layer {self.layer_idx}: it belongs to an earlier forward pass."
            )
        if getattr(module, "layer_idx", self.layer_idx) != self.layer_idx:
            raise RuntimeError(
                f"PrefixSharingCache hand-off for layer {self.layer_idx} reached the attention of layer {module.layer_idx}."
            )
        if getattr(module, "config", cache.config) is not cache.config:
            raise ValueError(
                "This PrefixSharingCache was built for another model: build one per model with prefill_shared."
            )
        self.consumed = True
        plan = cache._plan_for(query)
        return forest_attention(query, self.seg_k, self.seg_v, self.suf_k, self.suf_v, plan, sm_scale,
                                new_kv=self.new_kv)


class PrefixSharingCache(Cache):
    """KV cache of a batch whose prompts share prefixes; build it with :func:`flashforge_hf.prefill_shared`.

    Rows map to a path of shared segments (``forest.paths``) plus their own suffix. Only the "flashforge"
    attention implementation can read it. Crop, batch selection and offloading raise NotImplementedError;
    beam-search reordering is supported (beams of one prompt share its segments).
    """

    def __init__(self, config, forest: Forest, *, device, max_new_tokens: int | None = None, base: int, suffix_len: int,
                 segments: "PrefixSharingCache | None" = None):
        """``segments``: a cache of the same forest whose segments are already prefilled; this cache then shares
        its segment storage (nothing is copied) and holds only its own rows' suffixes."""
        n_layers = config.num_hidden_layers
        super().__init__(layers=[PrefixSharingLayer() for _ in range(n_layers)])
        if segments is not None:
            if segments.forest.seg_tokens is not forest.seg_tokens or segments.config is not config:
                raise ValueError("`segments` must come from a cache of the same forest and model.")
            for mine, theirs in zip(self.layers, segments.layers):
                mine.seg_k, mine.seg_v = theirs.seg_k, theirs.seg_v
        self.config = config
        self.forest = forest
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # compared with tensors' devices, which have one
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_rows = forest.num_rows
        # Packed segment offsets (segments are numbered level by level).
        lens = [len(t) for t in forest.seg_tokens]
        self.seg_len = lens
        self.seg_start = [sum(lens[:s]) for s in range(len(lens))]
        self.seg_total = sum(lens)
        # Suffix column grid: batch column c <-> buffer column c - base; prompt suffixes (all but the last
        # token) fill buffer columns [suffix_start[r], suffix_len).
        self.base = base
        self.suffix_len = suffix_len
        pre = [len(t) - 1 for t in forest.suffix_tokens]
        self.suffix_start_host = [suffix_len - n for n in pre]
        self.suffix_start = torch.tensor(self.suffix_start_host, dtype=torch.int32, device=self.device)
        self.capacity = suffix_len + 1 + (max_new_tokens if max_new_tokens is not None else 63)
        self.cursor = 0  # buffer columns written by completed prefill/decode passes
        self._stage = None  # set by prefill for its passes; None means "append to the suffixes"
        self._forward_id = 0
        self._expected_layer = 0
        self._last_handoff: HandOff | None = None
        self._plan: ForestPlan | None = None
        self._seg_plan_cache: dict = {}
        self._workspace: dict = {}
        self._mirrors: dict = {}  # this forward's copies of small plan/stage tensors on other devices
        self._workspaces: dict = {}  # per other device: its layers' partial buffers
        self._end = torch.zeros(1, dtype=torch.int32, device=self.device)  # suffix end read by the kernel
        self.static = False  # static decoding (see the module docstring)
        self._decode_plans: dict = {}  # the current bucket's plan of one-token forward passes (see _plan_for)

    # ---- what generate asks -------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.base + self.cursor

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # (0, 0) tells the "flashforge" mask function that no mask is needed: the forest and each row's
        # suffix start define exactly which keys every query sees.
        return 0, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return self.num_rows

    @property
    def is_compileable(self) -> bool:
        return False

    def nbytes(self) -> int:
        """Bytes of K/V storage held (segments once, plus the suffix buffers)."""
        return sum(layer.nbytes() for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the suffix rows; beams of one prompt share the same segments."""
        for layer in self.layers:
            if layer.suf_k is not None:
                idx = beam_idx.to(layer.suf_k.device)
                layer.suf_k = layer.suf_k.index_select(0, idx)
                layer.suf_v = layer.suf_v.index_select(0, idx)

    def crop(self, max_length: int) -> None:
        self.layers[0].crop(max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.layers[0].batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        self.layers[0].batch_select_indices(indices)

    def reset(self) -> None:
        self.layers[0].reset()

    # ---- update / hand-off --------------------------------------------------------------------------------
    @torch.compiler.disable  # torch.compile (graphs.py's compile=True, or a user's) runs it as is, between graphs
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this layer's new K/V ([R, Hkv, Q, D]) and return (a view of the keys that carries the attention
        hand-off, the values)."""
        if self._last_handoff is not None and not self._last_handoff.consumed:
            raise RuntimeError(
                f"The attention of layer {self._last_handoff.layer_idx} did not read the PrefixSharingCache hand-off: "
                f"another attention implementation ran on it."
            )
        if layer_idx == 0:
            impl = getattr(self.config, "_attn_implementation", None)  # per forward: config reads cost microseconds
            if impl != ATTN_IMPLEMENTATION:
                raise ValueError(
                    f"PrefixSharingCache needs attn_implementation='{ATTN_IMPLEMENTATION}', but the model uses '{impl}': "
                    f"load it with from_pretrained(..., attn_implementation='{ATTN_IMPLEMENTATION}') after `import flashforge_hf`."
                )
            if self._expected_layer not in (0, len(self.layers)):
                raise RuntimeError(f"Forward pass interrupted after layer {self._expected_layer - 1}.")
            self._begin_forward(key_states)
        elif layer_idx != self._expected_layer:
            raise RuntimeError(f"PrefixSharingCache expected layer {self._expected_layer}, got layer {layer_idx}.")
        self._expected_layer = layer_idx + 1
        layer = self.layers[layer_idx]
        self._check_shapes(layer, key_states, value_states)
        new_kv = None
        if self._stage is not None and self._stage[0] == "segments":
            _, seg_ids, src_index, dst_index = self._stage
            self._ensure_storage(layer, key_states)
            R, H, L, D = key_states.shape
            flat_k = key_states.transpose(0, 1).reshape(H, R * L, D)
            flat_v = value_states.transpose(0, 1).reshape(H, R * L, D)
            src_index, dst_index = self._local(src_index, key_states.device), self._local(dst_index, key_states.device)
            layer.seg_k.index_copy_(1, dst_index, flat_k.index_select(1, src_index))
            layer.seg_v.index_copy_(1, dst_index, flat_v.index_select(1, src_index))
            suf_k, suf_v = key_states, value_states  # the new tokens are the rows' own keys in this pass
        elif key_states.shape[2] == 1:  # one token per row (as static mode always runs): at column end - 1, written
            # by the attention
            if not self.static:
                self._ensure_storage(layer, key_states)
            suf_k, suf_v, new_kv = layer.suf_k, layer.suf_v, (key_states, value_states)
        else:
            self._ensure_storage(layer, key_states)
            q = key_states.shape[2]
            lo = self._write_lo
            layer.suf_k[:, :, lo : lo + q] = key_states
            layer.suf_v[:, :, lo : lo + q] = value_states
            suf_k, suf_v = layer.suf_k, layer.suf_v
        h = HandOff(weakref.ref(self), layer_idx, self._forward_id, layer.seg_k, layer.seg_v, suf_k, suf_v, new_kv)
        self._last_handoff = h
        k_out = key_states.view_as(key_states)  # the attention function finds the hand-off on the keys
        k_out._flashforge = h
        return k_out, value_states

    def _check_shapes(self, layer, k, v):
        if layer.seg_k is None:  # allocated with the layer's first K/V (or shared from `segments`)
            return
        if k.device != layer.seg_k.device:
            raise ValueError(
                f"This layer's PrefixSharingCache storage is on {layer.seg_k.device}, but its K/V are on {k.device}: "
                "the model's layers moved after prefill; build a new cache with prefill_shared."
            )
        heads, dim, dtype = layer.seg_k.shape[0], layer.seg_k.shape[2], layer.seg_k.dtype
        if k.shape[1] != heads or k.shape[3] != dim or k.dtype != dtype:
            raise ValueError(
                f"K/V of shape {tuple(k.shape)} ({k.dtype}) do not fit this PrefixSharingCache "
                f"(kv heads {heads}, head dim {dim}, {dtype}): it was built for another model."
            )

    def _ensure_storage(self, layer: PrefixSharingLayer, k: torch.Tensor) -> None:
        """Allocate (once) or grow (by doubling) the layer's storage."""
        R, H, _, D = k.shape
        if layer.seg_k is None:
            layer.seg_k = torch.empty(H, self.seg_total, D, dtype=k.dtype, device=k.device)
            layer.seg_v = torch.empty_like(layer.seg_k)
        if layer.suf_k is None:
            layer.suf_k = torch.empty(self.num_rows, H, self.capacity, D, dtype=k.dtype, device=k.device)
            layer.suf_v = torch.empty_like(layer.suf_k)
        need = self._write_hi
        if need > layer.suf_k.shape[2]:
            cap = max(need, 2 * layer.suf_k.shape[2])
            for name in ("suf_k", "suf_v"):
                old = getattr(layer, name)
                new = torch.empty(old.shape[0], H, cap, D, dtype=old.dtype, device=old.device)
                new[:, :, : self._write_lo] = old[:, :, : self._write_lo]
                setattr(layer, name, new)

    def _begin_forward(self, k: torch.Tensor) -> None:
        """Layer 0 of a new forward pass: advance the cursor and invalidate the previous plan."""
        self._forward_id += 1
        self._plan = None
        self._mirrors = {}
        q = k.shape[2]
        if self._stage is None:
            if k.shape[0] != self.num_rows:
                raise ValueError(
                    f"This PrefixSharingCache holds {self.num_rows} rows but the model got a batch of {k.shape[0]}: "
                    "pass the same num_return_sequences/num_beams to generate as to prefill_shared."
                )
            if self.static:
                if q != 1:
                    raise ValueError(f"A PrefixSharingCache in static mode decodes one token per row, got {q}.")
                return  # the caller keeps end and the cursor
            self._write_lo, self._write_hi = self.cursor, self.cursor + q
            self.cursor += q
            self._end.fill_(self._write_hi)
        else:
            self._write_lo = self._write_hi = self.cursor

    def _plan_for(self, query: torch.Tensor) -> ForestPlan:
        """The plan of the current forward pass, made at its first layer and reused by all the others (on
        their own device: see :meth:`_plan_on`)."""
        if self._plan is not None:
            return self._plan_on(self._plan, query.device)
        R, Hq, Q, D = query.shape
        Hkv = self.layers[0].seg_k.shape[0]
        if Hq % Hkv:
            raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads.")
        G = Hq // Hkv
        itemsize = query.element_size()
        if self._stage is not None and self._stage[0] == "segments":
            seg_ids = self._stage[1]
            paths = [list(self._ancestors(s)) for s in seg_ids]
            n = [len(self.forest.seg_tokens[s]) for s in seg_ids]
            L = max(n)
            start = torch.tensor([L - x for x in n], dtype=torch.int32).to(self.device, non_blocking=True)
            plan = make_plan(paths, self.seg_start, self.seg_len, start, L, Q, G, Hkv, D, itemsize, self.device)
        else:
            key = (Q, G, D, itemsize)
            if key not in self._seg_plan_cache:  # decoding: the segment part is made once, suffixes grow
                self._seg_plan_cache[key] = segment_part(
                    [list(p) for p in self.forest.paths], self.seg_start, self.seg_len, Q, G, Hkv, D, itemsize, self.device
                )
            # One token per row (static or not): one plan per bucket, made for its largest end and reused by its
            # steps; so a step of transformers' loop runs the plan the static step at that end runs.
            end = self.cursor + 1 if self.static else self._write_hi  # static mode: the caller advances the cursor
            bound = bucket_bound(end, self.capacity) if Q == 1 else end
            plan = self._decode_plans.get((bound, key)) if Q == 1 else None
            if plan is None:
                plan = plan_forward(self._seg_plan_cache[key], self.suffix_start, self._end, bound, Q, Hkv, self.device)
                if Q == 1:
                    self._decode_plans = {(bound, key): plan}  # the buckets only grow: earlier plans are done with
        plan.workspace = self._workspace
        self._plan = plan
        return self._plan_on(plan, query.device)

    def _local(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``t`` (a small tensor of this forward pass on the cache's device) on ``device``: copied once per
        forward pass (layers on other devices under device_map), else ``t`` itself."""
        if t.device == device:
            return t
        key = (id(t), device)
        if key not in self._mirrors or self._mirrors[key][0] is not t:  # the source is kept: its id stays unique
            self._mirrors[key] = (t, t.to(device, non_blocking=True))
        return self._mirrors[key][1]

    def _plan_on(self, plan: ForestPlan, device: torch.device) -> ForestPlan:
        """``plan`` for layers on ``device``: itself on the cache's device, else a copy of its tensors there
        (made once per forward pass), with that device's own partial buffers."""
        if device == self.device:
            return plan
        key = ("plan", device)
        if key not in self._mirrors:
            local = lambda t: self._local(t, device)  # noqa: E731
            seg = plan.segments
            if seg is not None:
                seg = seg._replace(tasks=local(seg.tasks), seg_rows=local(seg.seg_rows), row_slot=local(seg.row_slot))
            suffix = plan.suffix._replace(start=local(plan.suffix.start), end=local(plan.suffix.end))
            self._mirrors[key] = ForestPlan(segments=seg, suffix=suffix, row_slot_off=local(plan.row_slot_off),
                                            n_slots=plan.n_slots, q_len=plan.q_len,
                                            workspace=self._workspaces.setdefault(device, {}))
        return self._mirrors[key]

    def _ancestors(self, s: int):
        chain = []
        p = self.forest.seg_parent[s]
        while p >= 0:
            chain.append(p)
            p = self.forest.seg_parent[p]
        return reversed(chain)

    # ---- static decoding (driven by graphs.GraphDecoder) ----------------------------------------------------
    def begin_static(self) -> None:
        """Enter static decoding at the current cursor: the next forward writes column ``cursor`` and attends up
        to ``end`` = that column + 1 (see the module docstring).
        The suffix buffers are allocated for the whole capacity now and never move afterwards."""
        if self._stage is not None or self.layers[0].seg_k is None:
            raise RuntimeError("begin_static() needs a prefilled PrefixSharingCache (see prefill_shared).")
        if any(layer.seg_k.device != self.device for layer in self.layers):
            raise NotImplementedError("Static decoding (CUDA graphs, compile) needs every layer on one device; this "
                                      "cache spans several (device_map): decode with transformers' eager loop.")
        self._write_lo, self._write_hi = self.cursor, self.capacity  # what _ensure_storage keeps and sizes for
        for layer in self.layers:
            if layer.suf_k is None or layer.suf_k.shape[2] < self.capacity:
                self._ensure_storage(layer, layer.seg_k.new_empty(self.num_rows, layer.seg_k.shape[0], 0,
                                                                  layer.seg_k.shape[2]))
        self.static = True
        self._end.fill_(self.cursor + 1)
        self._decode_plans = {}

    def static_plan_key(self, bound: int) -> tuple[int, int]:
        """What the plan of the static forwards up to ``bound`` depends on besides the forest, which stays: the
        suffix splits. Bounds with equal keys get equal plans (same tables, buffers and launch arguments), so a
        CUDA graph captured under one stays valid under the other."""
        return plan_suffix_splits(self.num_rows, self.layers[0].seg_k.shape[0], bound, 1, self.device)

    def advance_static(self) -> None:
        """After a static forward: the next one writes the next column and attends one column further (``end`` is
        advanced in place on the device, so a captured CUDA graph advances it itself)."""
        self._end += 1

    def end_static(self, cursor: int) -> None:
        """Leave static decoding with ``cursor`` columns written (the host count of the static steps)."""
        self.static = False
        self._decode_plans = {}
        self.cursor = cursor
        self._end.fill_(cursor)

    # ---- driven by prefill --------------------------------------------------------------------------------
    def begin_segment_pass(self, seg_ids: list[int], width: int) -> None:
        """Next forward pass prefills segments ``seg_ids`` (left-padded to ``width`` columns) into storage."""
        src, dst = [], []
        for i, s in enumerate(seg_ids):
            n = self.seg_len[s]
            src += range(i * width + width - n, (i + 1) * width)
            dst += range(self.seg_start[s], self.seg_start[s] + n)
        as_dev = lambda x: torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        self._stage = ("segments", list(seg_ids), as_dev(src), as_dev(dst))

    def end_pass(self) -> None:
        if self._last_handoff is not None and not self._last_handoff.consumed:
            raise RuntimeError("The last layer's attention did not read the PrefixSharingCache hand-off.")
        self._stage = None
