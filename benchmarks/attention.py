"""Benchmark of one attention layer in decode (Hq=32, Hkv=8, D=128, bf16, one query token per row).

Methods, each checked against float32 math before it is timed:
    ours           forest_attention with the planner's plan (each shared segment read once per step);
    ours-private   forest_attention with sharing disabled: every row gets its own copy of its path as one
                   private segment (what the kernels do when nothing is shared);
    sdpa           torch scaled_dot_product_attention (enable_gqa) over KV materialised per row
                   [B, Hkv, prefix + suffix, D], what stock transformers runs;
    fi-*           FlashInfer's paths (:data:`FLASHINFER_PATHS`) on the same values in its paged layout, where
                   it is importable (on a GPU machine: source its setup.sh; benchmarks/run_gpu.sh does); else
                   their rows say "not installed". A path that fails or misses the check is reported and not
                   timed; the rest of the benchmark goes on.

Per case and method: median microseconds per call, eager (triton.testing.do_bench, L2 flushed before each call)
and replayed from a CUDA graph (do_bench_cudagraph); wall microseconds per call in a back-to-back eager loop
(includes host launch cost); inputs rotated over copies so that at least 100 MB cycle through the L2 (50 MB on an
H100, 60 MB on an H200). Floor: the larger of the bytes term, (unique K/V bytes + q and out bytes) at the card's
bandwidth, and the FLOPs term, 4 * B * Hq * (prefix + suffix) * D at its matmul rate (flashforge_hf.ceilings).
Also the planner's host cost per forward against the attention time of a 32-layer forward, and the host cost of
one layer call.

    python benchmarks/attention.py                     # every case; CSV + markdown under benchmarks/results/
    python benchmarks/attention.py --cases 64x4096+128 --no-write
    python benchmarks/attention.py --breakdown --cases 128x32768+1024   # each kernel of the layer alone
    python benchmarks/attention.py --tune              # tile-configuration sweep (--tune layer: whole layers)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from flashforge_bench.harness import (ROTATE_BYTES, card_ceilings, card_name, floor_terms, git_commit,
                                      host_us, n_copies, rel_err, time_calls, utc_now, write_csv)


def flashforge_internals() -> SimpleNamespace:
    """Every name below flashforge_hf's public API that this benchmark uses, all of them here (the core's layout
    changes: fix the names here only). Kernel-level benchmarking needs them: the public API has no call for one
    layer's attention on a given forest.

    Read: ``flashforge_hf.forest_attention.forest_attention`` (one layer's decode attention on a plan),
    ``flashforge_hf.planner.make_plan``, ``planner.plan_suffix_splits``, ``planner.ForestPlan``,
    ``flashforge_hf.kernels.suffix_attention.SuffixTasks`` (plans, and the per-step re-plan the cache does),
    ``kernels.segment_attention.bind_segment_attention``, ``kernels.suffix_attention.bind_suffix_attention``,
    ``kernels.merge.bind_merge_partials`` (one kernel alone, ``--tune`` and ``--breakdown``).
    Patched through :func:`patched`, each restored on exit: ``flashforge_hf.kernels._common.FAST_LAUNCH`` (the
    host cost through Triton's own launch path); ``kernels.segment_attention.tile_config``,
    ``kernels.suffix_attention.tile_config``, ``planner.MAX_BLOCK_M``, ``planner.WAVES`` (``--tune``; also
    benchmarks/planner_waves.py)."""
    from flashforge_hf import planner
    from flashforge_hf.forest_attention import forest_attention
    from flashforge_hf.kernels import _common, merge, segment_attention, suffix_attention

    return SimpleNamespace(forest_attention=forest_attention, planner=planner, ForestPlan=planner.ForestPlan,
                           SuffixTasks=suffix_attention.SuffixTasks, launch=_common,
                           segment_attention=segment_attention, suffix_attention=suffix_attention, merge=merge)


FF = flashforge_internals()


@contextlib.contextmanager
def patched(owner, **values):
    """Set attributes of ``owner`` (one of :data:`FF`'s modules) for the block, then restore them."""
    saved = {k: getattr(owner, k) for k in values}
    for k, v in values.items():
        setattr(owner, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(owner, k, v)


HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
N_LAYERS = 32  # layers per forward for the planner's share (Llama-3-8B: Hq=32, Hkv=8, D=128, 32 layers)
TOLERANCE = 1e-2  # relative error vs float32 math allowed for bf16 inputs

@dataclass(frozen=True)
class Case:
    """One decode step's forest: segment lengths, each row's path of segments, each row's suffix length."""

    name: str
    seg_len: tuple
    paths: tuple
    suffix: int

    @property
    def batch(self) -> int:
        return len(self.paths)

    def unique_kv_tokens(self) -> int:
        return sum(self.seg_len) + self.batch * self.suffix

    def prefix_per_row(self) -> int:
        return max(sum(self.seg_len[s] for s in p) for p in self.paths)

    def nbytes(self) -> int:
        """Bytes one call moves at the least: the unique K/V (each segment once, each row's suffix) plus q and out."""
        return self.unique_kv_tokens() * HKV * D * 2 * 2 + 2 * self.batch * HQ * D * 2

    def flops(self) -> int:
        """FLOPs of the layer: 4 * Hq * D per row and key (QK^T and PV, a multiply and an add each), over every
        row's prefix + suffix: 4 * B * Hq * (P + S) * D where all rows are as long."""
        return 4 * HQ * D * sum(sum(self.seg_len[s] for s in p) + self.suffix for p in self.paths)


def shared_case(batch: int, prefix: int, suffix: int) -> Case:
    return Case(f"{batch}x{prefix}+{suffix}", (prefix,), ((0,),) * batch, suffix)


def tree_case(system=1024, docs=8, doc_len=2048, rows_per_doc=8, suffix=64) -> Case:
    """Three levels: a system prompt shared by all rows, ``docs`` documents each shared by its rows, suffixes."""
    paths = tuple((0, 1 + r // rows_per_doc) for r in range(docs * rows_per_doc))
    return Case(f"tree {system}/{docs}x{doc_len}/{rows_per_doc}+{suffix}", (system,) + (doc_len,) * docs, paths,
                suffix)


def distinct_case(rows=64, prefix=1024, suffix=64) -> Case:
    """No sharing: every row's prefix is its own segment."""
    return Case(f"distinct {rows}x{prefix}+{suffix}", (prefix,) * rows, tuple((r,) for r in range(rows)), suffix)


CASES = [shared_case(*c) for c in [(8, 1024, 100), (16, 2048, 128), (32, 4096, 256), (64, 4096, 128),
                                   (64, 16384, 512), (128, 8192, 256), (128, 32768, 1024), (256, 4096, 64)]]
CASES += [tree_case(), distinct_case()]


@dataclass
class Layer:
    """One layer's tensors for forest_attention, and the forest they describe."""

    q: torch.Tensor  # [B, Hq, 1, D], a transposed view of [B, 1, Hq, D]
    seg_k: torch.Tensor  # [Hkv, T, D]
    seg_v: torch.Tensor
    suf_k: torch.Tensor  # [B, Hkv, suffix, D]
    suf_v: torch.Tensor
    paths: list
    seg_start: list
    seg_len: list
    suffix: int

    def clone(self) -> "Layer":
        tensors = {k: getattr(self, k).clone() for k in ("seg_k", "seg_v", "suf_k", "suf_v")}
        q = self.q.transpose(1, 2).clone().transpose(1, 2)
        return Layer(q, **tensors, paths=self.paths, seg_start=self.seg_start, seg_len=self.seg_len,
                     suffix=self.suffix)

    def path_kv(self, path):
        """(k, v) [Hkv, L, D] of a path's segments, concatenated."""
        ranges = [(self.seg_start[s], self.seg_start[s] + self.seg_len[s]) for s in path]
        return tuple(torch.cat([x[:, a:b] for a, b in ranges], dim=1) for x in (self.seg_k, self.seg_v))

    def materialise(self, suffix: bool):
        """(k, v) [B, Hkv, L (+ suffix), D]: each row's path (then its suffix) copied out; paths of equal length."""
        B, L = len(self.paths), sum(self.seg_len[s] for s in self.paths[0])
        k, v = (torch.empty(B, HKV, L + (self.suffix if suffix else 0), D, dtype=DTYPE, device=self.q.device)
                for _ in range(2))
        groups: dict = {}
        for r, p in enumerate(self.paths):
            groups.setdefault(tuple(p), []).append(r)
        for path, rows in groups.items():
            pk, pv = self.path_kv(path)
            assert pk.shape[1] == L, "materialise needs paths of equal length"
            rows_t = torch.tensor(rows, device=self.q.device)
            k[rows_t, :, :L] = pk.unsqueeze(0).expand(len(rows), -1, -1, -1)
            v[rows_t, :, :L] = pv.unsqueeze(0).expand(len(rows), -1, -1, -1)
        if suffix:
            k[:, :, L:] = self.suf_k
            v[:, :, L:] = self.suf_v
        return k, v

    def private(self) -> "Layer":
        """The same attention with nothing shared: row r's path copied into its own segment r."""
        k, v = self.materialise(suffix=False)
        B, _, L, _ = k.shape
        k, v = (x.transpose(0, 1).reshape(HKV, B * L, D) for x in (k, v))
        return Layer(self.q, k, v, self.suf_k, self.suf_v, [[r] for r in range(B)], [r * L for r in range(B)],
                     [L] * B, self.suffix)

    def plan(self):
        """The planner's plan of this forest (a ForestPlan)."""
        start = torch.zeros(len(self.paths), dtype=torch.int32, device=self.q.device)
        return FF.planner.make_plan(self.paths, self.seg_start, self.seg_len, start, self.suffix, 1, HQ // HKV, HKV, D,
                                 self.q.element_size(), self.q.device)


def make_layer(case: Case, gen: torch.Generator, device) -> Layer:
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=DTYPE)  # noqa: E731
    T = sum(case.seg_len)
    q = randn(case.batch, 1, HQ, D).transpose(1, 2)
    return Layer(q, randn(HKV, T, D), randn(HKV, T, D), randn(case.batch, HKV, case.suffix, D),
                 randn(case.batch, HKV, case.suffix, D), [list(p) for p in case.paths],
                 [sum(case.seg_len[:s]) for s in range(len(case.seg_len))], list(case.seg_len), case.suffix)


def reference(layer: Layer) -> torch.Tensor:
    """[B, 1, Hq, D] float32 attention of each row over its path's segments then its suffix."""
    G = HQ // HKV
    B = layer.q.shape[0]
    out = torch.empty(B, 1, HQ, D, dtype=torch.float32, device=layer.q.device)
    groups: dict = {}
    for r, p in enumerate(layer.paths):
        groups.setdefault(tuple(p), []).append(r)
    for path, rows in groups.items():
        rows_t = torch.tensor(rows, device=layer.q.device)
        pk, pv = (x.float() for x in layer.path_kv(path))
        q = layer.q[rows_t, :, 0].float().view(len(rows), HKV, G, D) * D ** -0.5
        sk, sv = layer.suf_k[rows_t].float(), layer.suf_v[rows_t].float()
        s = torch.cat([torch.einsum("nhgd,hld->nhgl", q, pk), torch.einsum("nhgd,nhld->nhgl", q, sk)], dim=-1)
        p = torch.softmax(s, dim=-1)
        L = pk.shape[1]
        o = torch.einsum("nhgl,hld->nhgd", p[..., :L], pv) + torch.einsum("nhgl,nhld->nhgd", p[..., L:], sv)
        out[rows_t, 0] = o.reshape(len(rows), HQ, D)
    return out


def ours_calls(layer: Layer, copies: int):
    """(calls over rotated input copies, the plan, the first copy's output)."""
    plan = layer.plan()
    layers = [layer] + [layer.clone() for _ in range(copies - 1)]
    outs = [torch.empty(layer.q.shape[0], 1, HQ, D, dtype=DTYPE, device=layer.q.device) for _ in layers]
    calls = [lambda x=x, o=o: FF.forest_attention(x.q, x.seg_k, x.seg_v, x.suf_k, x.suf_v, plan, D ** -0.5, out=o)
             for x, o in zip(layers, outs)]
    return calls, plan, outs[0]


def sdpa_calls(layer: Layer, copies: int):
    """(calls over rotated copies of the materialised KV, a function giving the first copy's output)."""
    kv = [(layer.q if c == 0 else layer.q.clone(), *layer.materialise(suffix=True)) for c in range(copies)]
    calls = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for q, k, v in kv]
    return calls, lambda: calls[0]().transpose(1, 2)


def planner_cost(layer: Layer) -> dict:
    """Host us of make_plan (a new forest: prefill, or the first decode step) and of the per-step re-plan the
    cache does while decoding (segment tables kept, suffix splits redone), each median of 200."""
    plan = layer.plan()
    R = len(layer.paths)
    dev = layer.q.device

    def replan():
        split_len, n_splits = FF.planner.plan_suffix_splits(R, HKV, layer.suffix, 1, dev)
        slot0 = plan.suffix.slot0
        return FF.ForestPlan(plan.segments, FF.SuffixTasks(plan.suffix.start, slot0, plan.suffix.end, split_len, n_splits),
                          plan.row_slot_off, slot0 + n_splits * R, 1)

    return dict(make_plan_us=host_us(layer.plan, n=200, repeats=3), replan_us=host_us(replan, n=200, repeats=3))


def layer_call_host_us(gen) -> dict:
    """Host us of one forest_attention call with the plan's launches bound (tiny shapes, so the GPU keeps up; a
    shared segment, so three launches: segment, suffix, merge): one suffix split, several, and one split through
    Triton's own launch path."""
    layer = make_layer(shared_case(4, 256, 16), gen, "cuda")
    res = {}
    for label, split, fast in (("one suffix split", False, True), ("split suffix", True, True),
                               ("one suffix split, triton launch path", False, False)):
        plan = layer.plan()
        if split:
            plan = FF.ForestPlan(plan.segments, FF.SuffixTasks(plan.suffix.start, plan.suffix.slot0, plan.suffix.end, 8, 2),
                              plan.row_slot_off, plan.suffix.slot0 + 2 * 4, 1)
        out = torch.empty(4, 1, HQ, D, dtype=DTYPE, device="cuda")
        with patched(FF.launch, FAST_LAUNCH=fast):
            res[label] = host_us(lambda: FF.forest_attention(layer.q, layer.seg_k, layer.seg_v, layer.suf_k,
                                                             layer.suf_v, plan, D ** -0.5, out=out))
    return res


# ---- FlashInfer, on the same inputs and with the same timer -----------------------------------------------------
PAGE = 16  # FlashInfer's page size (tokens)
SCALE = D ** -0.5
FLASHINFER_PATHS = {
    "fi-cascade": "MultiLevelCascadeAttentionWrapper, 2 levels: the prefix every row shares, then each row's rest",
    "fi-shared-prefix": "BatchDecodeWithSharedPrefixPagedKVCacheWrapper: the shared prefix as one tensor, the rest "
                        "paged (no CUDA-graph option: the eager wrapper is captured; planned through its inner "
                        "decode wrapper, as begin_forward would leave q float16)",
    "fi-manual-prefill": "single_prefill_with_kv_cache on the shared prefix (the rows' queries stacked) + "
                         "BatchDecodeWithPagedKVCacheWrapper on each row's rest + merge_state",
    "fi-manual-decode": "single_decode_with_kv_cache on the shared prefix (the rows' heads stacked, tensor cores) + "
                        "BatchDecodeWithPagedKVCacheWrapper on each row's rest + merge_state",
    "fi-decode-tc": "BatchDecodeWithPagedKVCacheWrapper, use_tensor_cores=True: every row's whole prefix + suffix "
                    "in pages (shared pages referenced by every row, stored once)",
    "fi-decode": "BatchDecodeWithPagedKVCacheWrapper, use_tensor_cores=False, the same pages",
}
NEEDS_SHARED = ("fi-cascade", "fi-shared-prefix", "fi-manual-prefill", "fi-manual-decode")
NOT_INSTALLED, FAILED, CHECK_FAILED, NO_SHARED = "not installed", "failed", "check failed", "n/a"


def import_flashinfer():
    """``(flashinfer, None)``, or ``(None, reason)`` when it is not importable (CPU, CI; on a GPU machine source
    FlashInfer's setup.sh first)."""
    try:
        import flashinfer
    except Exception as e:  # ImportError, or what it raises while loading on a machine it cannot run on
        return None, f"{type(e).__name__}: {e}"
    return flashinfer, None


@dataclass
class PagedLayer:
    """One layer's tensors as FlashInfer takes them, the same values as a :class:`Layer`.

    q [B, Hq, D] bf16; kv [pages, 2, Hkv, PAGE, D] bf16 (layout "HND"): each segment's pages, then each row's
    suffix pages (the last one zero-padded); k_shared, v_shared [Hkv, P, D] bf16: the segment every row's path
    starts with, contiguous (None when the rows share no first segment)."""

    q: torch.Tensor
    kv: torch.Tensor
    k_shared: torch.Tensor | None
    v_shared: torch.Tensor | None

    def clone(self) -> "PagedLayer":
        return PagedLayer(*(None if t is None else t.clone() for t in (self.q, self.kv, self.k_shared, self.v_shared)))


@dataclass
class PageTables:
    """Page tables over :class:`PagedLayer`'s pages, each ``(indptr [n + 1], indices, last_page_len [n])`` int32
    on the device: ``full``, each row's whole path and suffix; ``rest``, each row's path after the shared first
    segment, then its suffix; ``shared``, one request: the shared segment (None without one)."""

    full: tuple
    rest: tuple | None
    shared: tuple | None


def page_layout(layer: Layer) -> tuple[PagedLayer, PageTables]:
    """``layer`` in FlashInfer's paged layout; raises ValueError where a segment is not a whole number of pages
    (only a row's last page, its suffix's, may be partial)."""
    if any(n % PAGE for n in layer.seg_len) or layer.suffix < 1:
        raise ValueError(f"the paged layout needs segments of whole pages ({PAGE} tokens) and a suffix of at least "
                         f"one token: segments {layer.seg_len}, suffix {layer.suffix}")
    B, dev = len(layer.paths), layer.q.device
    suf_pages = -(-layer.suffix // PAGE)
    pad = suf_pages * PAGE - layer.suffix

    def pages(seg, suf):
        segs = [seg[:, a:a + n].reshape(HKV, n // PAGE, PAGE, D).transpose(0, 1)
                for a, n in zip(layer.seg_start, layer.seg_len)]
        suf = F.pad(suf, (0, 0, 0, pad)).reshape(B, HKV, suf_pages, PAGE, D).transpose(1, 2)
        return torch.cat(segs + [suf.reshape(B * suf_pages, HKV, PAGE, D)])

    kv = torch.stack([pages(layer.seg_k, layer.suf_k), pages(layer.seg_v, layer.suf_v)], dim=1).contiguous()
    first = [0]
    for n in layer.seg_len:
        first.append(first[-1] + n // PAGE)
    seg_pages = [list(range(first[s], first[s + 1])) for s in range(len(layer.seg_len))]
    row_suffix = [list(range(first[-1] + r * suf_pages, first[-1] + (r + 1) * suf_pages)) for r in range(B)]

    def table(requests):  # [(page ids, tokens)]
        indptr = [0] + list(itertools.accumulate(len(p) for p, _ in requests))
        last = [n - (len(p) - 1) * PAGE for p, n in requests]
        return tuple(torch.tensor(x, dtype=torch.int32, device=dev)
                     for x in (indptr, [i for p, _ in requests for i in p], last))

    def rows(skip):
        return table([(sum((seg_pages[s] for s in p[skip:]), []) + row_suffix[r],
                       sum(layer.seg_len[s] for s in p[skip:]) + layer.suffix) for r, p in enumerate(layer.paths)])

    q = layer.q[:, :, 0].contiguous()
    s0 = layer.paths[0][0]
    if not all(p[0] == s0 for p in layer.paths):
        return PagedLayer(q, kv, None, None), PageTables(rows(0), None, None)
    a, n = layer.seg_start[s0], layer.seg_len[s0]
    shared = [x[:, a:a + n].contiguous() for x in (layer.seg_k, layer.seg_v)]
    return PagedLayer(q, kv, *shared), PageTables(rows(0), rows(1), table([(seg_pages[s0], n)]))


def _workspace(device) -> torch.Tensor:
    return torch.zeros(128 * 2**20, dtype=torch.uint8, device=device)  # FlashInfer's recommended size, zeroed


def _decode_wrapper(fi, table, graph: bool, tensor_cores: bool = False):
    """A planned BatchDecodeWithPagedKVCacheWrapper over ``table`` (``graph``: with the fixed buffers capture needs)."""
    indptr, indices, last = table
    kw = dict(use_cuda_graph=True, paged_kv_indptr_buffer=torch.empty_like(indptr),
              paged_kv_indices_buffer=torch.empty_like(indices),
              paged_kv_last_page_len_buffer=torch.empty_like(last)) if graph else {}
    w = fi.BatchDecodeWithPagedKVCacheWrapper(_workspace(indptr.device), "HND", use_tensor_cores=tensor_cores, **kw)
    plan = lambda: w.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type=DTYPE,  # noqa: E731
                          kv_data_type=DTYPE, sm_scale=SCALE)
    plan()
    return w, plan


def _cascade(fi, t: PageTables, graph: bool):
    B = t.rest[0].numel() - 1
    dev = t.rest[0].device
    qo = [torch.tensor([0, B], dtype=torch.int32, device=dev), torch.arange(B + 1, dtype=torch.int32, device=dev)]
    levels = [t.shared, t.rest]
    kw = dict(use_cuda_graph=True, qo_indptr_buf_arr=[torch.empty_like(x) for x in qo],
              **{name: [torch.empty_like(level[i]) for level in levels] for i, name in enumerate(
                  ("paged_kv_indptr_buf_arr", "paged_kv_indices_buf_arr", "paged_kv_last_page_len_buf_arr"))}
              ) if graph else {}
    w = fi.MultiLevelCascadeAttentionWrapper(2, _workspace(dev), "HND", **kw)
    plan = lambda: w.plan(qo, *([level[i] for level in levels] for i in range(3)), HQ, HKV, D, PAGE,  # noqa: E731
                          sm_scale=SCALE, q_data_type=DTYPE, kv_data_type=DTYPE)
    plan()
    return lambda x: w.run(x.q, x.kv), plan


def _shared_prefix(fi, t: PageTables, graph: bool):
    """Planned through its inner decode wrapper, as begin_forward does: begin_forward's data_type sets only the KV
    dtype there (q stays float16, and a bf16 q fails run's dtype check)."""
    w = fi.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(_workspace(t.rest[0].device), "HND")
    plan = lambda: w._batch_decode_wrapper.plan(*t.rest, HQ, HKV, D, PAGE, q_data_type=DTYPE,  # noqa: E731
                                                kv_data_type=DTYPE)
    plan()
    return lambda x: w.forward(x.q, x.k_shared, x.v_shared, x.kv), plan


def _manual(fi, t: PageTables, graph: bool, stacked: str):
    """The cascade by hand: the shared prefix for all rows in one call (``stacked`` "prefill": the B queries as a
    prefill of B tokens; "decode": the B rows' heads as one request's heads, grouped per KV head), each row's
    rest by the batch decode wrapper, both merged (FlashInfer's LSEs are base 2 on both sides)."""
    w, plan = _decode_wrapper(fi, t.rest, graph)
    G = HQ // HKV

    def shared(x):
        if stacked == "prefill":
            return fi.single_prefill_with_kv_cache(x.q, x.k_shared, x.v_shared, kv_layout="HND", sm_scale=SCALE,
                                                   return_lse=True)
        B = x.q.shape[0]
        q = x.q.view(B, HKV, G, D).transpose(0, 1).reshape(HKV * B * G, D)
        o, lse = fi.single_decode_with_kv_cache(q, x.k_shared, x.v_shared, kv_layout="HND", use_tensor_cores=True,
                                                sm_scale=SCALE, return_lse=True)
        return (o.view(HKV, B, G, D).transpose(0, 1).reshape(B, HQ, D),
                lse.view(HKV, B, G).transpose(0, 1).reshape(B, HQ))

    def call(x):
        o_shared, lse_shared = shared(x)
        o_rest, lse_rest = w.run(x.q, x.kv, return_lse=True)
        return fi.merge_state(o_shared, lse_shared, o_rest, lse_rest)[0]

    return call, plan


def _flat(fi, t: PageTables, graph: bool, tensor_cores: bool):
    w, plan = _decode_wrapper(fi, t.full, graph, tensor_cores)
    return lambda x: w.run(x.q, x.kv), plan


FLASHINFER_BUILDERS = {
    "fi-cascade": _cascade, "fi-shared-prefix": _shared_prefix,
    "fi-manual-prefill": lambda fi, t, graph: _manual(fi, t, graph, "prefill"),
    "fi-manual-decode": lambda fi, t, graph: _manual(fi, t, graph, "decode"),
    "fi-decode-tc": lambda fi, t, graph: _flat(fi, t, graph, True),
    "fi-decode": lambda fi, t, graph: _flat(fi, t, graph, False),
}


def worst_err(errs: list[float]) -> float:
    """The largest of ``errs``, NaN where any is NaN (``max`` keeps a NaN only where it comes first)."""
    return float("nan") if any(e != e for e in errs) else max(errs)


def flashinfer_rows(layer: Layer, ref: torch.Tensor, base: dict, rep_ms: int, fi, copies: int,
                    reported: set) -> list[dict]:
    """One row per FlashInfer path (:data:`FLASHINFER_PATHS`) on ``layer``'s values: each path's output (eager and
    the wrapper made for CUDA graphs) checked against ``ref`` [B, 1, Hq, D] float32 within TOLERANCE, then
    timed by :func:`time_calls` over ``copies`` rotated input copies (graph: ``graph_us``), and its plan() host
    time. ``status`` says "ok", "not installed" (``fi`` None), "n/a" (no prefix shared by all rows),
    "check failed" (not timed) or "failed" (raised; the error is printed once per path and message, collected
    in ``reported``)."""
    rows = [dict(base, method=p, status=NOT_INSTALLED if fi is None else "ok") for p in FLASHINFER_PATHS]
    if fi is None:
        return rows
    paged, tables = page_layout(layer)
    inputs = [paged] + [paged.clone() for _ in range(copies - 1)]
    for row in rows:
        path = row["method"]
        if path in NEEDS_SHARED and tables.shared is None:
            row["status"] = NO_SHARED
            continue
        try:
            run, plan = FLASHINFER_BUILDERS[path](fi, tables, False)
            run_graph, _ = FLASHINFER_BUILDERS[path](fi, tables, True)
            err = worst_err([rel_err(f(paged), ref[:, 0]) for f in (run, run_graph)])
            row["rel_err"] = err
            if not err <= TOLERANCE:
                print(f"{base['case']} {path}: relative error {err:.3g} > {TOLERANCE}: not timed", flush=True)
                row["status"] = CHECK_FAILED
                continue
            t = time_calls([lambda x=x: run(x) for x in inputs], rep_ms, [lambda x=x: run_graph(x) for x in inputs])
            row.update(t, plan_us=host_us(plan, n=20, repeats=3))
        except Exception as e:  # one path failing must not stop the others or the benchmark
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if (path, message) not in reported:
                reported.add((path, message))
                print(f"{base['case']} {path}: failed: {message}", flush=True)
            row["status"] = FAILED
        finally:
            torch.cuda.empty_cache()
    return rows


def finish_case(rows: list[dict]) -> None:
    """One case's rows, completed: time over the floor, speedups over SDPA (ok rows), and on ours' row the
    fastest FlashInfer path (by graph replay) and its time over ours'."""
    by = {r["method"]: r for r in rows}
    sdpa, ours = by["sdpa"], by["ours"]
    for r in rows:
        if r["status"] == "ok":
            r["graph_over_floor"] = r["graph_us"] / r["floor_us"]
            r["speedup_vs_sdpa_eager"] = sdpa["eager_us"] / r["eager_us"]
            r["speedup_vs_sdpa_graph"] = sdpa["graph_us"] / r["graph_us"]
    ran = [r for r in rows if r["method"] in FLASHINFER_PATHS and r["status"] == "ok"]
    if ran:
        best = min(ran, key=lambda r: r["graph_us"])
        ours.update(fi_fastest=best["method"], fi_fastest_graph_us=best["graph_us"],
                    fi_fastest_over_ours_graph=best["graph_us"] / ours["graph_us"])
    else:
        statuses = {r["status"] for r in rows if r["method"] in FLASHINFER_PATHS}
        ours["fi_fastest"] = NOT_INSTALLED if statuses == {NOT_INSTALLED} else "none ran"
    if "make_plan_us" in ours:
        forward_us = N_LAYERS * ours["eager_us"]
        ours.update(make_plan_share=ours["make_plan_us"] / forward_us, replan_share=ours["replan_us"] / forward_us)


def run_attention_benchmark(cases=None, rep_ms: int = 100, seed: int = 0, on_case=None) -> list[dict]:
    """Benchmark ``cases`` (names or Case objects; default: all of CASES) on the current CUDA device: ours, ours
    with sharing off, SDPA and every FlashInfer path on the same inputs. ``on_case(rows)``, if given, is called
    with the rows so far after each case (the command line writes its results files there, so that a run stopped
    at a time limit keeps the cases it finished).

    Returns one dict per (case, method) with ``status``, the timings (us), both floor terms and the floor (the
    larger), ratios, errors and the planner's cost; raises if ours or SDPA is off by more than TOLERANCE (a
    FlashInfer path that is is reported and not timed)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the attention benchmark needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    by_name = {c.name: c for c in CASES}
    cases = [by_name[c] if isinstance(c, str) else c for c in (cases or CASES)]
    ceilings = card_ceilings(device)
    fi, why = import_flashinfer()
    if fi is None:
        print(f"FlashInfer not importable ({why}): its rows say {NOT_INSTALLED!r}", flush=True)
    reported: set = set()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for case in cases:
        layer = make_layer(case, gen, "cuda")
        ref = reference(layer)
        floor = floor_terms(ceilings, case.nbytes(), case.flops())
        unique = case.unique_kv_tokens() * HKV * D * 4
        materialised = sum(case.prefix_per_row() + case.suffix for _ in case.paths) * HKV * D * 4
        base = dict(case=case.name, batch=case.batch, prefix=case.prefix_per_row(), suffix=case.suffix,
                    floor_us=floor["floor"], floor_bytes_us=floor["floor_bytes"], floor_flops_us=floor["floor_flops"])
        case_rows = []
        for method in ("ours", "ours-private", "sdpa"):
            if method == "sdpa":
                calls, first = sdpa_calls(layer, n_copies(materialised))
                calls[0]()
                out = first()
                extra = {}
            else:
                src = layer if method == "ours" else layer.private()
                calls, plan, out = ours_calls(src, n_copies(unique if method == "ours" else materialised))
                calls[0]()
                extra = dict(segment_tasks=len(plan.segments.host) if plan.segments else 0,
                             block_m=plan.segments.block_m if plan.segments else 0,
                             suffix_splits=plan.suffix.n_splits)
                if method == "ours":
                    extra.update(planner_cost(src))
            err = rel_err(out, ref)
            if not err <= TOLERANCE:
                raise AssertionError(f"{case.name} {method}: relative error {err:.3g} > {TOLERANCE}")
            t = time_calls(calls, rep_ms)
            del calls, out
            torch.cuda.empty_cache()
            case_rows.append(dict(base, method=method, status="ok", rel_err=err, **t, **extra))
        case_rows += flashinfer_rows(layer, ref, base, rep_ms, fi, n_copies(unique), reported)
        finish_case(case_rows)
        rows += case_rows
        if on_case is not None:
            on_case(rows)
        print(f"{case.name}: " + ", ".join(f"{r['method']} {r['eager_us']:.1f}/{r['graph_us']:.1f} us"
                                            if r["status"] == "ok" else f"{r['method']} {r['status']}"
                                            for r in case_rows)
              + f" (floor {floor['floor']:.1f}: bytes {floor['floor_bytes']:.1f}, FLOPs {floor['floor_flops']:.1f})",
              flush=True)
        del layer, ref
        torch.cuda.empty_cache()
    return rows


def _fastest(rows_by: dict, case: str, paths, key: str):
    """``(path, value)`` of the least ``key`` among ``case``'s ok rows of ``paths``, None where none ran."""
    ran = [(p, rows_by[(case, p)][key]) for p in paths if rows_by.get((case, p), {}).get("status") == "ok"]
    return min(ran, key=lambda t: t[1]) if ran else None


def targets(rows: list[dict], host: dict) -> list[str]:
    """The speed targets, each with the numbers that decide it (FlashInfer's as measured in this run; graph replay
    unless said): at most 1.5x the floor where the floor is at least 20 us; at least 2x faster than FlashInfer's
    fastest path where the prefix is 4,096 tokens or more; without sharing, within 10% of the better of SDPA and
    FlashInfer's decode; at most 40 us of host time per eager layer call."""
    lines = []
    by = {(r["case"], r["method"]): r for r in rows}
    for r in rows:
        if r["method"] != "ours":
            continue
        c = r["case"]
        if r["floor_us"] >= 20:
            ok = r["graph_over_floor"] <= 1.5
            lines.append(f"- {c}: graph {r['graph_us']:.1f} us = {r['graph_over_floor']:.2f}x floor "
                         f"{r['floor_us']:.1f} us (target <= 1.5x): {'met' if ok else 'MISSED'}")
        if r["prefix"] >= 4096 and not c.startswith("distinct"):
            fastest = _fastest(by, c, FLASHINFER_PATHS, "graph_us")
            if fastest is None:
                lines.append(f"- {c}: vs FlashInfer: not decided (no FlashInfer path ran)")
            else:
                ratio = fastest[1] / r["graph_us"]
                lines.append(f"- {c}: graph {r['graph_us']:.1f} us vs fastest FlashInfer path {fastest[0]} "
                             f"{fastest[1]:.1f} us = {ratio:.2f}x (target >= 2x): {'met' if ratio >= 2 else 'MISSED'}")
        if c.startswith("distinct"):
            best = [("SDPA", by[(c, "sdpa")]["graph_us"])]
            decode = _fastest(by, c, ("fi-decode-tc", "fi-decode"), "graph_us")
            best += [decode] if decode else []
            name, us = min(best, key=lambda t: t[1])
            ratio = r["graph_us"] / us
            lines.append(f"- {c} (no sharing): graph {r['graph_us']:.1f} us = {ratio:.2f}x the better of "
                         f"{' and '.join(n for n, _ in best)} ({name} {us:.1f} us; target <= 1.10x): "
                         f"{'met' if ratio <= 1.1 else 'MISSED'}")
    h = host["one suffix split"]
    lines.append(f"- host cost per eager layer call, launches bound: {h:.1f} us (target <= 40 us): "
                 f"{'met' if h <= 40 else 'MISSED'}")
    return lines


COLUMNS = ["case", "method", "status", "batch", "prefix", "suffix", "eager_us", "graph_us", "loop_us", "floor_us",
           "floor_bytes_us", "floor_flops_us", "graph_over_floor", "speedup_vs_sdpa_eager", "speedup_vs_sdpa_graph",
           "fi_fastest", "fi_fastest_graph_us", "fi_fastest_over_ours_graph", "plan_us", "rel_err", "segment_tasks",
           "block_m", "suffix_splits", "make_plan_us", "replan_us", "make_plan_share", "replan_share"]


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def flashinfer_table(rows: list[dict]) -> list[str]:
    """Markdown: per case, ours (graph) and each FlashInfer path's eager / graph us (or its status), the fastest
    path by graph replay and its time over ours'."""
    by = {(r["case"], r["method"]): r for r in rows}
    head = ["case", "ours graph us"] + [f"{p} eager / graph us" for p in FLASHINFER_PATHS] + \
        ["fastest FlashInfer (graph)", "fastest FlashInfer / ours (graph)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["method"] != "ours":
            continue
        cells = [r["case"], _fmt(r["graph_us"])]
        for p in FLASHINFER_PATHS:
            f = by[(r["case"], p)]
            cells.append(f"{_fmt(f['eager_us'])} / {_fmt(f['graph_us'])}" if f["status"] == "ok" else f["status"])
        ratio = r.get("fi_fastest_over_ours_graph")
        cells += [r["fi_fastest"], "" if ratio is None else f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(rows, host, stem: str, command: str, commit: str, card: str, ceilings,
                  cases_total: int | None = None) -> None:
    """``stem``.csv (every row, COLUMNS), ``stem``.md (header with the card's ceilings, tables, targets) and
    ``stem``.png (needs matplotlib). ``cases_total``: the cases the run was asked for; where ``rows`` hold fewer,
    the header says how many were measured."""
    date = utc_now()
    measured = len(dict.fromkeys(r["case"] for r in rows))
    write_csv([dict(r, card=card, date=date, commit=commit) for r in rows], stem + ".csv",
              ["card", "date", "commit"] + COLUMNS)
    shown = ["case", "method", "status", "eager_us", "graph_us", "loop_us", "floor_us", "floor_bytes_us",
             "floor_flops_us", "graph_over_floor", "speedup_vs_sdpa_eager", "rel_err"]
    lines = [f"# One attention layer, decode: {card}", "",
             f"- date: {date}", f"- git commit: {commit}", f"- command: `{command}`",
             f"- torch {torch.__version__}, triton {__import__('triton').__version__}; Hq={HQ}, Hkv={HKV}, D={D}, "
             f"bf16, one query token per row",
             f"- {ceilings.describe()}",
             *([f"- cases measured: {measured} of {cases_total} (the run stopped before the others)"]
               if cases_total is not None and measured < cases_total else []),
             "- floor: the larger of the bytes term (unique K/V + q + out bytes at the bandwidth) and the FLOPs "
             "term (4 * B * Hq * (prefix + suffix) * D at the matmul rate); graph_over_floor: graph time / floor.",
             "- eager: do_bench median (L2 flushed before each call); graph: do_bench_cudagraph median; loop: "
             "wall time per call back to back, eager (host launch cost included); inputs rotated over copies "
             f"(>= {ROTATE_BYTES / 1e6:.0f} MB cycled). speedups use eager times. ours-private: sharing disabled "
             "(each row's path copied into its own segment).",
             f"- FlashInfer: measured in this run on the same inputs with the same timer, pages of {PAGE} tokens "
             "(layout HND), each path's output checked first; graph times from wrappers made with "
             "use_cuda_graph=True, plan() outside the capture. Paths:"]
    lines += [f"  - {p}: {what}" for p, what in FLASHINFER_PATHS.items()]
    lines += ["", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in shown) + " |" for r in rows]
    lines += ["", "## FlashInfer, same inputs and timer", ""] + flashinfer_table(rows)
    lines += ["", "## Planner host cost per forward vs attention time (ours)", "",
              f"Attention per forward = {N_LAYERS} layers x eager time. make_plan: a new forest (prefill / first "
              "step); re-plan: what the cache does each decode step (segment tables kept).", "",
              "| case | make_plan us | share | re-plan us | share |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['make_plan_us']:.1f} | {100 * r['make_plan_share']:.2f}% | {r['replan_us']:.1f} | "
              f"{100 * r['replan_share']:.3f}% |" for r in rows if r["method"] == "ours"]
    lines += ["", "## Host cost of one layer call (forest_attention, plan's launches bound)", ""]
    lines += [f"- {k}: {v:.1f} us" for k, v in host.items()]
    lines += ["", "## Targets", ""] + targets(rows, host)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, stem + ".png", f"one attention layer, decode, bf16, Hq={HQ} Hkv={HKV} D={D}: {card}, commit {commit}")


def plot(rows: list[dict], path: str, title: str) -> None:
    """PNG: per case, time over the floor (graph replay) and speedup over SDPA on materialized KV (eager), for
    every method that ran. Needs matplotlib (``pip install flashforge-hf[bench]``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("The bench plot needs matplotlib: pip install matplotlib  (CSV and table were written)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {(r["case"], r["method"]): r for r in rows if r["status"] == "ok"}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(m for _, m in ran))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    width = 0.8 / len(methods)
    for ax, key, label in ((axes[0], "graph_over_floor", "graph-replay time / floor (lower is better)"),
                           (axes[1], "speedup_vs_sdpa_eager", "speedup over SDPA on per-row KV (eager)")):
        for i, m in enumerate(methods):
            vals = [ran[(c, m)][key] if (c, m) in ran else float("nan") for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], vals, width, label=m)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(cases))], cases, rotation=35, ha="right",
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[0].axhline(1.5, color="red", linewidth=0.8, linestyle="--", label="target 1.5x")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seg_kernel(layer: Layer):
    """The segment kernel of ``layer``'s plan alone, bound: a call launches it once."""
    plan = layer.plan()
    o, lse = plan.partial_buffers(HQ, D, "cuda")
    f = FF.segment_attention.bind_segment_attention(layer.q, layer.seg_k, layer.seg_v, plan.segments, o, lse,
                                                    D ** -0.5)
    return lambda: f(layer.q, layer.seg_k, layer.seg_v)


def suf_kernel(layer: Layer, merged: bool | None = None):
    """The suffix kernel of ``layer``'s plan alone, bound (merging the row's partials where ``merged``; default:
    where the plan has one split)."""
    plan = layer.plan()
    o, lse = plan.partial_buffers(HQ, D, "cuda")
    out = torch.empty(layer.q.shape[0], 1, HQ, D, dtype=DTYPE, device="cuda")
    merged = plan.suffix.n_splits == 1 if merged is None else merged
    f = FF.suffix_attention.bind_suffix_attention(layer.q, layer.suf_k, layer.suf_v, plan.suffix, o, lse,
                                                  plan.row_slot_off, out, D ** -0.5, merged)
    return lambda: f(layer.q, layer.suf_k, layer.suf_v, out, layer.q, layer.q)


def merge_kernel(layer: Layer):
    """The merge kernel of ``layer``'s plan alone, bound."""
    plan = layer.plan()
    o, lse = plan.partial_buffers(HQ, D, "cuda")
    o.normal_()
    lse.normal_()
    out = torch.empty(layer.q.shape[0], 1, HQ, D, dtype=DTYPE, device="cuda")
    f = FF.merge.bind_merge_partials(o, lse, plan.row_slot_off, plan.suffix.slot0, plan.suffix.n_splits, out)
    return lambda: f(out)


def breakdown(cases=None, rep_ms: int = 50, seed: int = 0) -> list[dict]:
    """Where one layer's time goes: per case, graph-replay median us of each kernel alone (segment, suffix
    unmerged and merged, merge) and of the whole layer (graph, eager), with the bytes and FLOPs each kernel must
    move and do (K/V, queries and outputs, float32 partials written and read) and the rates that gives. One copy
    of the inputs, not rotated: cases smaller than the L2 read partly from it. Prints a table; returns one dict per
    (case, part)."""
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(seed)
    by_name = {c.name: c for c in CASES}
    ceilings = card_ceilings(torch.device("cuda", torch.cuda.current_device()))
    res = []
    for case in [by_name[c] for c in (cases or [c.name for c in CASES])]:
        layer = make_layer(case, gen, "cuda")
        plan = layer.plan()
        B = case.batch
        slot = HQ * (D + 1) * 4  # one partial slot of one query token: float32 output and LSE per query head
        q_out = 2 * B * HQ * D * 2  # the queries read, the output written (bf16)
        seg_bytes = sum(case.seg_len) * HKV * D * 2 * 2 + plan.suffix.slot0 * slot
        suf_bytes = B * case.suffix * HKV * D * 2 * 2 + q_out
        suf_flops = 4 * HQ * D * B * case.suffix
        seg_flops = case.flops() - suf_flops
        parts = []
        if plan.segments is not None:
            parts.append(("segment", seg_kernel(layer), seg_bytes, seg_flops))
        parts.append(("suffix-unmerged", suf_kernel(layer, merged=False),
                      suf_bytes + plan.suffix.n_splits * B * slot, suf_flops))
        if plan.suffix.n_splits == 1:
            parts.append(("suffix-merged", suf_kernel(layer, merged=True), suf_bytes + plan.suffix.slot0 * slot,
                          suf_flops))
        parts.append(("merge", merge_kernel(layer), plan.n_slots * slot + B * HQ * D * 2, 0))
        calls, _, _ = ours_calls(layer, 1)
        parts.append(("layer", calls[0], case.nbytes(), case.flops()))
        for part, fn, nbytes, flops in parts:
            fn()
            us = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3
            row = dict(case=case.name, part=part, graph_us=us, bytes=nbytes, flops=flops,
                       tb_s=nbytes / us / 1e6, tflop_s=flops / us / 1e6,
                       floor_us=max(ceilings.floor_s(nbytes, flops)) * 1e6,
                       segment_tasks=len(plan.segments.host) if plan.segments else 0,
                       block_m=plan.segments.block_m if plan.segments else 0, splits=plan.suffix.n_splits)
            if part == "layer":
                row["eager_us"] = triton.testing.do_bench(fn, rep=rep_ms, return_mode="median") * 1e3
            res.append(row)
            print(f"{case.name:22s} {part:16s} {us:8.1f} us  {row['tb_s']:5.2f} TB/s {row['tflop_s']:6.1f} TFLOP/s  "
                  f"floor {row['floor_us']:7.1f} us  tasks {row['segment_tasks']} bm {row['block_m']} "
                  f"splits {row['splits']}" + (f"  eager {row['eager_us']:.1f} us" if part == "layer" else ""),
                  flush=True)
        del layer, parts, calls
        torch.cuda.empty_cache()
    return res


TUNE_PARTS = ("segment", "suffix", "layer")


def tune(rep_ms: int = 20, seed: int = 0, parts=TUNE_PARTS, cases=None) -> list[dict]:
    """Sweep the kernels' tile configurations (graph-replay median us) on the cases that decide them. ``parts``:
    "segment" (the segment kernel alone, many stacked queries: compute-bound; with the planner's waves), "suffix"
    (the segment kernel with one row per segment and the merged suffix kernel alone: memory-bound), "layer" (the
    whole layer, graph-replayed, on the shared cases: the segment kernel's tiles and waves decide how much of the
    card the suffix kernel gets beside it). ``cases``: the shared cases of "segment" and "layer" (default: the three
    largest). Prints and returns one dict per measurement."""
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(seed)
    by_name = {c.name: c for c in CASES}
    res = []

    def bench(kind, case, cfg, layer, make):
        try:
            fn = make(layer)
            fn()
            us = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3
        except Exception as e:  # a configuration that does not fit (shared memory) is reported, not fatal
            us = float("nan")
            print(f"{kind} {case} {cfg}: {type(e).__name__}: {str(e)[:120]}")
        res.append(dict(kind=kind, case=case, config=str(cfg), us=us))
        print(f"{kind:16s} {case:18s} {str(cfg):28s} {us:9.1f} us", flush=True)

    src = torch.empty(2**29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = triton.testing.do_bench_cudagraph(lambda: dst.copy_(src), rep=rep_ms, return_mode="median") * 1e3
    print(f"device copy: {2 * src.numel() / us / 1e3:.0f} GB/s (read + write)")
    res.append(dict(kind="copy", case="512 MiB", config="", us=us))
    seg, suf, plans = FF.segment_attention, FF.suffix_attention, FF.planner
    shared = cases or ("128x32768+1024", "128x8192+256", "64x16384+512")
    big = [make_layer(by_name[n], gen, "cuda") for n in shared] if {"segment", "layer"} & set(parts) else []
    if "segment" in parts:
        configs = [c for c in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)) if c[0] == 128 or c[2] == 4]
        for bm, bn, warps, stages in configs + [(128, 64, 8, 4), (64, 64, 4, 4)]:
            with patched(plans, MAX_BLOCK_M=bm), patched(seg, tile_config=lambda m, d, c=(bn, warps, stages): c):
                for layer, name in zip(big, shared):
                    bench("segment-shared", name, (bm, bn, warps, stages), layer, seg_kernel)
        for w in (1, 2, 3, 4):
            with patched(plans, WAVES=(w,)):
                for layer, name in zip(big, shared):
                    bench("segment-shared", name, f"default, waves={w}", layer, seg_kernel)
    if "layer" in parts:
        whole = lambda layer: ours_calls(layer, 1)[0][0]  # noqa: E731
        # the default; deeper and shallower pipelines (one 4-stage program fills the shared memory that two 3-stage
        # ones share, leaving room for three suffix programs); shorter key tiles; 128-query tiles
        for bm, bn, warps, stages in [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2)]:
            for w in (1, 2):
                with patched(plans, MAX_BLOCK_M=bm, WAVES=(w,)), \
                        patched(seg, tile_config=lambda m, d, c=(bn, warps, stages): c):
                    for layer, name in zip(big, shared):
                        bench("layer", name, f"{(bm, bn, warps, stages)} waves={w}", layer, whole)
    del big
    if "suffix" not in parts:
        return res
    small = [make_layer(by_name["distinct 64x1024+64"], gen, "cuda"),
             make_layer(by_name["128x8192+256"], gen, "cuda").private()]
    mem = [(by_name[n], make_layer(by_name[n], gen, "cuda")) for n in ("128x32768+1024", "64x16384+512", "256x4096+64")]
    configs = list(itertools.product((64, 128), (4, 8), (2, 3, 4)))
    for bn, warps, stages in configs + [(32, 4, 3), (32, 4, 4), (64, 2, 3), (128, 2, 3)]:
        config = lambda m, d, c=(bn, warps, stages): c  # noqa: E731
        with patched(seg, tile_config=config):
            for layer, name in zip(small, ("distinct 64x1024+64", "private 128x8192")):
                bench("segment-private", name, (bn, warps, stages), layer, seg_kernel)
        with patched(suf, tile_config=config):
            for case, layer in mem:
                bench("suffix-merged", case.name, (bn, warps, stages), layer, suf_kernel)
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashforge-hf bench attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma-separated case names (default: all): " + "; ".join(c.name for c in CASES))
    ap.add_argument("--rep-ms", type=int, default=100, help="timing budget per measurement (ms)")
    ap.add_argument("--out", default=None, help="results file stem (default benchmarks/results/attention_<card>)")
    ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tune", nargs="?", const=",".join(TUNE_PARTS), default=None, metavar="PARTS",
                      help="sweep the kernels' tile configurations instead; PARTS: a comma-separated subset of "
                           f"{','.join(TUNE_PARTS)} (default all)")
    mode.add_argument("--breakdown", action="store_true",
                      help="time each kernel of a layer alone instead (where the time goes), for --cases")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    cases = args.cases.split(",") if args.cases else None
    names = [c.name for c in CASES]
    unknown = [name for name in cases or () if name not in names]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; the cases are: {'; '.join(names)}")
    if args.tune and not set(args.tune.split(",")) <= set(TUNE_PARTS):
        ap.error(f"--tune takes a comma-separated subset of {','.join(TUNE_PARTS)}, got {args.tune!r}")
    if args.tune or args.breakdown:
        res = tune(parts=args.tune.split(","), cases=cases) if args.tune else breakdown(cases)
        if args.out:
            write_csv(res, args.out + ".csv")
        return 0
    host = layer_call_host_us(torch.Generator(device="cuda").manual_seed(1))
    for k, v in host.items():
        print(f"host us per layer call, {k}: {v:.1f}")
    save = None
    if not args.no_write:  # rewritten after every case: a run stopped at a time limit keeps what it measured
        device = torch.device("cuda", torch.cuda.current_device())
        (card, tag), ceilings = card_name(device), card_ceilings(device)
        stem = args.out or os.path.join("benchmarks", "results", f"attention_{tag}")
        command, commit = "python benchmarks/attention.py " + " ".join(argv), args.commit or git_commit()

        def save(rows):
            write_results(rows, host, stem, command, commit, card, ceilings, len(cases or CASES))
            print(f"wrote {stem}.csv, .md and .png")
    rows = run_attention_benchmark(cases, rep_ms=args.rep_ms, on_case=save)
    for line in targets(rows, host):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
