"""Kernel tests under the Triton CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

Every launcher and every PyTorch reference is checked against a float64 ground truth computed independently:
dense attention of each row over its materialised KV (its path's segments, then its suffix columns, causal for
the new tokens). The tolerance is set by precision (error_limit): our relative error may be at most twice that
of PyTorch doing the same dense computation in the input dtype, with a floor at the rounding the computation
itself costs. Outputs start as NaN, so an unwritten element fails. The interpreter's bfloat16 dot is broken
(triton 3.9), so bf16 runs only on the GPU.
"""

import dataclasses
import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

from flashforge_hf.kernels.merge import merge_partials, merge_partials_reference
from flashforge_hf.kernels.segment_attention import SegmentTasks, segment_attention, segment_attention_reference
from flashforge_hf.kernels.suffix_attention import (SuffixTasks, suffix_attention, suffix_attention_merged,
                                                    suffix_attention_merged_reference, suffix_attention_reference)
from flashforge_hf.forest_attention import forest_attention
from flashforge_hf.planner import ONE_SPLIT, DeviceModel, ForestPlan, make_plan, plan_segments, plan_suffix_splits

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1 (tests/conftest.py)")

GARBAGE = 30.0  # scale of the values put where no kernel may read (gaps between segments, invalid columns)


@dataclass
class Forest:
    """One layer's inputs: packed segments, suffix buffers, queries, and the forest's shape as host data."""

    q: torch.Tensor  # [R, Hq, Q, D] (a transposed view of [R, Q, Hq, D], as transformers makes it)
    seg_k: torch.Tensor  # [Hkv, T, D]
    seg_v: torch.Tensor
    suf_k: torch.Tensor  # [R, Hkv, C, D]
    suf_v: torch.Tensor
    paths: list  # row -> segment ids, root first
    seg_start: list
    seg_len: list
    start: list  # row -> first valid suffix column
    end: int

    @property
    def dims(self):
        R, Hq, Q, D = self.q.shape
        return R, Hq, Q, D, self.seg_k.shape[0]


def make_forest(seed, *, R, Hkv, G, D, Q, levels, seg_lens, suffix_lens, dtype, device="cpu", roots=1,
                no_segment_rows=(), suffix_heads_inner=False):
    """Random forest: ``levels`` nested partitions of the rows (``roots`` groups at the first level), one segment
    per group and level (lengths taken from ``seg_lens`` in turn), gaps of garbage between packed segments;
    row r's suffix holds ``suffix_lens[r]`` valid columns ending at ``end`` (garbage before and after)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cuts = set(rng.sample(range(1, R), min(roots, R) - 1)) if R > 1 else set()
    paths = [[] for _ in range(R)]
    seg_start, seg_len, pos = [], [], 2
    for level in range(levels):
        if level and len(cuts) < R - 1:
            cuts.add(rng.choice([c for c in range(1, R) if c not in cuts]))
        bounds = [0, *sorted(cuts), R]
        for lo, hi in zip(bounds, bounds[1:]):
            rows = [r for r in range(lo, hi) if r not in no_segment_rows]
            if not rows:
                continue
            n = seg_lens[len(seg_len) % len(seg_lens)]
            for r in rows:
                paths[r].append(len(seg_len))
            seg_start.append(pos)
            seg_len.append(n)
            pos += n + 3
    T = pos + 1
    Hq = Hkv * G
    end = max(max(suffix_lens), Q)
    C = end + 5
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    seg_k, seg_v = randn(Hkv, T, D) * GARBAGE, randn(Hkv, T, D) * GARBAGE
    for s0, n in zip(seg_start, seg_len):
        seg_k[:, s0:s0 + n] = randn(Hkv, n, D)
        seg_v[:, s0:s0 + n] = randn(Hkv, n, D)
    start = [end - n for n in suffix_lens]
    suf = [randn(R, C, Hkv, D) * GARBAGE for _ in range(2)]
    for buf in suf:
        for r in range(R):
            buf[r, start[r]:end] = randn(end - start[r], Hkv, D)
    if suffix_heads_inner:  # [R, C, Hkv, D] storage viewed as [R, Hkv, C, D]
        suf_k, suf_v = (b.to(dtype).to(device).transpose(1, 2) for b in suf)
    else:
        suf_k, suf_v = (b.transpose(1, 2).contiguous().to(dtype).to(device) for b in suf)
    q = randn(R, Q, Hq, D).to(dtype).to(device).transpose(1, 2)
    return Forest(q, seg_k.to(dtype).to(device), seg_v.to(dtype).to(device), suf_k, suf_v, paths, seg_start,
                  seg_len, start, end)


def dense_attention(f: Forest, sm_scale, dtype):
    """(out [R, Q, Hq, D], lse [R, Q, Hq]) of each row over its materialised KV, computed in ``dtype``.

    float64 gives the ground truth; the input dtype gives PyTorch's own error for the tolerance."""
    R, Hq, Q, D, Hkv = f.dims
    G = Hq // Hkv
    out = torch.zeros(R, Q, Hq, D, dtype=torch.float64)
    lse = torch.full((R, Q, Hq), float("-inf"), dtype=torch.float64)
    for r in range(R):
        s0 = min(f.start[r], f.end)  # a start at or past end: no suffix keys (a finished row, see graphs.py)
        ks = [f.seg_k[:, f.seg_start[s]:f.seg_start[s] + f.seg_len[s]] for s in f.paths[r]]
        vs = [f.seg_v[:, f.seg_start[s]:f.seg_start[s] + f.seg_len[s]] for s in f.paths[r]]
        k = torch.cat([*ks, f.suf_k[r, :, s0:f.end]], dim=1).cpu().to(dtype)
        v = torch.cat([*vs, f.suf_v[r, :, s0:f.end]], dim=1).cpu().to(dtype)
        n_seg = k.shape[1] - (f.end - s0)
        col = torch.cat([torch.full((n_seg,), -1), torch.arange(s0, f.end)])  # segment keys: always visible
        visible = col[None, :] <= (f.end - Q + torch.arange(Q))[:, None]  # [Q, N]
        k = k.repeat_interleave(G, dim=0)  # [Hq, N, D]
        v = v.repeat_interleave(G, dim=0)
        s = (f.q[r].cpu().to(dtype) @ k.transpose(1, 2)) * sm_scale  # [Hq, Q, N]
        s = s.masked_fill(~visible, float("-inf"))
        out[r] = (torch.softmax(s, dim=-1).nan_to_num(0.0) @ v).transpose(0, 1).double()
        lse[r] = torch.logsumexp(s.double(), dim=-1).transpose(0, 1)
    return out, lse


def rel_err(x, ref):
    assert not torch.isnan(x).any(), "NaN in output (unwritten or invalid)"
    return ((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def error_limit(base_err: float, dtype: torch.dtype, D: int) -> float:
    """The largest relative error allowed in ``dtype`` for head dim ``D``, where PyTorch's dense computation in
    ``dtype`` has relative error ``base_err`` against the float64 truth: twice PyTorch's, and at least the floor
    that the precision itself sets, so that a lucky-small PyTorch error cannot make the bound tighter than the
    rounding any implementation incurs. The floor is one rounding to ``dtype`` (its epsilon) plus the rounding
    a length-D dot product accumulates in float32 or the wider input dtype (sqrt(D) epsilons: the error of the
    scores, which the softmax turns into a relative error of the output)."""
    acc = torch.promote_types(dtype, torch.float32)
    return max(2 * base_err, torch.finfo(dtype).eps + math.sqrt(D) * torch.finfo(acc).eps)


def planner_plan(f: Forest, device="cpu"):
    """(segment tasks, suffix tasks, row_slot_off, n_slots) made by flashforge_hf.planner.make_plan."""
    R, Hq, Q, D, Hkv = f.dims
    start = torch.tensor(f.start, dtype=torch.int32, device=device)
    plan = make_plan(f.paths, f.seg_start, f.seg_len, start, f.end, Q, Hq // Hkv, Hkv, D, f.q.element_size(),
                     torch.device(device))
    return plan.segments, plan.suffix, plan.row_slot_off, plan.n_slots


H100 = DeviceModel(num_sms=132, bandwidth=3.0e12, flops=4.5e14)


def gpu_plan(f: Forest, device="cpu"):
    """The planner's tables for an H100 (GPU tiles, chunked segments) on tensors of any device."""
    R, Hq, Q, D, Hkv = f.dims
    seg, off = plan_segments(f.paths, f.seg_start, f.seg_len, Q, Hq // Hkv, Hkv, D, f.q.element_size(),
                             torch.device(device), device_model=H100)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return seg, SuffixTasks(i32(f.start), off[-1], i32([f.end]), f.end, 1), i32(off), off[-1] + R


def manual_plan(f: Forest, chunk_len, block_m, split_len, seed=0, device="cpu", bound=None):
    """Tables built by hand (the CPU planner neither chunks nor splits): every segment cut into chunks of
    ``chunk_len`` keys, stacked queries tiled by ``block_m``, the suffix split every ``split_len`` columns up to
    ``bound`` (default: end; larger, as a CUDA graph's plan for a growing suffix); tasks in random order."""
    R, Hq, Q, D, Hkv = f.dims
    G = Hq // Hkv
    rows_of = {}
    for r, path in enumerate(f.paths):
        for s in path:
            rows_of.setdefault(s, []).append(r)
    n_chunks = {s: math.ceil(f.seg_len[s] / chunk_len) for s in rows_of}
    row_slot_off, base = [0], {}
    for r, path in enumerate(f.paths):
        for s in path:
            base[s, r] = row_slot_off[-1] + sum(n_chunks[p] for p in path[:path.index(s)])
        row_slot_off.append(row_slot_off[-1] + sum(n_chunks[s] for s in path))
    seg_rows, row_slot, tasks = [], [], []
    for s, rows in rows_of.items():
        rows_lo, m = len(seg_rows), len(rows) * Q * G
        seg_rows += rows
        row_slot += [base[s, r] for r in rows]
        for c in range(n_chunks[s]):
            kv_lo = f.seg_start[s] + c * chunk_len
            kv_hi = min(kv_lo + chunk_len, f.seg_start[s] + f.seg_len[s])
            tasks += [(kv_lo, kv_hi, rows_lo, m0, min(m, m0 + block_m), c) for m0 in range(0, m, block_m)]
    random.Random(seed).shuffle(tasks)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    seg = SegmentTasks(i32(tasks).reshape(-1, 6), i32(seg_rows), i32(row_slot), block_m, 16, tuple(tasks)) \
        if tasks else None
    slot0 = row_slot_off[-1]
    n_splits = math.ceil((bound or f.end) / split_len)
    suf = SuffixTasks(i32(f.start), slot0, i32([f.end]), split_len, n_splits)
    return seg, suf, i32(row_slot_off), slot0 + n_splits * R


def run_partials(f: Forest, plan, kernels: bool, dtype=None, new_kv=None):
    """(o_part, lse_part) from the launchers (or the references, on inputs cast to ``dtype``); NaN-prefilled.
    ``new_kv`` goes to the suffix launcher (or reference) as is."""
    seg, suf, _, n_slots = plan
    R, Hq, Q, D, Hkv = f.dims
    cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))  # noqa: E731
    q, seg_k, seg_v, suf_k, suf_v = (cast(x) for x in (f.q, f.seg_k, f.seg_v, f.suf_k, f.suf_v))
    o_part = torch.full((n_slots, Q, Hq, D), float("nan"), dtype=torch.float32, device=q.device)
    lse_part = torch.full((n_slots, Q, Hq), float("nan"), dtype=torch.float32, device=q.device)
    if dtype == torch.float64:
        o_part, lse_part = o_part.double(), lse_part.double()
    sm_scale = D ** -0.5
    if seg is not None:
        (segment_attention if kernels else segment_attention_reference)(q, seg_k, seg_v, seg, o_part, lse_part,
                                                                         sm_scale)
    (suffix_attention if kernels else suffix_attention_reference)(q, suf_k, suf_v, suf, o_part, lse_part, sm_scale,
                                                                   new_kv)
    return o_part, lse_part


def merged_lse(lse_part, row_slot_off, suf: SuffixTasks, R):
    """[R, Q, Hq] float64 log-sum-exp over each row's partial slots."""
    bounds = row_slot_off.tolist()
    return torch.stack([
        torch.logsumexp(lse_part[list(range(bounds[r], bounds[r + 1]))
                                 + [suf.slot0 + j * R + r for j in range(suf.n_splits)]].double().cpu(), dim=0)
        for r in range(R)])


def check_forest(f: Forest, plan, dtype):
    """Kernels and references vs the float64 truth, under the 2x-PyTorch-error rule."""
    R, Hq, Q, D, Hkv = f.dims
    sm_scale = D ** -0.5
    truth, truth_lse = dense_attention(f, sm_scale, torch.float64)
    base, base_lse = dense_attention(f, sm_scale, dtype)
    limit = error_limit(rel_err(base, truth), dtype, D)
    finite = torch.isfinite(truth_lse)
    lse_scale = truth_lse[finite].abs().max().item()  # the LSE errors are absolute: the same rule relative to this
    lse_limit = lse_scale * error_limit((base_lse - truth_lse)[finite].abs().max().item() / lse_scale, dtype, D)
    seg, suf, row_slot_off, n_slots = plan

    # Launchers: partials (every slot written, empty ones exactly (0, -inf)), their LSE, then both merges.
    o_part, lse_part = run_partials(f, plan, kernels=True)
    assert not torch.isnan(o_part).any() and not torch.isnan(lse_part).any(), "a partial slot was not written"
    assert (o_part[torch.isneginf(lse_part)] == 0).all(), "an empty partial has o != 0"
    lse = merged_lse(lse_part, row_slot_off, suf, R)
    assert torch.equal(torch.isfinite(lse), finite), "queries with / without keys differ from the truth"
    assert (lse - truth_lse)[finite].abs().max().item() <= lse_limit
    dev = f.q.device
    out64 = torch.empty(R, Q, Hq, D, dtype=torch.float64, device=dev)
    merge_partials_reference(o_part.double(), lse_part.double(), row_slot_off, suf.slot0, suf.n_splits, out64)
    assert rel_err(out64, truth) <= limit, "segment/suffix kernels vs truth"
    out = torch.full((R, Hq, Q, D), float("nan"), dtype=dtype, device=dev).transpose(1, 2)  # non-contiguous
    merge_partials(o_part, lse_part, row_slot_off, suf.slot0, suf.n_splits, out)
    err = rel_err(out, truth)
    assert err <= limit, f"kernel pipeline error {err:.3g} > {limit:.3g}"

    # One split: the suffix kernel merging the segment partials itself, never reading (nor writing) the
    # suffix slots, bit for bit the merge kernel's output (what eager and captured layers rely on, forest_attention.py);
    # its reference, exact in float64.
    if suf.n_splits == 1:
        o_m, lse_m = o_part.clone(), lse_part.clone()
        o_m[suf.slot0:], lse_m[suf.slot0:] = float("nan"), float("nan")
        out_m = torch.full((R, Hq, Q, D), float("nan"), dtype=dtype, device=dev).transpose(1, 2)
        suffix_attention_merged(f.q, f.suf_k, f.suf_v, suf, o_m, lse_m, row_slot_off, out_m, sm_scale)
        assert torch.isnan(o_m[suf.slot0:]).all() and torch.isnan(lse_m[suf.slot0:]).all()
        assert torch.equal(out_m.contiguous().view(torch.uint8), out.contiguous().view(torch.uint8)), \
            "the merged suffix kernel and the merge kernel differ"
        err_m = rel_err(out_m, truth)
        assert err_m <= limit, f"merged suffix kernel error {err_m:.3g} > {limit:.3g}"
        o_ref, lse_ref = run_partials(f, plan, kernels=False, dtype=torch.float64)
        out_ref = torch.full((R, Q, Hq, D), float("nan"), dtype=torch.float64, device=dev)
        suffix_attention_merged_reference(*(x.double() for x in (f.q, f.suf_k, f.suf_v)), suf, o_ref, lse_ref,
                                          row_slot_off, out_ref, sm_scale)
        assert rel_err(out_ref, truth) <= 1e-12, "merged suffix reference in float64"

    # References: exact in float64, and within the same rule in the input dtype.
    for ref_dtype, ref_limit in ((torch.float64, 1e-12), (dtype, limit)):
        o_ref, lse_ref = run_partials(f, plan, kernels=False, dtype=ref_dtype)
        out_ref = torch.full((R, Q, Hq, D), float("nan"), dtype=ref_dtype, device=dev)
        merge_partials_reference(o_ref, lse_ref, row_slot_off, suf.slot0, suf.n_splits, out_ref)
        assert rel_err(out_ref, truth) <= ref_limit, f"references in {ref_dtype}"
    return err, limit


FORESTS = {  # name: make_forest arguments (dtype aside)
    "mha_d64_1level": dict(R=3, Hkv=2, G=1, D=64, Q=1, levels=1, seg_lens=[15], suffix_lens=[0, 3, 7]),
    "gqa3_d80_2levels": dict(R=4, Hkv=3, G=3, D=80, Q=1, levels=2, seg_lens=[16, 1, 17], suffix_lens=[2, 2, 5, 1]),
    "gqa4_d96_3levels_prefill": dict(R=5, Hkv=2, G=4, D=96, Q=3, levels=3, seg_lens=[17, 15, 16, 1],
                                     suffix_lens=[3, 1, 6, 0, 4], roots=2),
    "mqa8_d128_4levels": dict(R=6, Hkv=1, G=8, D=128, Q=1, levels=4, seg_lens=[1, 16, 15, 17, 2],
                              suffix_lens=[4, 9, 1, 2, 3, 5], suffix_heads_inner=True),
    "gqa16_d256": dict(R=2, Hkv=1, G=16, D=256, Q=1, levels=2, seg_lens=[17, 15], suffix_lens=[5, 1]),
    "rows_without_segments": dict(R=4, Hkv=2, G=3, D=64, Q=2, levels=2, seg_lens=[16, 5], suffix_lens=[4, 0, 1, 2],
                                  no_segment_rows=(1, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name", list(FORESTS))
def test_planner_plans(name, dtype):
    f = make_forest(sum(map(ord, name)), dtype=dtype, **FORESTS[name])
    check_forest(f, planner_plan(f), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name,chunk_len,block_m,split_len", [
    ("gqa3_d80_2levels", 5, 16, 2),
    ("gqa4_d96_3levels_prefill", 4, 16, 3),
    ("mqa8_d128_4levels", 16, 32, 4),
    ("rows_without_segments", 3, 16, 1),
    ("mqa8_d128_4levels", 3, 16, 64),  # one split: the suffix kernel merges many segment slots per row itself
])
def test_chunks_and_splits(name, chunk_len, block_m, split_len, dtype):
    f = make_forest(7 + chunk_len, dtype=dtype, **FORESTS[name])
    plan = manual_plan(f, chunk_len, block_m, split_len, seed=chunk_len)
    assert plan[2].diff().max() > 4, "every case gives some row several chunks of several segments"
    check_forest(f, plan, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(FORESTS))
def test_forest_attention_off_cuda(name, dtype):
    """forest_attention on the CPU against the float64 truth, NaN-prefilled output: its batched path (the CPU
    planner's plans: whole rows per task, one split), with a finished row (start past end) too, and its fallback
    to the references (chunked tasks cutting rows, several splits)."""
    f = make_forest(sum(map(ord, name)) + 1, dtype=dtype, **FORESTS[name])
    R, Hq, Q, D, Hkv = f.dims
    sm_scale = D ** -0.5
    for variant in ("batched", "finished row", "fallback"):
        if variant == "finished row":
            f.start[1] = f.end + 3
        if variant == "fallback":
            seg, suf, off, n_slots = manual_plan(f, chunk_len=5, block_m=2, split_len=2, seed=1)
        else:
            seg, suf, off, n_slots = planner_plan(f)
        truth = dense_attention(f, sm_scale, torch.float64)[0]
        limit = error_limit(rel_err(dense_attention(f, sm_scale, dtype)[0], truth), dtype, D)
        plan = ForestPlan(segments=seg, suffix=suf, row_slot_off=off, n_slots=n_slots, q_len=Q)
        out = torch.full((R, Q, Hq, D), float("nan"), dtype=dtype)
        forest_attention(f.q, f.seg_k, f.seg_v, f.suf_k, f.suf_v, plan, sm_scale, out)
        assert (plan.launches["host"] is None) == (variant == "fallback"), variant
        err = rel_err(out, truth)
        assert err <= limit, f"{variant}: error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("name", list(FORESTS))
def test_error_limit_fails_one_wrong_element(name):
    """In float32 error_limit's floor can set the bound (the batched CPU path rounds more than PyTorch's dense
    computation, more so at larger D): it stays sharp. forest_attention's output passes; the same output with
    one element off by 1% of the output's RMS value, far less than a wrong mask, scale or merge weight moves it,
    fails."""
    f = make_forest(sum(map(ord, name)) + 1, dtype=torch.float32, **FORESTS[name])
    R, Hq, Q, D, _ = f.dims
    sm_scale = D ** -0.5
    truth = dense_attention(f, sm_scale, torch.float64)[0]
    limit = error_limit(rel_err(dense_attention(f, sm_scale, torch.float32)[0], truth), torch.float32, D)
    seg, suf, off, n_slots = planner_plan(f)
    plan = ForestPlan(segments=seg, suffix=suf, row_slot_off=off, n_slots=n_slots, q_len=Q)
    out = forest_attention(f.q, f.seg_k, f.seg_v, f.suf_k, f.suf_v, plan, sm_scale)
    assert rel_err(out, truth) <= limit
    out[R - 1, Q - 1, Hq - 1, D - 1] += 0.01 * out.pow(2).mean().sqrt()
    err = rel_err(out, truth)
    assert err > limit, f"one wrong element: error {err:.3g} within the limit {limit:.3g}"


def with_hole(f: Forest):
    """(f with column end - 1 of its suffix buffers set to NaN, that column's (keys, values) [R, Hkv, 1, D])."""
    new_kv = (f.suf_k[:, :, f.end - 1:f.end].clone(), f.suf_v[:, :, f.end - 1:f.end].clone())
    k, v = f.suf_k.clone(), f.suf_v.clone()
    k[:, :, f.end - 1] = float("nan")
    v[:, :, f.end - 1] = float("nan")
    return dataclasses.replace(f, suf_k=k, suf_v=v), new_kv


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name", [n for n, kw in FORESTS.items() if kw["Q"] == 1])
def test_new_kv_written_by_the_attention(name, dtype):
    """Decoding one token per row with ``new_kv`` (the kernel attends to it from registers and stores it at
    column end - 1): with that column NaN beforehand, the suffix kernel (one split merged, or several splits),
    its references and forest_attention's CPU path stay within the precision rule of the float64 truth, a
    finished row included, and leave the buffers holding the token."""
    f = make_forest(sum(map(ord, name)) + 2, dtype=dtype, **FORESTS[name])
    f.start[0] = f.end + 1  # a finished row (its suffix start moved past the end): still written
    R, Hq, Q, D, Hkv = f.dims
    sm_scale = D ** -0.5
    truth = dense_attention(f, sm_scale, torch.float64)[0]
    limit = error_limit(rel_err(dense_attention(f, sm_scale, dtype)[0], truth), dtype, D)
    for seg, suf, off, n_slots in (planner_plan(f), manual_plan(f, chunk_len=5, block_m=16, split_len=2, seed=3)):
        for kernels, ref_dtype in ((True, None), (False, torch.float64)):
            g, new_kv = with_hole(f)
            o_part, lse_part = run_partials(g, (seg, suf, off, n_slots), kernels, ref_dtype,
                                            new_kv if ref_dtype is None else [x.to(ref_dtype) for x in new_kv])
            if ref_dtype is None:  # the references wrote a float64 copy of the buffers
                assert torch.equal(g.suf_k, f.suf_k) and torch.equal(g.suf_v, f.suf_v), "new token not written"
            out = torch.empty(R, Q, Hq, D, dtype=o_part.dtype)
            merge_partials_reference(o_part, lse_part, off, suf.slot0, suf.n_splits, out)
            err = rel_err(out, truth)
            assert err <= (limit if kernels else 1e-12), f"kernels={kernels}: error {err:.3g} > {limit:.3g}"
        if suf.n_splits == 1:
            g, new_kv = with_hole(f)
            o_part, lse_part = run_partials(g, (seg, suf, off, n_slots), True)
            out = torch.full((R, Q, Hq, D), float("nan"), dtype=dtype)
            suffix_attention_merged(g.q, g.suf_k, g.suf_v, suf, o_part, lse_part, off, out, sm_scale, new_kv)
            assert torch.equal(g.suf_k, f.suf_k) and rel_err(out, truth) <= limit, "merged suffix kernel, new_kv"
        g, new_kv = with_hole(f)
        plan = ForestPlan(segments=seg, suffix=suf, row_slot_off=off, n_slots=n_slots, q_len=Q)
        out = forest_attention(g.q, g.seg_k, g.seg_v, g.suf_k, g.suf_v, plan, sm_scale, new_kv=new_kv)
        assert torch.equal(g.suf_k, f.suf_k) and rel_err(out, truth) <= limit, "forest_attention (CPU), new_kv"


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan"), float("inf")])
def test_bad_softmax_scale_refused(scale):
    """The kernels scale each tile's row max after taking it: a scale that is not positive and finite raises
    (naming the argument) before any launch, with the partial buffers untouched."""
    f = make_forest(3, dtype=torch.float32, **FORESTS["mha_d64_1level"])
    seg, suf, off, n_slots = planner_plan(f)
    R, Hq, Q, D, Hkv = f.dims
    o_part = torch.full((n_slots, Q, Hq, D), float("nan"))
    lse_part = torch.full((n_slots, Q, Hq), float("nan"))
    with pytest.raises(ValueError, match="sm_scale must be a positive finite number"):
        segment_attention(f.q, f.seg_k, f.seg_v, seg, o_part, lse_part, scale)
    with pytest.raises(ValueError, match="sm_scale must be a positive finite number"):
        suffix_attention(f.q, f.suf_k, f.suf_v, suf, o_part, lse_part, scale)
    assert torch.isnan(o_part).all() and torch.isnan(lse_part).all()


def test_new_kv_refused_where_it_cannot_apply():
    """new_kv is one token per row: several query tokens, or keys of another shape, raise before any work."""
    f = make_forest(5, dtype=torch.float32, **FORESTS["gqa4_d96_3levels_prefill"])  # Q = 3
    R, Hq, Q, D, Hkv = f.dims
    seg, suf, off, n_slots = planner_plan(f)
    plan = ForestPlan(segments=seg, suffix=suf, row_slot_off=off, n_slots=n_slots, q_len=Q)
    one = f.suf_k[:, :, :1].clone()
    with pytest.raises(ValueError, match="one token per row"):
        forest_attention(f.q, f.seg_k, f.seg_v, f.suf_k, f.suf_v, plan, D ** -0.5, new_kv=(one, one))
    o_part, lse_part = run_partials(f, (seg, suf, off, n_slots), True)
    q1 = f.q[:, :, :1]
    with pytest.raises(ValueError, match="one decoded token per row"):
        suffix_attention(q1, f.suf_k, f.suf_v, suf, o_part, lse_part, D ** -0.5, (one[:, :1], one[:, :1]))


def test_long_segment():
    f = make_forest(3, R=2, Hkv=1, G=4, D=64, Q=1, levels=2, seg_lens=[4097, 16], suffix_lens=[3, 130],
                    dtype=torch.float16)
    check_forest(f, planner_plan(f), torch.float16)
    check_forest(f, manual_plan(f, chunk_len=1500, block_m=16, split_len=64), torch.float16)


@pytest.mark.parametrize("rows", [1, 4, 16, 64])
@pytest.mark.parametrize("q_len", [1, 3])
def test_gpu_plans_write_every_partial_slot(rows, q_len):
    """Every row's segment slots are written by exactly one task per (query, slot), for H100 plans of many
    shapes (a chunk count rounded to whole key tiles once left slots unwritten: merged garbage)."""
    for hkv in (1, 8):
        for n in (1, 15, 16, 17, 650, 4096, 4097, 16384):
            for G in (1, 4):
                seg, off = plan_segments([[0, 1]] * rows, [0, n], [n, 3], q_len, G, hkv, 128, 2,
                                         torch.device("cpu"), device_model=H100)
                row_slot = seg.row_slot.tolist()
                written = []
                for kv_lo, kv_hi, rows_lo, m_lo, m_hi, chunk in seg.host:
                    assert kv_lo < kv_hi
                    written += [(row_slot[rows_lo + m // (q_len * G)] + chunk, m % (q_len * G)) for m in range(m_lo, m_hi)]
                want = [(slot, m) for slot in range(off[-1]) for m in range(q_len * G)]
                assert sorted(written) == want, (rows, q_len, hkv, n, G)


@pytest.mark.parametrize("rows, n, chunks", [(64, 4096, 4), (256, 650, 1), (32, 4096, 8), (64, 16384, 8),
                                              (128, 32768, 4), (256, 4096, 2)])
def test_planner_picks_the_waves_measured_faster(rows, n, chunks):
    """H100 plans of one shared segment alone (8 KV heads, G=4, one query token per row, no suffix pass beside
    it): one wave where the partials' round trip outweighs the balance (document QA, few-shot), two where the
    segment work is compute-bound (benchmarks/results/planner_waves_h100*.md; with a suffix pass beside it, see
    the next test)."""
    seg, off = plan_segments([[0]] * rows, [0], [n], 1, 4, 8, 128, 2, torch.device("cpu"), device_model=H100)
    assert off[1] == chunks
    one, _ = plan_segments([[0]] * rows, [0], [n], 1, 4, 8, 128, 2, torch.device("cpu"), waves=1, device_model=H100)
    two, _ = plan_segments([[0]] * rows, [0], [n], 1, 4, 8, 128, 2, torch.device("cpu"), waves=2, device_model=H100)
    assert seg.host in (one.host, two.host)


@pytest.mark.parametrize("rows, n, suffix, chunks", [(128, 32768, 1024, 2), (128, 8192, 256, 2), (64, 16384, 512, 4),
                                                      (256, 4096, 64, 1)])
def test_planner_streams_the_suffix_beside_one_wave(rows, n, suffix, chunks):
    """H100 plans of one shared segment beside the rows' own K/V: where the suffix stream is comparable to the
    segment work, one segment task per SM (a suffix program fits beside each; two leave no room) is kept, as the
    whole layer measured faster at three of these shapes (benchmarks/results/tune_layer_h100.md); the same
    segment alone is planned in two waves."""
    plan = lambda cols: plan_segments([[0]] * rows, [0], [n], 1, 4, 8, 128, 2, torch.device("cpu"),  # noqa: E731
                                      device_model=H100, suffix_cols=cols)[1][1]
    assert plan(suffix) == chunks and plan(0) == 2 * chunks


def test_suffix_plans_without_splits_are_equal_for_every_end():
    """H100 suffix plans (8 KV heads, one query token): batches that fill the card never split, and their plan
    is the same for every end (a graph captured with it stays valid); one row splits more as its suffix grows."""
    plan = lambda rows, end: plan_suffix_splits(rows, 8, end, 1, torch.device("cpu"), device_model=H100)  # noqa: E731
    assert {plan(rows, end) for rows in (17, 64, 256) for end in (1, 256, 257, 512, 4096)} == {(ONE_SPLIT, 1)}
    assert [plan(1, end)[1] for end in (100, 256, 257, 512, 600)] == [1, 1, 2, 2, 3]
    assert plan(16, 512) == (256, 2) and plan(16, 256) == (ONE_SPLIT, 1)


def test_long_segment_with_gpu_chunking():
    """A 4,096-token segment split the way an H100 plan splits it (8 KV heads: 33 chunks wanted, 32 whole
    ones), through the kernels in the interpreter."""
    f = make_forest(21, R=4, Hkv=8, G=4, D=32, Q=1, levels=1, seg_lens=[4096], suffix_lens=[3, 1, 0, 7],
                    dtype=torch.float32)
    check_forest(f, gpu_plan(f), torch.float32)


@pytest.mark.parametrize("split_len", [3, 64])
def test_plan_for_a_larger_end_and_finished_rows(split_len):
    """A plan made for a larger end (splits past the end find no keys) serves the current end read from device
    memory; rows whose start is at or past end (finished rows) see their segments only."""
    f = make_forest(5, dtype=torch.float32, **FORESTS["gqa3_d80_2levels"])
    f.start[1] = f.end  # finished: start moved to end, or past it
    f.start[2] = f.end + 40
    check_forest(f, manual_plan(f, chunk_len=7, block_m=16, split_len=split_len, bound=f.end + 50), torch.float32)


def test_suffix_prefill_query_tiles():
    """Q * G = 160 stacked queries: two query tiles per row, causal among 40 new tokens, left padding."""
    f = make_forest(11, R=2, Hkv=1, G=4, D=64, Q=40, levels=1, seg_lens=[20], suffix_lens=[50, 25],
                    dtype=torch.float32)
    check_forest(f, planner_plan(f), torch.float32)
    check_forest(f, manual_plan(f, chunk_len=8, block_m=64, split_len=16), torch.float32)


@pytest.mark.parametrize("D, Q, Hq", [(64, 2, 5), (80, 2, 5), (256, 2, 5), (64, 52, 12)])
def test_merge_kernel(D, Q, Hq):
    """Random partials with empty slots and queries with no partial at all, non-contiguous output. Both grids of
    the launcher: 2-head blocks (few programs) and, at Q = 52 (5 x 52 x 2 >= 256 programs), 8-head blocks with a
    partial last block (12 heads)."""
    gen = torch.Generator().manual_seed(D + Q)
    R, n_suffix = 5, 5  # segment slots 3, 0, 4, 5, 9 and 5 suffix splits
    row_slot_off = torch.tensor([0, 3, 3, 7, 12, 21], dtype=torch.int32)
    slot0 = 21
    P = slot0 + n_suffix * R
    o_part = torch.randn(P, Q, Hq, D, generator=gen)
    lse_part = torch.randn(P, Q, Hq, generator=gen) * 5
    lse_part[torch.rand(P, Q, Hq, generator=gen) < 0.3] = float("-inf")
    lse_part[[slot0 + j * R + 1 for j in range(n_suffix)], 0, 2] = float("-inf")  # row 1: no partial at all
    o_part[torch.isneginf(lse_part)] = 0.0
    ref = torch.empty(R, Q, Hq, D, dtype=torch.float64)
    merge_partials_reference(o_part.double(), lse_part.double(), row_slot_off, slot0, n_suffix, ref)
    assert ref[1, 0, 2].abs().max() == 0
    out = torch.full((R, Hq, Q, D), float("nan"), dtype=torch.float32).transpose(1, 2)
    merge_partials(o_part, lse_part, row_slot_off, slot0, n_suffix, out)
    assert rel_err(out, ref) <= 1e-6
    assert out[1, 0, 2].abs().max() == 0


def test_suffix_reference_blocks_long_prefill_queries():
    """A 1,500-token causal prefill with 32 query heads is computed in two query blocks: still exact."""
    from flashforge_hf.kernels.suffix_attention import SuffixTasks, suffix_attention_reference

    torch.manual_seed(0)
    R, Hkv, G, Q, D = 1, 1, 32, 1500, 16
    assert (1 << 26) // (R * Hkv * G * Q) < Q  # the reference really splits the queries
    q = torch.randn(R, Hkv * G, Q, D, dtype=torch.float64)
    k, v = torch.randn(R, Hkv, Q, D, dtype=torch.float64), torch.randn(R, Hkv, Q, D, dtype=torch.float64)
    o_part = torch.full((1, Q, Hkv * G, D), float("nan"), dtype=torch.float64)
    lse_part = torch.full((1, Q, Hkv * G), float("nan"), dtype=torch.float64)
    plan = SuffixTasks(start=torch.zeros(R, dtype=torch.int32), slot0=0, end=torch.tensor([Q], dtype=torch.int32),
                       split_len=Q, n_splits=1)
    suffix_attention_reference(q, k, v, plan, o_part, lse_part, 0.25)
    truth = torch.nn.functional.scaled_dot_product_attention(q, k.expand(R, G, Q, D), v.expand(R, G, Q, D),
                                                             is_causal=True, scale=0.25)
    torch.testing.assert_close(o_part[0], truth[0].transpose(0, 1), atol=1e-10, rtol=0)
