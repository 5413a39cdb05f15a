"""One attention layer (Hq=32, Hkv=8, D=128, bf16, one decode token): forest_attention vs SDPA over each
row's materialised KV, against the memory floor (unique K/V bytes / 3.0e12 B/s). Also the host cost of
one layer call (the three launches with the plan reused) and of planning.

    python benchmarks/attention_smoke.py            # needs CUDA
"""

import itertools
import time

import torch
import torch.nn.functional as F
import triton.testing

from flashforge_hf import planner
from flashforge_hf.forest import forest_attention
from flashforge_hf.kernels import _common, merge, segment_attention, suffix_attention

HQ, HKV, D, DTYPE, BW = 32, 8, 128, torch.bfloat16, 3.0e12


def layer(batch, prefix, suffix, gen):
    dev = torch.device("cuda")
    seg_k, seg_v = (torch.randn(HKV, prefix, D, generator=gen, device=dev, dtype=DTYPE) for _ in range(2))
    suf_k, suf_v = (torch.randn(batch, HKV, suffix + 64, D, generator=gen, device=dev, dtype=DTYPE) for _ in range(2))
    q = torch.randn(batch, 1, HQ, D, generator=gen, device=dev, dtype=DTYPE).transpose(1, 2)
    start = torch.zeros(batch, dtype=torch.int32, device=dev)
    args = ([[0]] * batch, [0], [prefix], start, suffix, 1, HQ // HKV, HKV, D, 2, dev)
    return q, seg_k, seg_v, suf_k, suf_v, args


def sdpa_materialised(q, seg_k, seg_v, suf_k, suf_v):
    """(out [B, 1, Hq, D], median ms) of SDPA over each row's KV copied out: prefix then suffix."""
    batch = q.shape[0]
    k_full = torch.cat([seg_k.expand(batch, -1, -1, -1), suf_k], dim=2)
    v_full = torch.cat([seg_v.expand(batch, -1, -1, -1), suf_v], dim=2)
    out = F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=True).transpose(1, 2)
    ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=True),
                                 warmup=50, rep=300, return_mode="median")
    return out, ms


def kernel_times(q, seg_k, seg_v, suf_k, suf_v, plan):
    """Median ms of the whole layer, then of each kernel alone, replayed from CUDA graphs (no launch gaps)."""
    o_part, lse_part = plan.partial_buffers(HQ, D, q.device)
    out = torch.empty(q.shape[0], 1, HQ, D, dtype=DTYPE, device=q.device)
    fns = [
        lambda: forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan, D ** -0.5, out=out),
        lambda: segment_attention.segment_attention(q, seg_k, seg_v, plan.segments, o_part, lse_part, D ** -0.5),
        lambda: suffix_attention.suffix_attention(q, suf_k, suf_v, plan.suffix, o_part, lse_part, D ** -0.5),
        lambda: merge.merge_partials(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0, plan.suffix.n_splits,
                                     out),
    ]
    return [triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") for fn in fns]


def host_us(fn, n=2000):
    """Host microseconds per call of fn (the GPU work must be small enough to keep up)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    name = torch.cuda.get_device_name()
    rows = []
    configs = [(64, 4096, 128), (128, 32768, 1024), (8, 1024, 100)]
    for (batch, prefix, suffix), planner.MAX_BLOCK_M in itertools.product(configs, (64, 128)):
        q, seg_k, seg_v, suf_k, suf_v, args = layer(batch, prefix, suffix, gen)
        plan = planner.make_plan(*args)
        out = forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan, D ** -0.5)
        ref, t_sdpa = sdpa_materialised(q, seg_k, seg_v, suf_k[:, :, :suffix], suf_v[:, :, :suffix])
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        t_ours = triton.testing.do_bench(lambda: forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan, D ** -0.5),
                                         warmup=50, rep=300, return_mode="median")
        t_graph = kernel_times(q, seg_k, seg_v, suf_k, suf_v, plan)
        floor = (prefix + batch * suffix) * HKV * D * 2 * 2 / BW * 1e3
        n = 200
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            planner.make_plan(*args)
        t_plan = (time.perf_counter() - t0) / n * 1e6
        rows.append((batch, prefix, suffix, plan.segments.block_m, t_ours, t_sdpa, floor, err, t_plan,
                     len(plan.segments.host), plan.suffix.n_splits, t_graph))

    # Host cost of one layer call: tiny shapes, so the GPU keeps up and the loop measures the launches.
    q, seg_k, seg_v, suf_k, suf_v, args = layer(4, 256, 16, gen)
    plan = planner.make_plan(*args)
    out = torch.empty(4, 1, HQ, D, dtype=DTYPE, device="cuda")
    o_part, lse_part = plan.partial_buffers(HQ, D, q.device)
    host = {}
    for _common.FAST_LAUNCH in (False, True):
        host[_common.FAST_LAUNCH] = [host_us(fn) for fn in (
            lambda: forest_attention(q, seg_k, seg_v, suf_k, suf_v, plan, D ** -0.5, out=out),
            lambda: segment_attention.segment_attention(q, seg_k, seg_v, plan.segments, o_part, lse_part, 0.1),
            lambda: suffix_attention.suffix_attention(q, suf_k, suf_v, plan.suffix, o_part, lse_part, 0.1),
            lambda: merge.merge_partials(o_part, lse_part, plan.row_slot_off, plan.suffix.slot0, 1, out))]

    print(f"card: {name}")
    print(f"{'batch':>5} {'prefix':>6} {'suffix':>6} {'bm':>4} | {'ours ms':>8} {'graph ms':>8} {'sdpa ms':>8}"
          f" {'floor ms':>8} {'graph/floor':>11} | {'seg ms':>7} {'suf ms':>7} {'merge ms':>8} | {'rel err':>8}"
          f" {'plan us':>8} {'tasks':>5} {'splits':>6}")
    for b, p, s, bm, to, ts, fl, e, tp, nt, ns, tg in rows:
        print(f"{b:5d} {p:6d} {s:6d} {bm:4d} | {to:8.4f} {tg[0]:8.4f} {ts:8.4f} {fl:8.4f} {tg[0] / fl:11.2f} |"
              f" {tg[1]:7.4f} {tg[2]:7.4f} {tg[3]:8.4f} | {e:8.1e} {tp:8.1f} {nt:5d} {ns:6d}")
    for fast, (t_all, t_seg, t_suf, t_merge) in host.items():
        print(f"host us per call, {'cached' if fast else 'triton'} launch: forest_attention {t_all:.1f}"
              f" (segment {t_seg:.1f}, suffix {t_suf:.1f}, merge {t_merge:.1f})")


if __name__ == "__main__":
    main()
