"""What differs between the transformers versions we support (5.17 to the newest 5.x), in one place."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

from transformers.utils import generic as _generic

NAME = "flashforge"


@functools.lru_cache(maxsize=None)
def cache_kwarg(forward) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` (transformers >= 5.24) or ``past_key_values``.

    On 5.17, ``model(..., cache=c)`` silently ignores ``c``, so never guess: read the signature."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def model_cache_kwarg(model) -> str:
    return cache_kwarg(type(model).forward)


@functools.lru_cache(maxsize=None)
def output_cache_field(output_cls) -> str:
    """The field a generate output class (e.g. ``GenerateDecoderOnlyOutput``) holds the cache in: ``cache``
    (transformers >= 5.24) or ``past_key_values``. 5.24 still takes and reads the old name, but logs a
    deprecation warning for it."""
    return "cache" if "cache" in {f.name for f in dataclasses.fields(output_cls)} else "past_key_values"


def install_flash_predicate_fix() -> None:
    """Make transformers stop treating "flashforge" as a flash-attention kernel.

    transformers decides "is this flash attention?" with ``"flash" in attn_implementation`` (the function
    ``is_flash_attention_requested``), so ``from_pretrained(..., attn_implementation="flashforge")`` tries to load a
    flash-attention package named "flashforge" and fails, and generation/masking would take flash-specific paths.
    FlashForge is an ordinary registered attention function, not a flash kernel: we wrap the predicate so that it
    answers False for exactly "flashforge" (and "paged|flashforge") and delegates every other question unchanged.
    The modules that imported the function by name hold their own reference, so the wrapper is installed in every
    loaded ``transformers`` module that has it, and in ``transformers.utils.generic`` for modules imported later.
    Idempotent."""
    original = getattr(_generic.is_flash_attention_requested, "__wrapped__", _generic.is_flash_attention_requested)

    @functools.wraps(original)
    def is_flash_attention_requested(config=None, requested_attention_implementation=None, version=None):
        impl = config._attn_implementation if config is not None else requested_attention_implementation
        if isinstance(impl, str) and impl.split("|")[-1] == NAME:
            if config is not None and requested_attention_implementation is not None:
                return original(config, requested_attention_implementation, version)  # let it raise its ambiguity error
            return False
        return original(config=config, requested_attention_implementation=requested_attention_implementation, version=version)

    for mod in list(sys.modules.values()):
        # vars(), not getattr(): transformers' lazy modules would import every submodule on a missing attribute.
        if getattr(mod, "__name__", "").startswith("transformers") and vars(mod).get("is_flash_attention_requested") in (
            original,
            _generic.is_flash_attention_requested,
        ):
            mod.is_flash_attention_requested = is_flash_attention_requested
    _generic.is_flash_attention_requested = is_flash_attention_requested

