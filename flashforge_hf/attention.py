"""The "flashforge" attention implementation and its mask function, registered with transformers.

With a :class:`~flashforge_hf.cache.PrefixSharingCache`, the keys/values the attention function receives carry
the cache's hand-off (see cache.py) and attention runs over the segment forest (Triton kernels on CUDA, the
PyTorch reference elsewhere). With any other cache, or none, it is exactly transformers' SDPA attention: a
forward pass outside our cache, or ``model.generate`` where it runs stock (see generate_hook.py), behaves like
"sdpa" (except that ``torch.compile`` does not trace into it: compiled code breaks around the attention).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .compat import NAME, install_flash_predicate_fix


@torch.compiler.disable  # torch.compile runs it as is (our kernels and the hand-off), between compiled graphs
def flashforge_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, Q, D], key/value [B, Hkv, K, D] (transformers layout); returns ([B, Q, Hq, D], None)."""
    for feature, arg in (("logit soft-capping", "softcap"), ("attention sinks", "s_aux")):
        if kwargs.get(arg) is not None:
            raise NotImplementedError(
                f"flashforge attention does not support {feature}: load this model with attn_implementation='sdpa' or 'eager'."
            )
    handoff = getattr(key, "_flashforge", None)
    if handoff is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise NotImplementedError("flashforge attention with a PrefixSharingCache is for inference: dropout is not supported.")
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return handoff.run(module, query, sm_scale), None


def flashforge_mask(*args, kv_length: int, **kwargs):
    """SDPA's mask, except for a PrefixSharingCache, whose ``get_mask_sizes`` reports kv_length 0: there the
    forest itself says which keys each query sees, and no mask is built."""
    if kv_length == 0:
        return None
    return sdpa_mask(*args, kv_length=kv_length, **kwargs)


def register() -> None:
    """Register "flashforge" with transformers' attention and attention-mask interfaces (idempotent)."""
    install_flash_predicate_fix()
    AttentionInterface.register(NAME, flashforge_attention_forward)
    AttentionMaskInterface.register(NAME, flashforge_mask)
