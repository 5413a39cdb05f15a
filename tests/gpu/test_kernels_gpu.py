"""Kernel tests on a CUDA device (run with TRITON_INTERPRET=0; skipped without CUDA).

Same float64 ground truth and 2x-PyTorch-error rule as tests/test_kernels.py, with the CUDA planner's own
chunking and splitting, in bf16 and fp16; forest_attention's bound launches (reused across layers, rebound
for a misaligned tensor, one or several suffix splits); a rerun-until-identical race check, the ordering of the
segment kernel's side stream (eagerly and in a CUDA graph), and a compile-count check over 2,000 simulated decode
steps.
"""

import dataclasses
import os

import pytest
import torch

from flashforge_hf.forest_attention import forest_attention
from flashforge_hf.kernels import _common, merge, segment_attention, suffix_attention
from flashforge_hf.kernels.suffix_attention import SuffixTasks
from flashforge_hf.planner import ForestPlan, make_plan
from test_kernels import (check_forest, error_limit, dense_attention, make_forest, planner_plan, rel_err, run_partials,
                          with_hole)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="run with TRITON_INTERPRET=0"),
]

CASES = {
    "gqa4_d128_decode": dict(R=16, Hkv=2, G=4, D=128, Q=1, levels=3, seg_lens=[1500, 300, 17],
                             suffix_lens=[0, 1, 65, 300] * 4),
    "gqa3_d80_decode": dict(R=9, Hkv=3, G=3, D=80, Q=1, levels=2, seg_lens=[700, 15, 16, 1],
                            suffix_lens=list(range(1, 10))),
    "mha_d64_4levels": dict(R=6, Hkv=4, G=1, D=64, Q=1, levels=4, seg_lens=[64, 1, 129, 33, 16],
                            suffix_lens=[5, 0, 7, 300, 2, 1]),
    "mqa16_d256_prefill": dict(R=3, Hkv=1, G=16, D=256, Q=37, levels=2, seg_lens=[257, 31],
                               suffix_lens=[80, 37, 20], roots=2),
    "gqa8_d96_prefill": dict(R=4, Hkv=2, G=8, D=96, Q=200, levels=1, seg_lens=[1000],
                             suffix_lens=[200, 260, 150, 1]),
    "long_segment": dict(R=32, Hkv=8, G=4, D=128, Q=1, levels=2, seg_lens=[4097, 100], suffix_lens=[3, 2000] * 16),
    "doc_prefill_4096": dict(R=1, Hkv=2, G=4, D=128, Q=4096, levels=1, seg_lens=[16], suffix_lens=[4096]),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_vs_float64(name, dtype):
    f = make_forest(len(name), dtype=dtype, device="cuda", **CASES[name])
    check_forest(f, planner_plan(f, "cuda"), dtype)


def _forest_call_error(f, plan):
    """(error of forest_attention on f vs the float64 truth, the 2x-PyTorch limit)."""
    R, Hq, Q, D, _ = f.dims
    truth, _ = dense_attention(f, D ** -0.5, torch.float64)
    base, _ = dense_attention(f, D ** -0.5, f.q.dtype)
    out = torch.full((R, Q, Hq, D), float("nan"), dtype=f.q.dtype, device="cuda")
    forest_attention(f.q, f.seg_k, f.seg_v, f.suf_k, f.suf_v, plan, D ** -0.5, out=out)
    return rel_err(out, truth), error_limit(rel_err(base, truth), f.q.dtype, D)


@pytest.mark.parametrize("split", [False, True], ids=["one_split", "split_suffix"])
@pytest.mark.parametrize("name", ["gqa4_d128_decode", "mqa16_d256_prefill", "long_segment"])
def test_forest_attention_bound_launches(name, split):
    """One plan, launches bound at the first call and reused: a second layer (same geometry, other data), then
    a q whose data pointer is not 16-byte aligned (bound anew); with one suffix split and with the suffix forced
    to split."""
    f = make_forest(len(name), dtype=torch.bfloat16, device="cuda", **CASES[name])
    R, Hq, Q, D, _ = f.dims
    start = torch.tensor(f.start, dtype=torch.int32, device="cuda")
    plan = make_plan(f.paths, f.seg_start, f.seg_len, start, f.end, Q, Hq // f.dims[4], f.dims[4], D, 2,
                     torch.device("cuda"))
    split_len = 16 if split else f.end
    n_splits = -(-f.end // split_len)
    plan = ForestPlan(plan.segments, SuffixTasks(start, plan.suffix.slot0, plan.suffix.end, split_len, n_splits),
                      plan.row_slot_off, plan.suffix.slot0 + n_splits * R, Q)
    assert (n_splits > 1) == split
    err, limit = _forest_call_error(f, plan)
    assert err <= limit, f"first layer: {err:.3g} > {limit:.3g}"
    f2 = dataclasses.replace(f, **{k: torch.randn_like(getattr(f, k)) for k in ("seg_k", "seg_v", "suf_k", "suf_v")},
                             q=torch.randn(R, Q, Hq, D, device="cuda", dtype=f.q.dtype).transpose(1, 2))
    err, limit = _forest_call_error(f2, plan)
    assert err <= limit, f"second layer: {err:.3g} > {limit:.3g}"
    assert len(plan.launches) == 1
    buf = torch.empty(R * Q * Hq * D + 1, device="cuda", dtype=f.q.dtype)
    q_odd = buf[1:].view(R, Q, Hq, D).transpose(1, 2)
    q_odd.copy_(f2.q)
    err, limit = _forest_call_error(dataclasses.replace(f2, q=q_odd), plan)
    assert err <= limit, f"misaligned q: {err:.3g} > {limit:.3g}"
    assert len(plan.launches) == 2


@pytest.mark.parametrize("split", [False, True], ids=["one_split", "split_suffix"])
@pytest.mark.parametrize("name", ["gqa4_d128_decode", "gqa3_d80_decode", "long_segment"])
def test_new_kv_written_by_the_suffix_kernel(name, split):
    """Decoding with new_kv (the suffix kernel attends to the token from registers and stores it at column
    end - 1): with that column NaN beforehand, forest_attention stays within the precision rule of the float64
    truth, leaves the buffers holding the token, and gives bitwise the same output ten times over."""
    f = make_forest(len(name) + 1, dtype=torch.bfloat16, device="cuda", **CASES[name])
    R, Hq, Q, D, Hkv = f.dims
    seg, suf, off, _ = planner_plan(f, "cuda")
    split_len = 16 if split else f.end
    n_splits = -(-f.end // split_len)
    plan = ForestPlan(seg, suf._replace(split_len=split_len, n_splits=n_splits), off, suf.slot0 + n_splits * R, Q)
    truth, _ = dense_attention(f, D ** -0.5, torch.float64)
    limit = error_limit(rel_err(dense_attention(f, D ** -0.5, f.q.dtype)[0], truth), f.q.dtype, D)
    first = None
    for _ in range(10):
        g, new_kv = with_hole(f)
        out = forest_attention(g.q, g.seg_k, g.seg_v, g.suf_k, g.suf_v, plan, D ** -0.5, new_kv=new_kv)
        assert torch.equal(g.suf_k, f.suf_k) and torch.equal(g.suf_v, f.suf_v), "new token not written"
        err = rel_err(out, truth)
        assert err <= limit, f"error {err:.3g} > {limit:.3g}"
        first = out if first is None else first
        assert torch.equal(out.view(torch.uint8), first.view(torch.uint8))


def test_side_stream_ordering():
    """Six layers back to back with no sync, each layer's q written into one buffer on the current stream after a
    long matmul and its output read right after the call, eagerly and captured in a CUDA graph (where the segment
    kernel runs on a side stream, see forest_attention.py): every output equals that layer run alone between syncs (the side
    stream waits for q and for the previous layer's merge, which reads the partials it overwrites; the current
    stream waits for the segments). One suffix split: eager layers merge in the suffix kernel, captured ones in the
    merge kernel, bit for bit alike."""
    f = make_forest(7, dtype=torch.bfloat16, device="cuda", **CASES["long_segment"])
    R, Hq, Q, D, _ = f.dims
    seg, suf, off, n_slots = planner_plan(f, "cuda")
    assert seg is not None and suf.n_splits == 1
    plan = ForestPlan(seg, suf, off, n_slots, Q)
    gen = torch.Generator(device="cuda").manual_seed(0)
    qs = [torch.randn(R, Q, Hq, D, device="cuda", dtype=f.q.dtype, generator=gen).transpose(1, 2) for _ in range(6)]
    alone = []
    for q in qs:
        torch.cuda.synchronize()
        alone.append(forest_attention(q, f.seg_k, f.seg_v, f.suf_k, f.suf_v, plan, D ** -0.5).clone())
        torch.cuda.synchronize()
    q_buf = torch.empty_like(qs[0])
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    slow = torch.empty_like(big)
    outs = [torch.empty_like(alone[0]) for _ in qs]

    def layers():
        for q, out in zip(qs, outs):
            torch.matmul(big, big, out=slow)  # keeps the current stream busy before q is written
            q_buf.copy_(q)
            got = forest_attention(q_buf, f.seg_k, f.seg_v, f.suf_k, f.suf_v, plan, D ** -0.5)
            out.copy_(got)

    for name in ("eager", "graph"):
        for out in outs:
            out.fill_(float("nan"))
        if name == "eager":
            layers()
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                layers()
            for out in outs:
                out.fill_(float("nan"))
            graph.replay()
        torch.cuda.synchronize()
        for i, (out, ref) in enumerate(zip(outs, alone)):
            assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), f"{name}: layer {i} differs"


def test_rerun_identical():
    """20 runs on the same inputs give bitwise identical partials and outputs (no race between programs)."""
    f = make_forest(5, dtype=torch.bfloat16, device="cuda", **CASES["long_segment"])
    plan = planner_plan(f, "cuda")
    seg, suf, row_slot_off, _ = plan
    R, Hq, Q, D, _ = f.dims
    first = None
    for _ in range(20):
        o_part, lse_part = run_partials(f, plan, kernels=True)
        out = torch.full((R, Q, Hq, D), float("nan"), dtype=f.q.dtype, device="cuda")
        merge.merge_partials(o_part, lse_part, row_slot_off, suf.slot0, suf.n_splits, out)
        now = [x.clone() for x in (o_part, lse_part, out)]
        if first is None:
            first = now
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(first, now))


def _variants():
    """Compiled variants of the three kernels, over every device."""
    fns = (segment_attention._segment_attention_kernel, suffix_attention._suffix_attention_kernel,
           merge._merge_kernel)
    return [sum(len(c[0]) for c in fn.device_caches.values()) for fn in fns]


@pytest.mark.parametrize("fast_launch", [False, True], ids=["triton_launch", "cached_launch"])
def test_no_recompile_over_2000_decode_steps(fast_launch, monkeypatch):
    """Decode 2,000 steps: suffix end grows by one, the planner re-splits; no new variant after the first step
    (counted with Triton's own launch path), and the cached launch path stays right throughout."""
    monkeypatch.setattr(_common, "FAST_LAUNCH", fast_launch)
    R, Hkv, G, D, dtype, prefix = 8, 2, 4, 128, torch.bfloat16, 3000
    gen = torch.Generator(device="cuda").manual_seed(0)
    seg_k, seg_v = (torch.randn(Hkv, prefix, D, generator=gen, device="cuda", dtype=dtype) for _ in range(2))
    C = 2100
    suf_k, suf_v = (torch.randn(R, Hkv, C, D, generator=gen, device="cuda", dtype=dtype) for _ in range(2))
    start = torch.tensor([0, 3, 7, 0, 40, 1, 0, 2], dtype=torch.int32, device="cuda")
    paths = [[0]] * R
    seen_splits, counts = set(), None
    for step in range(2000):
        end = 50 + step
        q = torch.randn(R, 1, G * Hkv, D, generator=gen, device="cuda", dtype=dtype).transpose(1, 2)
        plan = make_plan(paths, [0], [prefix], start, end, 1, G, Hkv, D, 2, torch.device("cuda"))
        seen_splits.add(plan.suffix.n_splits)
        out = forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan, D ** -0.5)
        if step == 0:
            counts = _variants()
        if step % 400 == 399:
            o_part, lse_part = (x.clone() for x in plan.partial_buffers(G * Hkv, D, "cuda"))
            segment_attention.segment_attention_reference(q, seg_k, seg_v, plan.segments, o_part, lse_part, D ** -0.5)
            suffix_attention.suffix_attention_reference(q, suf_k, suf_v, plan.suffix, o_part, lse_part, D ** -0.5)
            ref = torch.empty(R, 1, G * Hkv, D, dtype=torch.float32, device="cuda")
            merge.merge_partials_reference(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0,
                                           plan.suffix.n_splits, ref)
            assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, f"wrong output at step {step}"
    torch.cuda.synchronize()
    assert len(seen_splits) > 1, "the planner never changed the number of splits; the test proves less"
    assert _variants() == counts, f"new kernel variants compiled during decoding: {counts} -> {_variants()}"
