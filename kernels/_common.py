"""Helpers shared by the attention kernels: the online-softmax step (device) and launch-time choices (host).

Launch cost: Triton's own launch path re-derives the kernel variant from every argument on every call,
tens of microseconds for these kernels' ~25 arguments. :class:`KernelLauncher` keys the variant itself and,
after the first launch of each, calls the compiled kernel directly.

Strides of growing dimensions are passed to the kernels as runtime integers (``do_not_specialize``), so
Triton no longer learns that they are multiples of 16 and would fall back to narrow loads. The launchers
therefore pass each stride divided by a compile-time ``STRIDE_UNIT`` (16 when every stride of the launch is
a multiple of 16, else 1) and the kernels multiply it back: the divisibility stays known to the compiler
while the value itself never selects a kernel variant.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def online_softmax_step(s, v, acc, m_i, l_i, DOT_PREC: tl.constexpr):
    """One key tile of an online softmax.

    s: [M, N] float32 scores already scaled to log2 units (-inf where masked); v: [N, D] values;
    acc: [M, D] float32 unnormalised output; m_i: [M] running max (log2 units, -inf before any key);
    l_i: [M] running sum of exp2(s - m_i). Rows that have seen no key keep acc = 0, l_i = 0, m_i = -inf.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """(normalised output [M, D], natural-log LSE [M]) of an online softmax; rows with no key give (0, -inf)."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return o, lse


FAST_LAUNCH = True  # tests switch it off to count the variants Triton itself would compile


class KernelLauncher:
    """Launches one @triton.jit kernel: through Triton the first time a variant is seen (and always under the
    interpreter), then through the compiled kernel.

    Valid for kernels whose int arguments are all ``do_not_specialize`` (they are i32 while below 2**31):
    a variant then depends only on the constexprs, the launch options, the device, the tensors' dtypes and
    whether each tensor's data pointer is 16-byte aligned, which is the key used here.
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled = {}

    def __call__(self, grid, tensors, scalars, constexprs, **options):
        """grid: 3 ints; tensors, scalars, constexprs (a dict): the kernel's arguments in signature order."""
        if not (FAST_LAUNCH and tensors[0].is_cuda and max(scalars) < 2**31):
            self.fn[grid](*tensors, *scalars, **constexprs, **options)
            return
        key = (tensors[0].device.index, *[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors],
               *constexprs.values(), *options.values())
        kernel = self.compiled.get(key)
        if kernel is None:
            self.compiled[key] = self.fn[grid](*tensors, *scalars, **constexprs, **options)
        else:
            kernel[grid](*tensors, *scalars, *constexprs.values())


def stride_unit(*strides: int) -> int:
    """16 when every stride is a multiple of 16 (the kernels then pass stride // 16), else 1."""
    return 16 if all(s % 16 == 0 for s in strides) else 1


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs; tensor-core default (operands are 16-bit anyway) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """Padded head-dim tile (power of two, >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))
