"""One GEMM for each attention layer's query, key and value projections while the static decode loop runs.

Decoding reads every weight once per step, so each GEMM is memory-bound; the key and value projections of a GQA
model are small (1,024 x 4,096 each on Llama-3-8B), and alone they run far below the card's bandwidth (too few
output tiles to fill the SMs, plus a split-K reduction). Fused with the query projection into one
[q + k + v, hidden] GEMM they stream at the big GEMMs' rate.

:func:`fused_qkv` does this in place for the duration of a ``with`` block (graphs.GraphDecoder holds it for its
decode, and flashforge_hf.generate around transformers' eager loop, so that both loops run the same GEMMs): the three weights (and biases) move into one buffer, of which the modules' parameters become views (no
extra memory once the old storages are freed; one layer's worth while moving), and the three ``nn.Linear``
modules are swapped for projections that share one GEMM per input: whichever of q/k/v is called first on a
hidden-states tensor computes all three, the others return their slice. On exit the parameters get storages of
their own again (so ``save_pretrained`` and training see the model as before) and the modules come back.

It applies to an attention module whose ``q_proj``, ``k_proj`` and ``v_proj`` are plain ``nn.Linear`` (not a
subclass: quantized layers are left alone) without hooks (tensor parallel and accelerate's offloading register
some), with the same input size, dtype and device, and biases on all three or none; other layers keep their
projections. Results equal the separate projections' up to the GEMM's rounding.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_NAMES = ("q_proj", "k_proj", "v_proj")


class _SharedQKV:
    """The fused weight and bias of one attention layer, and the last input's three outputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.input: torch.Tensor | None = None  # between forward passes: None (nothing kept, nothing to guard)
        self.outputs: tuple = ()
        self.left = 0

    def project(self, x: torch.Tensor, part: int) -> torch.Tensor:
        if self.input is None or x is not self.input:  # the first of q/k/v on this input: one GEMM for all three
            self.outputs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self.input, self.left = x, len(self.sizes)
        out = self.outputs[part]
        self.left -= 1
        if self.left == 0:  # all three handed out
            self.input, self.outputs = None, ()
        return out


class _FusedPart(nn.Module):
    """Stands in for one of q_proj/k_proj/v_proj: its slice of the shared GEMM."""

    def __init__(self, shared: _SharedQKV, part: int, original: nn.Linear):
        super().__init__()
        self.shared, self.part = shared, part
        self.in_features, self.out_features = original.in_features, original.out_features
        self.weight, self.bias = original.weight, original.bias  # views of the fused buffers, for readers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.project(x, self.part)


def _fusable(attn: nn.Module) -> bool:
    mods = [getattr(attn, n, None) for n in _NAMES]
    if not all(type(m) is nn.Linear for m in mods):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in mods):  # accelerate's too
        return False
    w = [m.weight for m in mods]
    if len({(x.shape[1], x.dtype, x.device) for x in w}) != 1 or w[0].device.type == "meta":
        return False
    if any(type(x) is not nn.Parameter and type(x) is not torch.Tensor for x in w):  # e.g. DTensor shards
        return False
    return len({m.bias is None for m in mods}) == 1


def _move_into(params: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``params`` along dim 0 into one new buffer and make each a view of its part."""
    fused = torch.cat([p.detach() for p in params])
    at = 0
    for p in params:
        p.data = fused[at : at + p.shape[0]]
        at += p.shape[0]
    return fused


@contextmanager
def fused_qkv(model: nn.Module):
    """Within the block, every attention layer of ``model`` that qualifies (see the module docstring) computes
    q, k and v with one GEMM; yields the number of layers fused."""
    swapped = []
    try:
        with torch.no_grad():
            for attn in [m for m in model.modules() if _fusable(m)]:
                mods = [getattr(attn, n) for n in _NAMES]
                weight = _move_into([m.weight for m in mods])
                swapped.append((attn, mods))  # from here on, the exit undoes this layer (whatever fails next)
                bias = _move_into([m.bias for m in mods]) if mods[0].bias is not None else None
                shared = _SharedQKV(weight, bias, [m.out_features for m in mods])
                for i, (name, m) in enumerate(zip(_NAMES, mods)):
                    setattr(attn, name, _FusedPart(shared, i, m))
        yield len(swapped)
    finally:
        with torch.no_grad():
            for attn, mods in swapped:
                for name, m in zip(_NAMES, mods):
                    setattr(attn, name, m)
                    m.weight.data = m.weight.data.clone()  # a storage of its own again
                    if m.bias is not None:
                        m.bias.data = m.bias.data.clone()
