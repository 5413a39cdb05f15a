"""Prefill each shared segment once, then hand the cache to transformers' ``generate``."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from . import graphs
from .cache import ATTN_IMPLEMENTATION, PrefixSharingCache, prompts_per_batch
from .compat import model_cache_kwarg
from .prefix_tree import build_forest
from .projections import fused_qkv

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
    dist = getattr(config, "distributed_config", None)  # from_pretrained(..., distributed_config=...)
    for attr, what in (("pp_size", "pipeline parallelism"), ("fsdp_size", "FSDP")):
        if (getattr(dist, attr, None) or 1) > 1:
            raise NotImplementedError(
                f"flashforge does not support {what} ({attr}={getattr(dist, attr)}): each process must run every "
                "layer on the full batch. Use tensor parallelism (from_pretrained(..., distributed_config="
                "DistributedConfig(tp_plan='auto')) under torchrun) or device_map='auto' (the layers spread over "
                "the GPUs of one process)."
            )
    if getattr(dist, "enable_sequence_parallel", False):
        raise NotImplementedError(
            "flashforge does not support sequence parallelism (enable_sequence_parallel=True): use tensor "
            "parallelism without it (DistributedConfig(tp_plan='auto'))."
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
    mask = _check_inputs(model, input_ids, attention_mask)
    if num_copies < 1:
        raise ValueError(f"num_copies must be >= 1, got {num_copies}.")
    check_model(model, longest_row=input_ids.shape[1] + (max_new_tokens or 0))
    forest = build_forest(input_ids, mask, min_shared_tokens=min_shared_tokens, copies=num_copies)
    cache = _prefilled_cache(model, forest, input_ids.shape[1], max_new_tokens, input_ids.device)
    return cache, {"input_ids": input_ids, "attention_mask": mask.to(input_ids.dtype) if attention_mask is None else attention_mask}


def _prefilled_cache(model, forest, width: int, max_new_tokens, device, segments=None) -> PrefixSharingCache:
    """A cache for ``forest``'s rows with their segments (unless ``segments`` already holds them) and suffixes
    prefilled."""
    cache = _new_cache(model, forest, width, max_new_tokens, device, segments=segments)
    if segments is None:
        _prefill_segments(model, cache)
    _prefill_suffixes(model, cache)
    return cache


def _new_cache(model, forest, width: int, max_new_tokens, device, segments=None) -> PrefixSharingCache:
    """A cache for ``forest``'s rows of a batch ``width`` columns wide (the last column is left for generate)."""
    suffix_len = max((len(t) - 1 for t in forest.suffix_tokens), default=0)
    return PrefixSharingCache(model.config, forest, device=device, max_new_tokens=max_new_tokens,
                              base=width - 1 - suffix_len, suffix_len=suffix_len, segments=segments)


def _forward(model, cache, ids, pos):
    with torch.no_grad():  # not inference_mode: generate later updates the cache's buffers outside it
        model.base_model(input_ids=ids.to(cache.device), position_ids=pos.to(cache.device), use_cache=True,
                         **{model_cache_kwarg(model): cache})
    cache.end_pass()


def _prefill_segments(model, cache: PrefixSharingCache) -> None:
    """Shared segments, one forward pass per tree level (all segments of a level batched, left-padded)."""
    forest = cache.forest
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
        _forward(model, cache, ids, pos)


def _prefill_suffixes(model, cache: PrefixSharingCache) -> None:
    """Each row's own suffix except its last token, left-aligned on the cache's column grid."""
    forest, width = cache.forest, cache.suffix_len
    if width == 0:
        return
    ids = torch.zeros(forest.num_rows, width, dtype=torch.long)
    pos = torch.zeros(forest.num_rows, width, dtype=torch.long)
    for r, toks in enumerate(forest.suffix_tokens):
        n = len(toks) - 1
        if n:
            a = forest.ancestor_len(r)
            ids[r, width - n :] = torch.tensor(toks[:-1])
            pos[r, width - n :] = torch.arange(a, a + n)
    _forward(model, cache, ids, pos)


def max_new_tokens(model, input_len: int, kwargs: dict) -> int | None:
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


def unserved_feature(gc, kwargs: dict) -> str | None:
    """The generation feature among ``model.generate``'s arguments (``gc``: their settings, see
    :func:`effective_generation_config`) that our generate cannot serve, or None: those that crop the cache
    (assisted decoding, prompt lookup, contrastive search) or bring their own cache."""
    for name, what in (("cache", "a cache of the caller's"), ("past_key_values", "a cache of the caller's"),
                       ("assistant_model", "assisted generation (assistant_model)")):
        if kwargs.get(name) is not None:
            return what
    for name, what in (("prompt_lookup_num_tokens", "prompt lookup decoding"), ("penalty_alpha", "contrastive search"),
                       ("assistant_early_exit", "assisted generation (assistant_early_exit)")):
        if getattr(gc, name, None) is not None:
            return what
    return None


def effective_generation_config(model, kwargs: dict):
    """The settings generate will run with: the given (or the model's) generation config, a copy, with the
    ``kwargs`` that name its fields applied."""
    gc = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    gc.update(**{k: v for k, v in kwargs.items() if hasattr(gc, k)})
    return gc


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, min_shared_tokens: int = 16,
             batch_size: int | None = None, progress: bool = True, cuda_graph: bool | None = None,
             compile: bool = False, **kwargs):
    """Drop-in for ``model.generate(input_ids, attention_mask=..., **kwargs)`` on a batch of shared-prefix prompts.

    Prefills each shared segment once into a :class:`PrefixSharingCache`, then runs transformers' generate on
    it. Returns what ``model.generate`` returns for the same arguments (tensor or ``GenerateOutput``, same row
    order, prompts in the same left-padded layout). Supports greedy, sampling, ``num_return_sequences``, beam
    search, stop strings/EOS, ``return_dict_in_generate`` with scores and logits. Assisted generation and
    contrastive search raise (they crop the cache).

    Many prompts: when they do not all fit the device's free memory (estimated before any work, see
    :func:`prompts_per_batch`), or when ``batch_size`` (prompts per batch) is given, the prompts run in batches
    that share one prefill of every shared segment: each segment is prefilled and stored once per call, not
    once per batch. Finished batches are padded with the pad token to the longest one, as one stock batch
    would be. Sampling then draws random numbers batch by batch (seeded runs differ from one stock batch), and
    ``return_dict_in_generate`` needs a single batch.

    ``cuda_graph``: decode by replaying one CUDA graph per step (:mod:`flashforge_hf.graphs`: the host cost of a
    step no longer grows with the layers). None (default): on CUDA for greedy and sampling with ``max_new_tokens``
    known, otherwise transformers' eager loop (said once, with the reason); True: required (raises when it cannot
    apply); False: transformers' eager loop. Both loops run the same kernels with the same plans and the same
    fused q/k/v projections, so on one card they give the same tokens and logits, bit for bit.

    ``compile``: run each decode step through ``torch.compile`` before capturing it, which fuses the model's
    non-attention work (norms, rotary embedding, activations, residuals) into a few kernels per layer: a faster
    step, for a compilation (seconds to a minute) on the first call per model and batch size; logits then differ
    from the eager model's by rounding. It needs our decode loop (greedy or sampling, ``max_new_tokens`` known);
    off CUDA the compiled steps run without graphs.
    """
    gc = effective_generation_config(model, kwargs)
    if why := unserved_feature(gc, kwargs):
        raise NotImplementedError(f"flashforge_hf.generate does not support {why}; use model.generate(..., flashforge=False).")
    mask = _check_inputs(model, input_ids, attention_mask)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 prompts, got {batch_size}.")
    num_beams = gc.num_beams or 1
    copies = num_beams if num_beams > 1 else gc.num_return_sequences or 1
    B, width = input_ids.shape
    max_new = max_new_tokens(model, width, kwargs)
    check_model(model, longest_row=width + (max_new or 0))
    policy = graphs.decode_policy(model, cuda_graph, compile, max_new, gc, kwargs)  # raises before any work
    forest = build_forest(input_ids, mask, min_shared_tokens=min_shared_tokens, copies=copies)
    per_batch = min(prompts_per_batch(model, forest, copies, max_new or 256, input_ids.device), batch_size or B)
    if policy is not None:
        kwargs = graphs.decode_kwargs(model, kwargs, **policy)
    # transformers' eager loop runs with q/k/v fused as our static loop does (graphs.GraphDecoder): same GEMMs,
    # and the cache gives its steps the static steps' plans, so both loops give the same results.
    decoding = (lambda: fused_qkv(model)) if policy is None else nullcontext
    kw = model_cache_kwarg(model)
    if per_batch >= B:
        cache = _prefilled_cache(model, forest, width, max_new, input_ids.device)
        with decoding():
            return model.generate(input_ids=input_ids, attention_mask=mask.to(input_ids.dtype), **{kw: cache},
                                  **kwargs)
    if gc.return_dict_in_generate:
        raise NotImplementedError(
            f"return_dict_in_generate needs all {B} prompts in one batch, but {per_batch} fit: pass a larger "
            "batch_size if memory allows, or call flashforge_hf.generate per batch."
        )
    segments = _new_cache(model, forest.select([]), width, max_new, input_ids.device)
    _prefill_segments(model, segments)
    outs = []
    for b0 in tqdm(range(0, B, per_batch), desc="flashforge batches", unit="batch", disable=not progress):
        b1 = min(B, b0 + per_batch)
        cache = _prefilled_cache(model, forest.select(list(range(b0 * copies, b1 * copies))), width, max_new,
                                 input_ids.device, segments=segments)
        with decoding():
            outs.append(model.generate(input_ids=input_ids[b0:b1], attention_mask=mask[b0:b1].to(input_ids.dtype),
                                       **{kw: cache}, **kwargs))
    return _concat_padded(outs, gc)


def _concat_padded(outs: list[torch.Tensor], gc) -> torch.Tensor:
    """The batches' sequences as one tensor, the shorter ones padded at the end (pad token, else EOS, else 0)
    as one stock batch would be."""
    pad = gc.pad_token_id
    if pad is None:
        eos = gc.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    longest = max(o.shape[1] for o in outs)
    return torch.cat([torch.nn.functional.pad(o, (0, longest - o.shape[1]), value=pad if pad is not None else 0)
                      for o in outs])
