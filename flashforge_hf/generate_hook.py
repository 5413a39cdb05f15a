"""Plain ``model.generate`` on a model loaded with ``attn_implementation="flashforge"`` runs
:func:`flashforge_hf.generate`: lm-eval, lighteval, ``pipeline`` and users' scripts get prefix sharing unchanged.

How the hook is installed. :func:`install` (run by ``import flashforge_hf``) replaces the one method every
causal LM's ``generate`` resolves to, ``transformers.GenerationMixin.generate``, with a wrapper. The wrapper
does nothing for any other model: unless the model's attention implementation is "flashforge", the call goes to
transformers' method untouched.

Why it holds across transformers versions (5.17 to the newest 5.x). The wrapper binds the call's arguments to
the signature of the installed method (read at install time), so positional and keyword arguments of any
version map to their names; it reads only names that every 5.x has (``inputs``, ``input_ids``,
``attention_mask``, ``generation_config``, the cache keyword, ``assistant_model``, ``custom_generate``,
``use_cache``) and passes everything else on unchanged, to :func:`flashforge_hf.generate` (which hands it to
transformers' own method) or to transformers' method directly.

Why it never re-enters. It serves only calls without a cache of the caller's. :func:`flashforge_hf.generate`
calls ``model.generate`` with its own :class:`PrefixSharingCache`, as does the explicit path
(``prefill_shared`` then ``model.generate(..., cache=cache)``), so those calls go straight to transformers'
method, with no state kept (safe across threads).

What runs stock. Whatever our path cannot serve (a caller's cache, assisted or contrastive decoding, a
``custom_generate``, ``inputs_embeds``, ``use_cache=False``, the model features that :func:`check_model`
refuses) runs transformers' own generation, with a message naming the reason, once per reason.

The switch: ``model.generate(..., flashforge=False)`` for one call (``flashforge=True`` requires our path: it
raises where the call would run stock), :func:`set_generate_hook` or the environment variable
``FLASHFORGE_HF_GENERATE=0`` for every call. FlashForge's own options of :func:`flashforge_hf.generate`
(:data:`OPTIONS`) are taken by ``model.generate`` too.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings

import torch
from transformers import GenerationMixin

from .cache import PrefixSharingCache
from .compat import NAME, model_cache_kwarg
from .generation import check_model, effective_generation_config, generate, max_new_tokens, unserved_feature

OPTIONS = ("min_shared_tokens", "batch_size", "progress", "cuda_graph", "compile")  # flashforge_hf.generate's own
ENV = "FLASHFORGE_HF_GENERATE"
_enabled = True
_stock_said: set = set()


def set_generate_hook(enabled: bool) -> None:
    """Whether plain ``model.generate`` on "flashforge" models takes the FlashForge path (default True)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """The global switch: :func:`set_generate_hook` and ``FLASHFORGE_HF_GENERATE`` ("0" turns it off)."""
    return _enabled and os.environ.get(ENV, "1") != "0"


def stock_reason(model, input_ids, kwargs: dict) -> str | None:
    """Why a ``model.generate`` call (its arguments by name, ``input_ids`` apart) must run transformers' own
    generation rather than FlashForge's, or None."""
    if not isinstance(input_ids, torch.Tensor):
        return "no input_ids tensor (inputs_embeds or an empty prompt)"
    if kwargs.get("custom_generate") is not None:
        return "custom_generate"
    if kwargs.get("use_cache") is False:
        return "use_cache=False"
    if kwargs.get("negative_prompt_ids") is not None:
        return "negative_prompt_ids"
    if why := unserved_feature(effective_generation_config(model, kwargs), kwargs):
        return why
    try:
        check_model(model, longest_row=input_ids.shape[-1] + (max_new_tokens(model, input_ids.shape[-1], kwargs) or 0))
    except (NotImplementedError, TypeError) as e:
        return str(e)
    return None


def install() -> None:
    """Wrap ``GenerationMixin.generate`` (see the module docstring). Idempotent."""
    original = GenerationMixin.generate
    if hasattr(original, "_flashforge_original"):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def generate_with_flashforge(self, *args, flashforge: bool | None = None, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != NAME:
            if flashforge:
                raise ValueError(f"flashforge=True needs a model loaded with attn_implementation='{NAME}'.")
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        call = {k: v for k, v in bound.items() if k not in ("self", "kwargs")}
        call.update(bound.get("kwargs", {}))
        if isinstance(call.get(model_cache_kwarg(self)), PrefixSharingCache):
            return original(self, *args, **kwargs)  # flashforge_hf.generate's own calls, and the explicit path
        options = {k: call.pop(k) for k in OPTIONS if k in call}
        kwargs = {k: v for k, v in kwargs.items() if k not in OPTIONS}
        if flashforge is False or (flashforge is None and not enabled()):
            return original(self, *args, **kwargs)
        inputs = call.pop("inputs", None)
        input_ids = call.pop("input_ids", None) if inputs is None else inputs
        if inputs is not None and "input_ids" in call:
            reason = "both inputs and input_ids given"
        else:
            reason = stock_reason(self, input_ids, call)
        if reason is None:
            return generate(self, input_ids, call.pop("attention_mask", None), **options, **call)
        if flashforge:
            raise NotImplementedError(f"flashforge=True, but FlashForge cannot serve this call: {reason}.")
        if reason not in _stock_said:
            _stock_said.add(reason)
            warnings.warn(f"flashforge: model.generate runs transformers' own generation for this call: {reason}. "
                          "Pass flashforge=False to choose it without this message.", stacklevel=2)
        return original(self, *args, **kwargs)

    generate_with_flashforge._flashforge_original = original
    GenerationMixin.generate = generate_with_flashforge
