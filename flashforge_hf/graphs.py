"""Decode without host overhead: every decode step of a batch replayed from one captured CUDA graph.

Eager transformers spends tens of microseconds of Python per layer per decode step (milliseconds a step on a
model of a few dozen layers, whatever the batch); here the whole step (every layer's projections, FlashForge
attention, the cache append, the logits) is captured once and replayed, so its host cost does not grow with the
number of layers.

How it stays valid as the suffixes grow. The cache runs in static mode (see cache.py): its suffix buffers are
allocated for prompt + ``max_new_tokens`` up front and never move; the suffix kernel reads where the suffixes end
from device memory and stores each step's token at the last column itself; the positions and the end are
advanced on the device by the graph itself. The attention plan (how the suffixes are split over thread
blocks) is made for the largest end of a bucket (dispatch.bucket_bound: powers of two from 256 columns up, capped at
the capacity), so a generation of n tokens captures at most about log2(n / 256) + 2 graphs, one at a time. The
first step of a bucket whose plan differs from the previous one's runs eagerly with the new plan (it also
compiles what the graph needs), and the graph is captured right after it; where the plan stays the same (no
suffix splits: batches whose rows alone fill the card) the graph goes on across the bucket. Graph and eager
steps run the same kernels with the same plan, so they give identical results.

:func:`decode` is the decoding loop, a ``custom_generate`` callable for ``model.generate`` (greedy and
multinomial sampling with every logits processor and stopping criterion transformers builds; EOS rows padded as
transformers pads them; its two minimum-length processors, which copy the whole float32 logits every step, run
in place instead, see :class:`EosFloor`). It never waits for the GPU inside the loop: whether every row has
finished is copied to pinned host memory asynchronously and read once the GPU got there (the host runs at most
:data:`LAG` steps ahead), and steps run past the end are trimmed, so the output equals transformers' loop.
Under tensor parallel (several processes) each step holds collectives, so every rank must run the same steps:
the flags are then read exactly LAG steps late, after waiting for that step, on every rank alike. Rows that have
finished stop costing suffix-attention work (their suffix start moves past the end; the shared segments are read
once for all rows anyway), unless scores or logits are returned: transformers keeps computing finished rows'
logits, and so do we then. Off CUDA the same static steps run eagerly.

``compile=True`` runs the step through ``torch.compile`` (inductor, default mode) before capturing it: the
model's own non-attention work (RMSNorm, rotary embedding, SiLU, residual adds: some 35 small kernels per layer in
eager transformers) is fused into a few kernels per layer; the cache update and the attention stay ours (they are
``torch.compiler.disable``d, so the compiled code breaks around them). It costs a compilation on the first step
of a new model or batch size (seconds to a minute). Inductor compiles with :data:`INDUCTOR_CONFIG`: its fused
kernels round each intermediate to the model's dtype where the eager model's separate ops store it
(``emulate_precision_casts``), so the compiled step follows the eager one's roundings; left to keep float32
between the fused ops, its bf16 logits drift from the eager step's about as far as stock's are from an fp32
model, for no gain in step time (docs/cuda-graphs.md, "compile=True").
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, MinLengthLogitsProcessor,
                          MinNewTokensLengthLogitsProcessor, StoppingCriteriaList, StopStringCriteria)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import PrefixSharingCache
from .compat import model_cache_kwarg, output_cache_field
from .dispatch import bucket_bound
from .models import layer_devices
from .projections import fused_qkv

LAG = 4  # decode steps the host may run ahead of the GPU before it waits
INDUCTOR_CONFIG = {"emulate_precision_casts": True}  # compile=True: round as the eager model does (module docstring)


def several_processes() -> bool:
    """Whether this process is one of several in a torch.distributed group (tensor parallel: every decode step
    holds collectives, so every rank must run the same steps)."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class GraphDecoder:
    """Decode steps of one batch on a prefilled :class:`PrefixSharingCache`, one token per row per step.

    ``positions``: int64 [R], the position id of each row's next input token (its last prompt token at first).
    ``use_graph``: capture and replay CUDA graphs (CUDA only); otherwise every step runs eagerly through the
    same static path (same kernels, same plans). ``compile``: each step runs the model through ``torch.compile``
    (see the module docstring). Call :meth:`close` when done (also on error): it leaves the cache usable by an
    eager ``generate`` again.
    """

    def __init__(self, model, cache: PrefixSharingCache, positions: torch.Tensor, use_graph: bool,
                 compile: bool = False):
        if use_graph and cache.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device.")
        self.model = model
        self.compiled = torch.compile(model) if compile else None
        self.cache = cache
        self.use_graph = use_graph
        R = cache.num_rows
        device = cache.device
        cache.begin_static()
        self.cursor0 = cache.cursor  # columns written before the first step
        self.ids = torch.zeros(R, 1, dtype=torch.long, device=device)
        self.pos = positions.reshape(R, 1).to(device=device, dtype=torch.long).clone()
        self.logits = torch.empty(R, model.config.vocab_size, dtype=torch.float32, device=device)
        self.kwarg = model_cache_kwarg(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.bound = 0
        self.captures = 0
        self.graph_bytes = 0  # CUDA memory the largest graph's pool held
        self._held = ExitStack()  # q/k/v projections fused for the decode (see projections.py), undone by close()
        self.fused_layers = self._held.enter_context(fused_qkv(model))

    def _forward(self) -> None:
        """One decode step on the static buffers; advances the positions and the suffix end on the device."""
        kw = dict(input_ids=self.ids, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                  **{self.kwarg: self.cache})
        if self.compiled is None:
            out = self.model(**kw)
        else:  # every layer is one code object: its index must not be a compile-time constant (one compile, not 32)
            with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True), \
                    torch._inductor.config.patch(INDUCTOR_CONFIG):
                out = self.compiled(**kw)
        self.logits.copy_(out.logits[:, -1])
        self.pos += 1
        self.cache.advance_static()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (int64 [R]) and return the next-token logits, float32 [R, V]: a buffer that the next
        step overwrites (clone what you keep)."""
        cursor = self.cache.cursor
        if cursor >= self.cache.capacity:
            raise ValueError(
                f"The PrefixSharingCache holds {self.cache.capacity} suffix columns and all are written: prefill "
                "it with a larger max_new_tokens."
            )
        self.ids.copy_(tokens.reshape(-1, 1))
        bound = bucket_bound(cursor + 1, self.cache.capacity)
        if bound != self.bound:  # a new bucket: the graph goes on if its plan is the same, else one eager step
            key = self.cache.static_plan_key
            same_plan = self.graph is not None and key(bound) == key(self.bound)
            self.bound = bound  # the cache plans its forward for this bound too (dispatch.bucket_bound)
            if same_plan:
                self.graph.replay()
            else:
                self.graph = None
                if self.use_graph:  # with the new plan, then the capture
                    self._eager_then_capture()
                else:
                    self._forward()
        elif self.graph is not None:
            self.graph.replay()
        else:
            self._forward()
        self.cache.count_static_step()
        return self.logits

    def _eager_then_capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the real step; it also compiles/allocates what the capture needs
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        if self.cache.cursor + 1 >= self.bound:  # the bucket has no further step
            return
        before = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        # Tensor parallel: NCCL's watchdog thread may query events of the eager step's collectives during the
        # capture, which the default ("global") mode forbids to every thread.
        mode = "thread_local" if several_processes() else "global"
        try:
            with torch.cuda.graph(graph, capture_error_mode=mode):  # a private pool; the previous one is gone
                self._forward()
        except torch.cuda.OutOfMemoryError as e:
            raise MemoryError(
                f"Capturing the decode step of {self.cache.num_rows} rows as a CUDA graph ran out of GPU memory: "
                "lower the batch (batch_size=) or max_new_tokens, or pass cuda_graph=False."
            ) from e
        self.graph = graph
        self.captures += 1
        self.graph_bytes = max(self.graph_bytes, torch.cuda.memory_reserved() - before)

    def close(self, steps: int | None = None) -> None:
        """Drop the graph, undo every step after the first ``steps`` (default: keep all), restore the finished
        rows' suffix starts and leave static mode; records :data:`last_stats`."""
        self.graph = None
        self._held.close()
        self.cache.end_static(self.cache.cursor if steps is None else self.cursor0 + steps)
        static = sum(t.numel() * t.element_size() for t in (self.ids, self.pos, self.logits, self.cache.suffix_start))
        last_stats.clear()
        last_stats.update(rows=self.cache.num_rows, graphs=self.use_graph, compiled=self.compiled is not None,
                          captures=self.captures, fused_qkv_layers=self.fused_layers,
                          graph_pool_bytes=self.graph_bytes, static_bytes=static)


last_stats: dict = {}  # of the latest decode: rows, graphs, compiled, captures, fused_qkv_layers, graph_pool_bytes, static_bytes
_fallback_warned: set = set()


class EosFloor(LogitsProcessor):
    """What transformers' ``MinLengthLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor`` do, in place:
    while the sequences are shorter than ``min_len`` tokens (prompt included), the scores of ``eos`` (int64 ids
    on the scores' device, each in [0, vocab)) become -inf; from then on nothing runs. transformers' versions
    copy the float32 scores and rewrite all of them on every step (a pass over the logits per step); :func:`decode`
    swaps them for this where it owns the scores tensor."""

    def __init__(self, min_len: int, eos: torch.Tensor):
        self.min_len, self.eos = min_len, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] < self.min_len:
            scores.index_fill_(-1, self.eos, -float("inf"))
        return scores


def lean_processors(processors, vocab_size: int, device) -> LogitsProcessorList:
    """``processors`` with transformers' two minimum-length processors (exactly those classes) replaced by
    :class:`EosFloor` for scores on ``device``, which edits the scores in place: only for callers that own the
    scores tensor."""
    out = LogitsProcessorList()
    for p in processors:
        if type(p) in (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor):
            eos = p.eos_token_id.reshape(-1).to(device=device, dtype=torch.long)
            eos = eos[(eos >= 0) & (eos < vocab_size)]  # ids torch.isin would never match; one sync per generate
            if type(p) is MinLengthLogitsProcessor:
                min_len = p.min_length
            else:
                min_len = p.prompt_length_to_skip + p.min_new_tokens
            p = EosFloor(min_len, eos)
        out.append(p)
    return out


def unsupported(generation_config, model_kwargs: dict) -> str | None:
    """Why :func:`decode` cannot serve these settings, or None."""
    gc = generation_config
    if (gc.num_beams or 1) > 1:
        return "beam search"
    for flag in ("output_attentions", "output_hidden_states"):
        if getattr(gc, flag, False) and gc.return_dict_in_generate:
            return flag
    if getattr(gc, "is_assistant", False) or model_kwargs.get("assistant_model") is not None:
        return "assisted generation"
    return None


def decode_policy(model, cuda_graph: bool | None, compile: bool, max_new: int | None, gc, kwargs: dict) -> dict | None:
    """How decoding runs, for generate's settings ``gc`` (see generation.effective_generation_config): None for transformers'
    eager loop, else the ``cuda_graph`` / ``compile`` settings of our static loop (graphs.decode).

    ``cuda_graph`` None means CUDA graphs on CUDA when the settings allow them (else transformers' eager loop,
    said once); True requires them; False never. ``compile`` True requires our static loop (with CUDA graphs on
    CUDA unless ``cuda_graph`` is False; eager steps elsewhere)."""
    if cuda_graph is False and not compile:
        return None
    reasons = []
    if max_new is None:
        reasons.append("max_new_tokens is not set")
    if why := unsupported(gc, kwargs):
        reasons.append(why)
    if kwargs.get("synced_gpus"):
        reasons.append("synced_gpus (DeepSpeed ZeRO-3 / FSDP)")
    if compile and several_processes():  # CUDA graphs alone serve tensor parallel (graphs.decode)
        reasons.append("several processes (tensor parallel)")
    if layer_devices(model):
        reasons.append("the model spans several devices (device_map)")
    cuda = model.device.type == "cuda"
    if compile:
        if reasons:
            raise NotImplementedError(f"compile=True cannot be served: {'; '.join(reasons)}. Pass compile=False.")
        if cuda_graph and not cuda:
            raise NotImplementedError(f"cuda_graph=True needs CUDA, the model is on {model.device.type}.")
        return dict(cuda_graph=cuda and cuda_graph is not False, compile=True)
    if not cuda:
        reasons.insert(0, f"the model is on {model.device.type}, not CUDA")
    if not reasons:
        return dict(cuda_graph=True, compile=False)
    if cuda_graph:
        raise NotImplementedError(f"cuda_graph=True cannot be served: {'; '.join(reasons)}. Pass cuda_graph=None or False.")
    if cuda:
        warn_fallback("; ".join(reasons))
    return None


def decode_kwargs(model, kwargs: dict, cuda_graph: bool = True, compile: bool = False) -> dict:
    """``kwargs`` of ``model.generate`` made ready for :func:`decode` as its ``custom_generate``.

    transformers hands a ``custom_generate`` callable neither the ``tokenizer`` nor the ``streamer`` (5.17 to
    5.24), so stop strings become a stopping criterion here and the streamer travels as ``graph_streamer``."""
    kw = dict(kwargs, custom_generate=decode, cuda_graph=cuda_graph, compile=compile)
    gc = kw.get("generation_config") or model.generation_config
    stop = kw.pop("stop_strings", None) or getattr(gc, "stop_strings", None)
    tokenizer = kw.pop("tokenizer", None)
    if stop:
        if tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer=... as well.")
        criteria = StoppingCriteriaList(kw.get("stopping_criteria") or [])
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop))
        kw.update(stopping_criteria=criteria, stop_strings=None)
    if kw.get("streamer") is not None:
        kw["graph_streamer"] = kw.pop("streamer")
    return kw


def decode(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
           synced_gpus: bool = False, streamer=None, cuda_graph: bool = True, compile: bool = False,
           graph_streamer=None, **model_kwargs):
    """transformers' sampling loop (greedy or multinomial) on a prefilled :class:`PrefixSharingCache`, each step
    replayed from a CUDA graph (``cuda_graph``; on CUDA; off, the same static steps run eagerly), its forward
    compiled by ``torch.compile`` when ``compile`` (see the module docstring). Use through
    :func:`flashforge_hf.generate`, or as ``model.generate(**decode_kwargs(model, dict(..., past_key_values=cache)))``
    (``cache=`` on transformers >= 5.24), which passes stop strings and a streamer on.

    Same arguments and results as transformers' ``_sample``: ``input_ids`` [B, L] the (expanded) prompts,
    returns the sequences [B, L + new] or a ``GenerateDecoderOnlyOutput`` with scores/logits when asked."""
    gc = generation_config
    cache, new = _decode_inputs(model, input_ids, gc, synced_gpus, model_kwargs)
    if graph_streamer is not None:  # transformers did not see it: the prompt goes first, as generate would do
        streamer = graph_streamer
        streamer.put(input_ids.cpu())
    B, L = input_ids.shape
    pad = gc._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    keep_scores = gc.return_dict_in_generate and gc.output_scores
    keep_logits = gc.return_dict_in_generate and gc.output_logits
    # Finished rows stop costing suffix attention, unless their (meaningless but returned) logits are asked for.
    skip_finished = has_eos and not (keep_scores or keep_logits)
    scores, raw = [], []
    device = input_ids.device
    if not keep_logits:  # the processors then get a buffer of ours (or our copy of it), never a returned tensor
        logits_processor = lean_processors(logits_processor, model.config.vocab_size, device)
    mask = model_kwargs.get("attention_mask")
    positions = (mask.long().sum(-1) - 1) if mask is not None else torch.full((B,), L - 1, device=device)
    seq = torch.empty(B, L + new, dtype=input_ids.dtype, device=device)
    seq[:, :L] = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    flags = AllDoneFlags(new, device)
    stop = None  # the first step that finished every row
    runner = GraphDecoder(model, cache, positions, use_graph=cuda_graph and device.type == "cuda", compile=compile)
    n = None  # steps kept: those up to the first that finished every row (later ones are undone)
    try:
        tokens = input_ids[:, -1]
        for t in range(new):
            logits = runner.step(tokens)
            if keep_scores or keep_logits:  # kept past this step: out of the graph's buffer
                logits = logits.clone()
            if keep_logits:
                raw.append(logits)  # the tensor the processors get, as in transformers' loop
            next_scores = logits_processor(seq[:, : L + t], logits)
            if keep_scores:
                scores.append(next_scores)
            tokens = _next_tokens(next_scores, gc.do_sample)
            if has_eos:
                tokens = torch.where(unfinished, tokens, pad)
            seq[:, L + t] = tokens
            if streamer is not None:
                streamer.put(tokens.cpu())
            unfinished &= ~stopping_criteria(seq[:, : L + t + 1], next_scores)
            if skip_finished:
                cache.retire_rows(~unfinished)
            stop = flags.record(t, unfinished)
            if stop is not None:
                break
        else:
            stop = flags.first_done(new)
        n = new if stop is None else stop + 1
    finally:
        runner.close(steps=n)
    if streamer is not None:
        streamer.end()
    seq = seq[:, : L + n]
    if not gc.return_dict_in_generate:
        return seq
    return GenerateDecoderOnlyOutput(sequences=seq, scores=tuple(scores[:n]) if keep_scores else None,
                                     logits=tuple(raw[:n]) if keep_logits else None,
                                     **{output_cache_field(GenerateDecoderOnlyOutput): cache})


def _next_tokens(scores: torch.Tensor, sample: bool) -> torch.Tensor:
    """int64 [R]: a draw from softmax(scores) per row (``sample``), else its argmax, as transformers' loop picks."""
    if sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


def _decode_inputs(model, input_ids, gc, synced_gpus: bool, model_kwargs: dict) -> tuple[PrefixSharingCache, int]:
    """(the cache, the number of new tokens) of a :func:`decode` call; raises for what it cannot serve."""
    kw = model_cache_kwarg(model)
    cache = model_kwargs.get(kw)
    if not isinstance(cache, PrefixSharingCache):
        raise TypeError(f"flashforge_hf.graphs.decode needs a PrefixSharingCache as `{kw}` (see prefill_shared).")
    why = unsupported(gc, model_kwargs)
    if why:
        raise NotImplementedError(f"flashforge_hf.graphs.decode does not support {why}: use the eager loop "
                                  "(flashforge_hf.generate(..., cuda_graph=False)).")
    if synced_gpus:
        raise NotImplementedError("flashforge_hf.graphs.decode does not support synced_gpus (DeepSpeed ZeRO-3/FSDP).")
    B, L = input_ids.shape
    if B != cache.num_rows:
        raise ValueError(f"The cache holds {cache.num_rows} rows but generate expanded the batch to {B}: pass "
                         "the same num_return_sequences to generate as to prefill_shared.")
    new = max(0, gc.max_length - L)
    if cache.cursor + new > cache.capacity:
        raise ValueError(
            f"{new} new tokens do not fit the cache's suffix buffers ({cache.capacity - cache.cursor} columns left): "
            "prefill it with max_new_tokens at least as large as generate's."
        )
    return cache, new


class AllDoneFlags:
    """Whether every row has finished after each decode step, learnt without waiting for the GPU: each step's
    flag is copied to pinned host memory asynchronously and read once the GPU got there; the host runs at most
    :data:`LAG` steps ahead (so at most LAG steps run past the end, and are undone).

    Several processes (tensor parallel): every rank must run the same steps, so the flags are read exactly LAG
    steps late, after waiting for that step, never by polling (which would make ranks stop at different steps)."""

    def __init__(self, steps: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flags = torch.zeros(max(steps, 1), dtype=torch.bool, pin_memory=self.cuda)
        self.events: list = []
        self.checked = 0  # steps whose flag was read
        self.lockstep = several_processes()

    def record(self, t: int, unfinished: torch.Tensor) -> int | None:
        """After step ``t`` (``unfinished``: bool [R], device): the first step that finished every row, if known
        by now, else None."""
        self.flags[t : t + 1].copy_(~unfinished.any().reshape(1), non_blocking=True)
        if self.cuda:
            self.events.append(torch.cuda.Event())
            self.events[-1].record()
            if t - self.checked >= LAG:
                self.events[self.checked].synchronize()
        newest = t - LAG if self.lockstep else t  # the newest step whose flag may be read now
        while self.checked <= newest and (self.lockstep or not self.cuda or self.events[self.checked].query()):
            if bool(self.flags[self.checked]):
                return self.checked
            self.checked += 1
        return None

    def first_done(self, steps: int) -> int | None:
        """After the last of ``steps`` steps: the first step that finished every row, or None."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        done = torch.nonzero(self.flags[self.checked : steps]).flatten()
        return self.checked + int(done[0]) if len(done) else None


def warn_fallback(reason: str) -> None:
    """Say once per reason that flashforge_hf.generate runs transformers' eager loop instead of CUDA graphs."""
    if reason not in _fallback_warned:
        _fallback_warned.add(reason)
        warnings.warn(f"flashforge_hf.generate: CUDA graphs off ({reason}); decoding runs transformers' eager loop.",
                      stacklevel=3)
