"""Helpers shared by the attention kernels: the online-softmax loop and the LSE-merge step (device), and the
launch path (host).

Launch cost: Triton's own launch path re-derives the kernel variant from every argument on every call,
tens of microseconds for these kernels' ~25 arguments. :meth:`KernelLauncher.bind` keys the variant itself,
compiles it once, and returns a function that launches the compiled kernel with new tensors and the bound
scalars; callers that launch the same shapes again (every layer of one forward pass) keep that function.

Strides of growing dimensions are passed to the kernels as runtime integers (``do_not_specialize``), so
Triton no longer learns that they are multiples of 16 and would fall back to narrow loads. The launchers
therefore pass each stride divided by a compile-time ``STRIDE_UNIT`` (16 when every stride of the launch is
a multiple of 16, else 1) and the kernels multiply it back: the divisibility stays known to the compiler
while the value itself never selects a kernel variant.
"""

import math
from typing import Callable

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def online_softmax_step(s, v, acc, m_i, l_i, qk_scale, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of an online softmax.

    s: [M, N] float32 raw scores q.k (-inf where masked); qk_scale: sm_scale * log2(e), > 0; v: [N, D] values;
    acc: [M, D] float32 unnormalised output; m_i: [M] running max of the scaled scores (log2 units, -inf before
    any key); l_i: [M] running sum of exp2(s * qk_scale - m_i). The scale is applied inside the exponent (one
    fused multiply-add per score). MASKED: a row may have seen no key yet (all -inf): it keeps acc = 0,
    l_i = 0, m_i = -inf; unmasked tiles give every row a finite score, so that guard is left out there.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def attend_keys(q, k_base, v_base, s_kn, s_vn, lo, hi, q_col, offs_d, mask_d, acc, m_i, l_i, qk_scale,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr):
    """Online softmax of q [M, BLOCK_D] over keys lo, lo + BLOCK_N, ... below hi (key n at k_base + n * s_kn,
    element strides). MASKED: keys >= hi, and keys > q_col [M] for each query, are left out; otherwise the
    caller guarantees that every tile is whole and visible to every query (no per-key mask at all). EVEN_D: the
    head dim fills the tile (mask_d all true), so unmasked tiles load without any mask."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * s_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * s_vn + offs_d[None, :]
        if MASKED:
            kv_mask = (offs_n < hi)[:, None] & mask_d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASKED:
            s = tl.where((offs_n < hi)[None, :] & (offs_n[None, :] <= q_col[:, None]), s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, v, acc, m_i, l_i, qk_scale, DOT_PREC, MASKED)
    return acc, m_i, l_i


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """(normalised output [M, D], natural-log LSE [M]) of an online softmax; rows with no key give (0, -inf)."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return o, lse


@triton.jit
def merge_step(o, lse, acc, m_i, den):
    """Fold one partial (o [H, D] float32, normalised; lse [H] natural-log, -inf for no keys) into the running
    (acc [H, D], m_i [H] natural-log max, den [H]), which starts at (0, -inf, 0); the merged output is
    acc / den (0 where den is 0). Every merge of partials (merge.py, and suffix_attention_merged's epilogue) goes
    through this one function from that start, so equal partials folded in equal order give equal bits."""
    m_new = tl.maximum(m_i, lse)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    w = tl.exp(lse - m_use)
    return acc * alpha[:, None] + w[:, None] * o, m_new, den * alpha + w


@triton.jit
def merge_result(acc, den):
    """The merged output [H, D] float32 of a :func:`merge_step` fold: acc / den, 0 where no partial saw a key."""
    return tl.where(den[:, None] > 0.0, acc / tl.where(den > 0.0, den, 1.0)[:, None], 0.0)


@triton.jit
def merge_slot(o_slot, lse_slot, o_off, lse_off, mask_h, mask_hd, acc, m_i, den):
    """:func:`merge_step` with the partial at o_slot/lse_slot (its slot's base pointers; o_off [H, D] and
    lse_off [H] element offsets inside the slot)."""
    lse = tl.load(lse_slot + lse_off, mask=mask_h, other=float("-inf"))
    o = tl.load(o_slot + o_off, mask=mask_hd, other=0.0)
    return merge_step(o, lse, acc, m_i, den)


FAST_LAUNCH = True  # tests switch it off to count the variants Triton itself would compile


class KernelLauncher:
    """Launches one @triton.jit kernel, through Triton's launch path under the interpreter (CPU tensors) or
    when ``FAST_LAUNCH`` is off, else through the compiled kernel.

    Valid for kernels whose int arguments are all ``do_not_specialize`` (they are i32 while below 2**31):
    a variant then depends only on the constexprs, the launch options, the device, the tensors' dtypes and
    whether each tensor's data pointer is 16-byte aligned, which is the key used here.
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled = {}

    def bind(self, grid, tensors, scalars, constexprs, **options) -> Callable[..., None]:
        """Compile the variant for these arguments (CUDA) and return ``launch(*tensors)``, which launches it on
        tensors of the same dtypes, device and 16-byte alignment as ``tensors``, with these scalars and grid.

        grid: 3 ints; tensors, scalars, constexprs (a dict): the kernel's arguments in signature order."""
        if not (tensors[0].is_cuda and max(scalars) < 2**31):
            return lambda *ts: self.fn[grid](*ts, *scalars, **constexprs, **options)
        key = (tensors[0].device.index, *[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors],
               *constexprs.values(), *options.values())
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.compiled[key] = self.fn.warmup(*tensors, *scalars, grid=grid, **constexprs, **options)
        if not FAST_LAUNCH:
            return lambda *ts: self.fn[grid](*ts, *scalars, **constexprs, **options)
        runner = kernel[grid]
        rest = (*scalars, *constexprs.values())
        return lambda *ts: runner(*ts, *rest)


def log2_scale(sm_scale: float) -> float:
    """The kernels' ``qk_scale``: ``sm_scale`` in log2 units (sm_scale * log2(e)). The online softmax takes each
    tile's row max on raw scores and scales it afterwards, which needs a positive finite scale."""
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite number (the softmax scale, e.g. head_dim ** -0.5), "
                         f"got {sm_scale!r}.")
    return sm_scale * LOG2E


def stride_unit(*strides: int) -> int:
    """16 when every stride is a multiple of 16 (the kernels then pass stride // 16), else 1."""
    return 16 if all(s % 16 == 0 for s in strides) else 1


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs; tensor-core default (operands are 16-bit anyway) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """Padded head-dim tile (power of two, >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))
