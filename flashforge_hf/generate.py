"""Prefill each shared segment once, then hand the cache to transformers' ``generate``."""

from __future__ import annotations

import torch

from .cache import ATTN_IMPLEMENTATION, PrefixSharingCache
from .compat import model_cache_kwarg
from .prefix_tree import build_forest

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_model(model, longest_row: int | None = None) -> None:
    """Refuse, with the reason and the alternative, any model or feature the forest attention cannot serve."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"The model uses attn_implementation='{impl}'. Load it with "
            f"from_pretrained(..., attn_implementation='{ATTN_IMPLEMENTATION}') after `import flashforge_hf`."
        )
    for attr, feature in (
        ("attn_logit_softcapping", "attention logit soft-capping"),
        ("alibi", "ALiBi position biases"),
    ):
        if getattr(config, attr, None):
            raise NotImplementedError(
                f"{config.model_type}: {feature} is not supported by flashforge; use attn_implementation='sdpa' or 'eager'."
            )
    if any(n.endswith("sinks") for n, _ in model.named_parameters()):
        raise NotImplementedError(
            f"{config.model_type}: attention sinks are not supported by flashforge; use attn_implementation='eager'."
        )
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"Model type '{config.model_type}' is not supported by flashforge (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "use attn_implementation='sdpa' for it."
        )
    dtype = next(model.parameters()).dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Model dtype {dtype} is not supported (use one of {SUPPORTED_DTYPES}).")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if sliding and longest_row is not None and longest_row > window:
        raise NotImplementedError(
            f"{config.model_type} uses sliding-window attention (window {window}) and a row would reach "
            f"{longest_row} tokens (prompt + max_new_tokens): flashforge serves sliding-window models only while no "
            "row reaches the window. Lower max_new_tokens or shorten the prompts, or use attn_implementation='sdpa'."
        )


def _check_inputs(model, input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got {type(input_ids).__name__} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"Empty batch: input_ids has shape {tuple(input_ids.shape)}.")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}.")
    device = model.get_input_embeddings().weight.device
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}: move them with .to({str(device)!r}).")
    if attention_mask is None:
        if input_ids.shape[0] > 1:
            pad = getattr(model.generation_config, "pad_token_id", None)
            if pad is not None and bool((input_ids == pad).any()):
                raise ValueError(
                    "input_ids contain the pad token but no attention_mask was given: padding is read from "
                    "attention_mask only (a pad id can also be a real token). Pass the tokenizer's attention_mask."
                )
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}.")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}.")
    m = attention_mask.to(torch.long)
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1.")
    lengths = m.sum(-1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"Rows {rows} are all padding: every row needs at least one token.")
    # Left padding: within each row, once a 1 appears, no 0 follows.
    if bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError(
            "Padding must be on the left (tokenizer(..., padding_side='left')): a 0 follows a 1 in attention_mask."
        )
    return m


def prefill_shared(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    num_copies: int = 1,
    min_shared_tokens: int = 16,
) -> tuple[PrefixSharingCache, dict]:
    """Prefill a left-padded batch: each shared segment once (level by level), then each row's own suffix.

    Returns ``(cache, inputs)``; continue with ``model.generate(**inputs, past_key_values=cache, ...)``
    (``cache=cache`` on transformers >= 5.24; :func:`flashforge_hf.cache_kwarg` tells which). ``inputs`` are the
    caller's ``input_ids``/``attention_mask``: everything but the last column is in the cache, so generate feeds
    the last prompt token of every row and returns the prompts in their original padded layout.

    ``num_copies``: rows per prompt in the cache. transformers never expands a cache it is given, so for
    ``num_return_sequences=N`` (sampling) pass ``num_copies=N``, for beam search ``num_copies=num_beams``, and give
    generate the same setting with the un-expanded ``inputs``: its own expansion then matches the cache's rows,
    and the copies share the whole prompt (nothing is copied). ``max_new_tokens`` sizes the suffix buffers
    (they grow by doubling past it). Runs of fewer than ``min_shared_tokens`` shared tokens are not worth a
    segment and are stored per row instead.
    """
    return _prefill(model, input_ids, _check_inputs(model, input_ids, attention_mask), attention_mask,
                    max_new_tokens=max_new_tokens, num_copies=num_copies, min_shared_tokens=min_shared_tokens)


def _prefill(model, input_ids, mask, attention_mask, *, max_new_tokens, num_copies, min_shared_tokens):
    """prefill_shared on validated inputs (``mask``: the checked 0/1 mask, ``attention_mask``: the caller's)."""
    if num_copies < 1:
        raise ValueError(f"num_copies must be >= 1, got {num_copies}.")
    B, L = input_ids.shape
    check_model(model, longest_row=L + (max_new_tokens or 0))
    forest = build_forest(input_ids, mask, min_shared_tokens=min_shared_tokens, copies=num_copies)
    pre_suffix = [len(t) - 1 for t in forest.suffix_tokens]
    suffix_len = max(pre_suffix)
    device = input_ids.device
    cache = PrefixSharingCache(
        model.config, forest, device=device, max_new_tokens=max_new_tokens, base=L - 1 - suffix_len, suffix_len=suffix_len
    )
    kw = model_cache_kwarg(model)
    base_model = model.base_model
    with torch.no_grad():  # not inference_mode: generate later updates these buffers outside it
        # 1. Shared segments, one forward pass per tree level (all segments of a level batched, left-padded).
        for level in range(forest.num_levels):
            seg_ids = [s for s, lv in enumerate(forest.seg_level) if lv == level]
            width = max(len(forest.seg_tokens[s]) for s in seg_ids)
            ids = torch.zeros(len(seg_ids), width, dtype=torch.long)
            pos = torch.zeros(len(seg_ids), width, dtype=torch.long)
            for i, s in enumerate(seg_ids):
                n = len(forest.seg_tokens[s])
                ids[i, width - n :] = torch.tensor(forest.seg_tokens[s])
                pos[i, width - n :] = torch.arange(forest.seg_pos[s], forest.seg_pos[s] + n)
            cache.begin_segment_pass(seg_ids, width)
            base_model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=True, **{kw: cache})
            cache.end_pass()
        # 2. Each row's own suffix except its last token, left-aligned on the cache's column grid.
        if suffix_len > 0:
            R = forest.num_rows
            ids = torch.zeros(R, suffix_len, dtype=torch.long)
            pos = torch.zeros(R, suffix_len, dtype=torch.long)
            for r, toks in enumerate(forest.suffix_tokens):
                n = len(toks) - 1
                if n:
                    a = forest.ancestor_len(r)
                    ids[r, suffix_len - n :] = torch.tensor(toks[:-1])
                    pos[r, suffix_len - n :] = torch.arange(a, a + n)
            base_model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=True, **{kw: cache})
            cache.end_pass()
    return cache, {"input_ids": input_ids, "attention_mask": mask.to(input_ids.dtype) if attention_mask is None else attention_mask}


def _max_new_tokens(model, input_len: int, kwargs: dict) -> int | None:
    gc = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("max_new_tokens") is not None:
        return kwargs["max_new_tokens"]
    if kwargs.get("max_length") is not None:
        return max(kwargs["max_length"] - input_len, 0)
    if getattr(gc, "max_new_tokens", None) is not None:
        return gc.max_new_tokens
    if getattr(gc, "max_length", None) is not None:
        return max(gc.max_length - input_len, 0)
    return None


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, min_shared_tokens: int = 16, **kwargs):
    """Drop-in for ``model.generate(input_ids, attention_mask=..., **kwargs)`` on a batch of shared-prefix prompts.

    Prefills each shared segment once into a :class:`PrefixSharingCache`, then runs transformers' generate on
    it. Returns what ``model.generate`` returns for the same arguments (tensor or ``GenerateOutput``, same row
    order, prompts in the same left-padded layout). Supports greedy, sampling, ``num_return_sequences``, beam
    search, stop strings/EOS, ``return_dict_in_generate`` with scores and logits. Assisted generation and
    contrastive search raise (they crop the cache).
    """
    for unsupported in ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha", "cache", "past_key_values"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"flashforge_hf.generate does not support `{unsupported}` (it needs a cache it can crop or its own cache); use model.generate.")
    gc = kwargs.get("generation_config") or model.generation_config
    num_beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
    nrs = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
    copies = num_beams if num_beams > 1 else nrs
    mask = _check_inputs(model, input_ids, attention_mask)
    cache, inputs = _prefill(
        model,
        input_ids,
        mask,
        attention_mask,
        max_new_tokens=_max_new_tokens(model, input_ids.shape[1], kwargs),
        num_copies=copies,
        min_shared_tokens=min_shared_tokens,
    )
    return model.generate(**inputs, **{model_cache_kwarg(model): cache}, **kwargs)
