"""PrefixSharingCache: a transformers ``Cache`` that stores each shared prompt segment once.

Per layer a :class:`PrefixSharingLayer` owns
    seg_k / seg_v  [Hkv, T, D]     every shared segment of the batch, packed along T (stored once);
    suf_k / suf_v  [R, Hkv, C, D]  each row's own suffix (left-aligned on a common column grid: row r's
                                   valid columns are [suffix_start[r], cursor)), preallocated for the prompt
                                   plus ``max_new_tokens`` when known, else grown by doubling.
The cache holds the forest, the bookkeeping of forward passes (which pass, which layer is next, where the
suffixes end) and the layers; attention reads them through the hand-off of dispatch.py: ``update`` stores a
layer's new K/V and returns its keys carrying a :class:`~flashforge_hf.dispatch.HandOff`, which the
"flashforge" attention function consumes. A hand-off that was not consumed when the next layer (or forward)
updates the cache means another attention implementation ran: that raises, as does using the cache with a
model whose attention implementation is not "flashforge".

Column grid. The cache reports ``get_seq_length()`` in the columns of the caller's left-padded batch, so that
``generate`` feeds exactly the last prompt column: column c of the batch is suffix-buffer column c - base.
Where the suffixes end (``end``, exclusive) lives in a device int32 [1] that the suffix kernel reads, so a plan
stays valid as decoding advances it.

Several devices (``device_map`` over GPUs). Each layer's storage lives on the device of that layer's K/V (the
device accelerate runs the layer on), so the cache is never copied between devices; the plan's small tensors
are copied once per forward pass to every other device (dispatch.ForwardPass).

Decoding one token per row hands the token to the attention, which writes it at column ``end - 1`` (no copy of
its own), in transformers' loop and in static decoding alike. Static decoding (graphs.GraphDecoder):
:meth:`PrefixSharingCache.begin_static` fixes the suffix buffers at their capacity (no growth); after each
forward :meth:`~PrefixSharingCache.advance_static` moves ``end`` on the device (a captured CUDA graph moves it
itself) and :meth:`~PrefixSharingCache.count_static_step` the host cursor; :meth:`~PrefixSharingCache.end_static`
leaves it.
"""

from __future__ import annotations

import os

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .dispatch import ForestPlanner, ForwardPass, HandOff, SegmentPass
from .models import layer_devices
from .prefix_tree import Forest

ATTN_IMPLEMENTATION = "flashforge"


class PrefixSharingLayer(CacheLayerMixin):
    """One layer's segment and suffix storage (shapes in the module docstring), allocated with the layer's first
    K/V on their device, in their dtype: ``seg_total`` packed segment tokens, ``num_rows`` suffix rows of
    ``capacity`` columns. ``shared``: a layer whose segments are already prefilled, whose segment storage this
    one uses (nothing is copied)."""

    def __init__(self, seg_total: int, num_rows: int, capacity: int, shared: "PrefixSharingLayer | None" = None):
        super().__init__()
        self.seg_total, self.num_rows, self.capacity = seg_total, num_rows, capacity
        self.seg_k = shared.seg_k if shared is not None else None
        self.seg_v = shared.seg_v if shared is not None else None
        self.suf_k = self.suf_v = None

    # ---- writes --------------------------------------------------------------------------------------------
    def check(self, k: torch.Tensor) -> None:
        """Raise if K/V like ``k`` [R, Hkv, Q, D] do not fit the storage (another model, or moved layers)."""
        if self.seg_k is None:
            return
        if k.device != self.seg_k.device:
            raise ValueError(
                f"This layer's PrefixSharingCache storage is on {self.seg_k.device}, but its K/V are on {k.device}: "
                "the model's layers moved after prefill; build a new cache with prefill_shared."
            )
        heads, dim, dtype = self.seg_k.shape[0], self.seg_k.shape[2], self.seg_k.dtype
        if k.shape[1] != heads or k.shape[3] != dim or k.dtype != dtype:
            raise ValueError(
                f"K/V of shape {tuple(k.shape)} ({k.dtype}) do not fit this PrefixSharingCache "
                f"(kv heads {heads}, head dim {dim}, {dtype}): it was built for another model."
            )

    def reserve(self, k: torch.Tensor, columns: int, keep: int) -> None:
        """Allocate the storage for K/V like ``k`` (once), and let the suffix buffers hold ``columns`` columns,
        doubling them if they must grow (their first ``keep`` columns are kept)."""
        _, H, _, D = k.shape
        if self.seg_k is None:
            self.seg_k = torch.empty(H, self.seg_total, D, dtype=k.dtype, device=k.device)
            self.seg_v = torch.empty_like(self.seg_k)
        if self.suf_k is None:
            self.suf_k = torch.empty(self.num_rows, H, self.capacity, D, dtype=k.dtype, device=k.device)
            self.suf_v = torch.empty_like(self.suf_k)
        if columns > self.suf_k.shape[2]:
            cap = max(columns, 2 * self.suf_k.shape[2])
            self.suf_k, self.suf_v = (self._grown(t, cap, keep) for t in (self.suf_k, self.suf_v))

    @staticmethod
    def _grown(old: torch.Tensor, columns: int, keep: int) -> torch.Tensor:
        new = old.new_empty(old.shape[0], old.shape[1], columns, old.shape[3])
        new[:, :, :keep] = old[:, :, :keep]
        return new

    def write_segments(self, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """A segment prefill pass's K/V [rows, Hkv, width, D] into the packed segments: flattened column
        ``src[i]`` becomes packed column ``dst[i]`` (int64 index tensors on the layer's device)."""
        R, H, L, D = k.shape
        for store, new in ((self.seg_k, k), (self.seg_v, v)):
            store.index_copy_(1, dst, new.transpose(0, 1).reshape(H, R * L, D).index_select(1, src))

    def write_suffix(self, k: torch.Tensor, v: torch.Tensor, lo: int) -> None:
        """K/V [R, Hkv, Q, D] into suffix columns [lo, lo + Q)."""
        q = k.shape[2]
        self.suf_k[:, :, lo : lo + q] = k
        self.suf_v[:, :, lo : lo + q] = v

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: the suffix rows in the order ``beam_idx``; the segments are every beam's."""
        if self.suf_k is not None:
            idx = beam_idx.to(self.suf_k.device)
            self.suf_k, self.suf_v = self.suf_k.index_select(0, idx), self.suf_v.index_select(0, idx)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.seg_k, self.seg_v, self.suf_k, self.suf_v) if t is not None)

    # ---- CacheLayerMixin: what this storage does not do -----------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        raise NotImplementedError("PrefixSharingLayer is filled by PrefixSharingCache.update (see reserve).")

    def update(self, *args, **kwargs):
        raise NotImplementedError("PrefixSharingLayer is filled by PrefixSharingCache.update, not by its own update.")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return 0, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError("Ask the PrefixSharingCache: its layers share one column grid.")

    def get_max_length(self) -> int:
        return -1

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
        if segments is not None and (segments.forest.seg_tokens is not forest.seg_tokens or segments.config is not config):
            raise ValueError("`segments` must come from a cache of the same forest and model.")
        seg_total = sum(map(len, forest.seg_tokens))
        self.capacity = suffix_len + 1 + (max_new_tokens if max_new_tokens is not None else 63)
        shared = segments.layers if segments is not None else [None] * config.num_hidden_layers
        super().__init__(layers=[PrefixSharingLayer(seg_total, forest.num_rows, self.capacity, s) for s in shared])
        self.config = config
        self.forest = forest
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # compared with tensors' devices, which have one
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_rows = forest.num_rows
        # Suffix column grid: batch column c <-> buffer column c - base; prompt suffixes (all but the last
        # token) fill buffer columns [suffix_start[r], suffix_len).
        self.base = base
        self.suffix_len = suffix_len
        self.suffix_start = torch.tensor([suffix_len - (len(t) - 1) for t in forest.suffix_tokens], dtype=torch.int32,
                                         device=self.device)
        self.cursor = 0  # buffer columns written by completed prefill/decode passes
        self.static = False  # static decoding (see the module docstring)
        self._end = torch.zeros(1, dtype=torch.int32, device=self.device)  # suffix end read by the kernel
        self.planner = ForestPlanner(forest, self.suffix_start, self._end, self.capacity, self.device)
        self._segment_pass: SegmentPass | None = None  # set by begin_segment_pass for its forward pass
        self._forward: ForwardPass | None = None
        self._expected_layer = 0
        self._last_handoff: HandOff | None = None
        self._write = (0, 0)  # suffix columns [lo, hi) the current forward writes
        self._static_start: torch.Tensor | None = None  # suffix starts at begin_static, restored by end_static

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
            layer.reorder(beam_idx)

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
            self._begin_forward(key_states)
        elif layer_idx != self._expected_layer:
            raise RuntimeError(f"PrefixSharingCache expected layer {self._expected_layer}, got layer {layer_idx}.")
        self._expected_layer = layer_idx + 1
        layer = self.layers[layer_idx]
        layer.check(key_states)
        new_kv = None
        lo, hi = self._write
        if self._segment_pass is not None:
            layer.reserve(key_states, hi, lo)
            src, dst = (self._forward.local(t, key_states.device) for t in (self._segment_pass.src, self._segment_pass.dst))
            layer.write_segments(key_states, value_states, src, dst)
            suf_k, suf_v = key_states, value_states  # the new tokens are the rows' own keys in this pass
        else:
            if not self.static:
                layer.reserve(key_states, hi, lo)
            if key_states.shape[2] == 1:  # one token per row: written at column end - 1 by the attention
                suf_k, suf_v, new_kv = layer.suf_k, layer.suf_v, (key_states, value_states)
            else:
                layer.write_suffix(key_states, value_states, lo)
                suf_k, suf_v = layer.suf_k, layer.suf_v
        h = HandOff(self._forward, layer_idx, layer.seg_k, layer.seg_v, suf_k, suf_v, new_kv)
        self._last_handoff = h
        k_out = key_states.view_as(key_states)  # the attention function finds the hand-off on the keys
        k_out._flashforge = h
        return k_out, value_states

    def _begin_forward(self, k: torch.Tensor) -> None:
        """Layer 0 of a new forward pass: check it, advance the cursor and start the pass (its plan is made at
        the first attention)."""
        impl = getattr(self.config, "_attn_implementation", None)  # per forward: config reads cost microseconds
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"PrefixSharingCache needs attn_implementation='{ATTN_IMPLEMENTATION}', but the model uses '{impl}': "
                f"load it with from_pretrained(..., attn_implementation='{ATTN_IMPLEMENTATION}') after `import flashforge_hf`."
            )
        if self._expected_layer not in (0, len(self.layers)):
            raise RuntimeError(f"Forward pass interrupted after layer {self._expected_layer - 1}.")
        q = k.shape[2]
        if self._segment_pass is not None:
            self._write, end = (self.cursor, self.cursor), 0
        else:
            if k.shape[0] != self.num_rows:
                raise ValueError(
                    f"This PrefixSharingCache holds {self.num_rows} rows but the model got a batch of {k.shape[0]}: "
                    "pass the same num_return_sequences/num_beams to generate as to prefill_shared."
                )
            if self.static:
                if q != 1:
                    raise ValueError(f"A PrefixSharingCache in static mode decodes one token per row, got {q}.")
                end = self.cursor + 1  # the caller advances the end and the cursor
            else:
                self._write, end = (self.cursor, self.cursor + q), self.cursor + q
                self.cursor = end
                self._end.fill_(end)
        if self._forward is not None:
            self._forward.done = True
        self._forward = ForwardPass(self.planner, self.config, self._segment_pass, end)

    # ---- driven by prefill --------------------------------------------------------------------------------
    def begin_segment_pass(self, seg_ids: list[int], width: int) -> None:
        """Next forward pass prefills segments ``seg_ids`` (left-padded to ``width`` columns) into storage."""
        src, dst = [], []
        for i, s in enumerate(seg_ids):
            n, start = self.planner.seg_len[s], self.planner.seg_start[s]
            src += range(i * width + width - n, (i + 1) * width)
            dst += range(start, start + n)
        as_dev = lambda x: torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        self._segment_pass = SegmentPass(tuple(seg_ids), as_dev(src), as_dev(dst))

    def end_pass(self) -> None:
        """After a prefill forward pass: check that its last layer's attention ran, and append to the suffixes
        from now on."""
        if self._last_handoff is not None and not self._last_handoff.consumed:
            raise RuntimeError("The last layer's attention did not read the PrefixSharingCache hand-off.")
        self._segment_pass = None

    # ---- static decoding (driven by graphs.GraphDecoder) ----------------------------------------------------
    def begin_static(self) -> None:
        """Enter static decoding at the current cursor: the next forward writes column ``cursor`` and attends up
        to ``end`` = that column + 1 (see the module docstring). The suffix buffers are allocated for the whole
        capacity now and never move afterwards."""
        if self._segment_pass is not None or self.layers[0].seg_k is None:
            raise RuntimeError("begin_static() needs a prefilled PrefixSharingCache (see prefill_shared).")
        if any(layer.seg_k.device != self.device for layer in self.layers):
            raise NotImplementedError("Static decoding (CUDA graphs, compile) needs every layer on one device; this "
                                      "cache spans several (device_map): decode with transformers' eager loop.")
        for layer in self.layers:
            template = layer.seg_k.new_empty(self.num_rows, layer.seg_k.shape[0], 0, layer.seg_k.shape[2])
            layer.reserve(template, self.capacity, self.cursor)
        self.static = True
        self._static_start = self.suffix_start.clone()
        self._end.fill_(self.cursor + 1)
        self.planner.forget_decode_plans()

    def static_plan_key(self, bound: int) -> tuple:
        """See :meth:`ForestPlanner.static_plan_key`."""
        return self.planner.static_plan_key(bound, self.layers[0].seg_k.shape[0])

    def advance_static(self) -> None:
        """After a static forward, on the device (in place, so a captured CUDA graph advances it itself): the next
        one attends one column further."""
        self._end += 1

    def count_static_step(self) -> None:
        """After a static step, on the host (replayed or not): one more column written."""
        self.cursor += 1

    def retire_rows(self, finished: torch.Tensor) -> None:
        """Static decoding: rows where ``finished`` (bool [R], device) is true stop costing suffix attention (their
        suffix start moves past every end; their outputs are padding from now on). In place, so graphs see it."""
        self.suffix_start.masked_fill_(finished, torch.iinfo(torch.int32).max)

    def end_static(self, cursor: int) -> None:
        """Leave static decoding with ``cursor`` columns written (later steps are undone: their columns are never
        read) and every row's suffix start restored."""
        self.static = False
        self.suffix_start.copy_(self._static_start)
        self._static_start = None
        self.planner.forget_decode_plans()
        self.cursor = cursor
        self._end.fill_(cursor)


def prompts_per_batch(model, forest, copies: int, max_new_tokens: int, device, free_bytes: int | None = None,
                      safety: float = 0.8) -> int:
    """How many prompts (each with its ``copies`` rows) fit in one batch, estimated before any work.

    Counts the shared segments' K/V once, then per row its suffix K/V (prompt suffix + ``max_new_tokens``), the
    activations of the suffix prefill, the attention partials and the logits of a decode step. ``free_bytes``
    defaults to the device's free memory (CUDA: free plus what torch's allocator holds unused; CPU: available
    RAM). A model that ``device_map`` spread over several GPUs is checked on each of them (its share of the
    layers' K/V; activations and logits counted on every one). Raises MemoryError when not even one prompt fits."""
    cfg = model.config
    isz = next(model.parameters()).element_size()
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    tp = getattr(model, "_tp_size", None) or 1  # tensor parallel: this rank holds 1/tp of the KV heads
    kv_per_token = 2 * max(1, hkv // tp) * d * isz  # per layer
    act_per_token = isz * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) + 4 * 4 * hq * d  # + 4 float32 partials
    suffix = max((len(t) - 1 for t in forest.suffix_tokens), default=0)
    level_tokens = max((sum(len(forest.seg_tokens[s]) for s, lv in enumerate(forest.seg_level) if lv == level)
                        for level in range(forest.num_levels)), default=0)
    sizes = []  # per device: (prompts that fit, device, shared bytes, bytes per row, free bytes)
    for dev, layers in (layer_devices(model) or {torch.device(device): cfg.num_hidden_layers}).items():
        fixed = kv_per_token * layers * sum(map(len, forest.seg_tokens)) + act_per_token * level_tokens
        per_row = (kv_per_token * layers * (suffix + 1 + max_new_tokens) + act_per_token * suffix
                   + 2 * 4 * cfg.vocab_size)
        free = free_bytes if free_bytes is not None else _free_bytes(dev)
        budget = safety * free - fixed
        sizes.append((int(budget // (per_row * copies)) if budget > 0 else 0, dev, fixed, per_row, free))
    fit, device, fixed, per_row, free_bytes = min(sizes, key=lambda size: size[0])  # the tightest device
    if fit < 1:
        gib = 2**30
        raise MemoryError(
            f"Not even one prompt fits: the shared segments need {fixed / gib:.2f} GiB and each prompt "
            f"{per_row * copies / gib:.2f} GiB ({copies} row(s) of up to {suffix + 1} own prompt tokens + "
            f"{max_new_tokens} new), but only {safety * free_bytes / gib:.2f} GiB of {device} memory is usable. "
            "Shorten the prompts, lower max_new_tokens or num_return_sequences/num_beams, or free memory."
        )
    return fit


def _free_bytes(device: torch.device) -> int:
    """Memory a batch may use on ``device``: CUDA: free plus what torch's allocator holds unused; CPU: available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
