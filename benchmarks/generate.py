"""End-to-end generate benchmark (issue 4): random-weight Llama models at real shapes, stock vs prefix reuse
vs FlashForge on shared-prefix workloads, with correctness checks, a decode-step profile and a capacity search.

Workloads (:data:`WORKLOADS`; random token ids, every row the same length so nothing is padded; a fixed
number of new tokens per row, EOS ignored through ``min_new_tokens``):
    doc-qa-4k / doc-qa-16k   one 4,096 (16,384)-token document, 64 (16) questions of 64 tokens, 128 new;
    few-shot-1b / -8b        a 650-token 8-shot prefix, 256 questions of 64 tokens, 256 new;
    parallel-sampling        one 2,048-token prompt, num_return_sequences=64, sampling, 256 new;
    tree                     a 1,024-token system prompt, 8 documents of 2,048 tokens, 8 questions of 64 each;
    no-sharing               64 distinct 1,024-token prompts;
    batch-1                  one 16-token prompt, 128 new.
Methods (:func:`flashforge_hf.comparison.run_generate`): "stock" (sdpa, DynamicCache), "stock-chunked"
(the same with ``prefill_chunk_size``, on the document workloads), "reuse" (the prefix-reuse pattern of the
transformers docs: the prefix common to all rows prefilled once and its cache repeated to every row; not run
where no prefix is common), "flashforge-eager" (:func:`flashforge_hf.generate` with transformers' eager decoding
loop), "flashforge-graph" (the same, each decode step replayed from a CUDA graph; CUDA only),
"flashforge-compiled" (the same with ``compile=True``: the step's non-attention work fused by torch.compile
before capture; CUDA only) and, on batch-1,
"stock-compiled" (transformers' static cache, its forward compiled by generate; CUDA only). A method that runs
out of memory is recorded as "OOM". Only when ``--methods`` names them: "plain-generate" / "plain-generate-compiled"
(our path through ``model.generate``) and "generate-batch" (transformers' continuous batching,
``model.generate_batch`` with paged|sdpa attention and its block sharing of common prefixes: :class:`GenerateBatch`;
where it is missing or fails, its row says why, "not available: ...").

Per workload and method: TTFT (from the call to the first token's logits), median time per output token (the
intervals between a logits processor's CUDA-event stamps; generate-batch: between the host stamps of each
request's consecutive tokens, its TTFT not measured), tokens/s (rows x new tokens / total), peak CUDA
memory of the call, KV-cache bytes after it (generate-batch: not exposed, "-"); per workload the unique KV bytes
(each distinct prompt token once, plus every row's new tokens) and the floor of a decode step at the middle of the
generation: the GEMMs' floor (the weights they read at the bandwidth, or their 2 * GEMM parameters * rows FLOPs at
the matmul rate, whichever is larger; the input embedding is a lookup, not a GEMM) plus the attention's floor (the
unique KV bytes at the bandwidth, or 4 * rows * Hq * context * D per layer at the matmul rate, whichever is larger);
flashforge_hf.ceilings gives the card's rates. The two phases run one after the other, so their floors add.
Best of ``--repeats`` runs after a warm-up (FlashForge warms up on the full batch
so its kernels compile for the timed shapes; the torch baselines on two prompts).

Checks, before timing: teacher-forced logits of ``--check-rows`` rows over 16 random forced tokens, ours (eager
decode steps on a PrefixSharingCache; on CUDA also the compiled graph steps) and stock (one sdpa pass) in the
model's dtype against an fp32 copy of the model: ours passes when its relative L2 error is at most 2x stock's.
Greedy agreement: the share of rows whose first 16 new tokens equal stock's (from the timed greedy runs; for the sampling workload from greedy runs of its
prompt); the stock side is the first of stock, stock-chunked, reuse that ran; passes at 90%. generate-batch's
agreement with the same stock side is reported (greedy_agree_generate_batch, greedy workloads), not part of the pass.

"capacity": with an 8,192-token shared document and 64-token questions, the largest batch each side runs in
one batch (stock-chunked; FlashForge's explicit path, which never splits a batch) and its throughput there.
"profile": one decode step of ours on --profile-workload: GPU time by kernel group, our host time per layer,
host syncs, reallocations and plans per step (:func:`profile_decode_step`).

    python benchmarks/generate.py --workloads doc-qa-4k profile          # on a GPU; see --help
    python benchmarks/generate.py --scale tiny --out-dir /tmp/e2e        # the whole pipeline on CPU, seconds

Results (CSV, markdown with the targets, PNG) go to ``--out-dir`` (default benchmarks/results) as
``generate_<card>.*``; rows of workloads already there from an earlier run are kept, those run now replace them.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

import flashforge_hf
from flashforge_bench.harness import (card_ceilings, card_name, git_commit, random_model,
                                      read_csv, rel_err, tree_batch, utc_now)
from flashforge_hf.ceilings import ceilings_for
from flashforge_hf.comparison import COMPILED, EAGER, GRAPH, STOCK, Run, attention
from flashforge_hf.comparison import run_generate as timed_generate
from flashforge_hf.models import resolve_device

FORCED = 16  # tokens of the teacher-forced check and of the greedy agreement
GREEDY_SHARE = 0.9
STOCK_CHUNKED = "stock-chunked"
REUSE, EXPLICIT, STOCK_COMPILED = "reuse", "flashforge-explicit", "stock-compiled"
PLAIN, PLAIN_COMPILED = "plain-generate", "plain-generate-compiled"  # model.generate on the flashforge model
METHODS = (STOCK_COMPILED, STOCK, STOCK_CHUNKED, REUSE, EAGER, GRAPH, COMPILED)
PLAIN_METHODS = (PLAIN, PLAIN_COMPILED)  # run only when --methods names them: our path through model.generate
GENERATE_BATCH = "generate-batch"  # transformers' continuous batching: run only when --methods names it
NAMED_ONLY = PLAIN_METHODS + (GENERATE_BATCH,)
CUDA_ONLY = (STOCK_COMPILED, GRAPH, COMPILED, PLAIN_COMPILED)
OURS = (EAGER, GRAPH, COMPILED)
OOM_ERRORS = (torch.cuda.OutOfMemoryError, MemoryError)


def flashforge_internals() -> SimpleNamespace:
    """Every name below flashforge_hf's public API that this benchmark uses, all of them here (the core's layout
    changes: fix the names here only). The profile and the compiled teacher-forced check need them.

    Read: ``flashforge_hf.graphs.GraphDecoder`` (the compiled decode step, driven step by step), a
    PrefixSharingCache layer's suffix key buffer ``cache.layers[i].suf_k`` (whether it moved).
    Patched by :func:`instrument` (restored on exit): ``flashforge_hf.cache.PrefixSharingCache.update``,
    ``flashforge_hf.dispatch.ForestPlanner.plan``, ``flashforge_hf.dispatch.HandOff.run`` (timed) and
    ``flashforge_hf.dispatch.plan_forward`` (counted, where the dispatch module looks it up)."""
    from flashforge_hf import cache, dispatch, graphs

    return SimpleNamespace(GraphDecoder=graphs.GraphDecoder, suffix_keys=lambda c, layer=0: c.layers[layer].suf_k,
                           timed={(cache.PrefixSharingCache, "update"): "update_s", (dispatch.HandOff, "run"): "attention_s",
                                  (dispatch.ForestPlanner, "plan"): "plan_s"},
                           counted=(dispatch, "plan_forward"))


FF = flashforge_internals()


# ---- the baselines beside flashforge_hf.comparison's modes -------------------------------------------------------


def common_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Columns, from the left, that every row holds as the same real (unpadded) token."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return int(same.cumprod(0).sum())


def rows_per_prompt(model, generate_kwargs: dict) -> int:
    """Rows generate makes of each prompt: ``num_beams``, else ``num_return_sequences`` (default 1)."""
    gc = model.generation_config
    beams = generate_kwargs.get("num_beams") or gc.num_beams or 1
    return beams if beams > 1 else generate_kwargs.get("num_return_sequences") or gc.num_return_sequences or 1


def reuse_generate(model, input_ids, attention_mask, **generate_kwargs):
    """The prefix-reuse pattern of the transformers docs ("re-use a prompt cache"), for a batch: the columns
    common to all rows (but the last) run through the model once into a DynamicCache, whose K/V are repeated to
    every row (and every copy of ``num_return_sequences``/``num_beams``), then ``model.generate`` continues from
    it on the full prompts (it prefills only the columns after the cached prefix)."""
    from transformers import DynamicCache

    prefix = min(common_prefix_len(input_ids, attention_mask), input_ids.shape[1] - 1)
    copies = rows_per_prompt(model, generate_kwargs)
    kw = flashforge_hf.cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), attention(model, "sdpa"):
        if prefix:
            model(input_ids=input_ids[:1, :prefix], use_cache=True, logits_to_keep=1, **{kw: cache})
            cache.batch_repeat_interleave(input_ids.shape[0] * copies)
        return model.generate(input_ids, attention_mask=attention_mask, **{kw: cache}, **generate_kwargs)


def explicit_generate(model, input_ids, attention_mask, **generate_kwargs):
    """FlashForge's explicit path, always one batch: :func:`flashforge_hf.prefill_shared`, then
    ``model.generate`` on the cache (where :func:`flashforge_hf.generate` would split a batch too large for free
    memory, this one runs it or runs out of memory)."""
    copies = rows_per_prompt(model, generate_kwargs)
    cache, inputs = flashforge_hf.prefill_shared(model, input_ids, attention_mask, num_copies=copies,
                                                 max_new_tokens=generate_kwargs.get("max_new_tokens"))
    return model.generate(**inputs, **{flashforge_hf.cache_kwarg(model): cache}, **generate_kwargs)


def stock_compiled_generate(model, input_ids, attention_mask, **generate_kwargs):
    """transformers' own fast path: sdpa with ``cache_implementation="static"``, whose forward ``generate``
    compiles by itself (torch.compile, mode "reduce-overhead": CUDA graphs) on CUDA."""
    with torch.inference_mode(), attention(model, "sdpa"):
        return model.generate(input_ids, attention_mask=attention_mask, cache_implementation="static",
                              **generate_kwargs)


def plain_generate(settings: dict):
    """Plain ``model.generate`` with FlashForge's ``settings`` (the generate hook's path, which must match
    flashforge_hf.generate's)."""
    def run(model, input_ids, attention_mask, **generate_kwargs):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings, **generate_kwargs)

    return run


@dataclass
class BatchOutput:
    """What :func:`run_generate` reads of a generate output: the sequences, and a cache whose bytes
    ``generate_batch`` does not expose (its paged cache lives and goes inside the call)."""

    sequences: torch.Tensor
    cache: object = field(default_factory=lambda: SimpleNamespace(nbytes=lambda: None))


class GenerateBatch:
    """transformers' continuous batching: ``model.generate_batch`` on each row's unpadded token ids (each copy of
    ``num_return_sequences`` its own request), with ``paged|sdpa`` attention (which transformers 5.25, where the
    prefix is no longer needed, reads as "sdpa") switched on for the call and back after; block sharing of common
    prefixes allowed (``allow_block_sharing``), never a switch to flash attention; EOS off (``eos_token_id=-1``)
    so every request makes ``max_new_tokens``. Each timed call builds its own manager (cache, warm-up, CUDA
    graphs where it takes them): a persistent one would keep the prompts' blocks and skip their prefill in the
    next call. On CUDA transformers sizes the cache from free memory; elsewhere it would size it from system memory
    and warm up at that size, so there it gets the blocks the rows need unshared. A request that fails or comes
    back short raises (generate_batch itself only logs it). ``step_s``: the last call's intervals between the
    host stamps (``record_timestamps``) of each request's consecutive tokens."""

    def __init__(self):
        self.step_s: list[float] = []

    def __call__(self, model, input_ids, attention_mask, *, max_new_tokens, do_sample=False, num_return_sequences=1,
                 **_):
        import dataclasses

        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if not hasattr(model, "generate_batch"):
            raise RuntimeError("this transformers has no model.generate_batch")
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)
                   for _ in range(num_return_sequences)]
        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        cb = ContinuousBatchingConfig(**{k: v for k, v in dict(allow_block_sharing=True, auto_switch_to_flash=False)
                                         .items() if k in fields})
        if input_ids.device.type != "cuda":
            need = max(map(len, prompts)) + max_new_tokens
            cb.num_blocks = len(prompts) * -(-need // (getattr(cb, "page_size", None) or cb.block_size))
            cb.max_batch_tokens = need
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=-1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The `paged|` prefix is no longer needed", FutureWarning)
            with attention(model, "paged|sdpa"):
                outs = list(model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb,
                                                 record_timestamps=True).values())
        bad = [o for o in outs if o.error is not None or len(o.generated_tokens) != max_new_tokens]
        if bad or len(outs) != len(prompts):
            raise RuntimeError(next((o.error for o in bad if o.error), None)
                               or f"{len(outs) - len(bad)} of {len(prompts)} requests came back complete")
        self.step_s = [b - a for o in outs for a, b in zip(o.timestamps, o.timestamps[1:])]
        return BatchOutput(torch.tensor([p + o.generated_tokens for p, o in zip(prompts, outs)]))


BASELINES = {REUSE: reuse_generate, EXPLICIT: explicit_generate, STOCK_COMPILED: stock_compiled_generate,
             PLAIN: plain_generate({}), PLAIN_COMPILED: plain_generate(dict(compile=True)),
             GENERATE_BATCH: GenerateBatch()}


def run_generate(model, input_ids, attention_mask, mode: str, **kwargs) -> Run:
    """:func:`flashforge_hf.comparison.run_generate` for ``mode``: one of its modes or of :data:`BASELINES`
    (generate-batch: no TTFT, its token intervals from :class:`GenerateBatch`)."""
    run = timed_generate(model, input_ids, attention_mask, mode, generator=BASELINES.get(mode), **kwargs)
    return replace(run, ttft_s=None, step_s=BASELINES[mode].step_s) if mode == GENERATE_BATCH else run



@dataclass(frozen=True)
class Workload:
    """A prompt tree: ``levels[i] = (tokens, fanout)``: each node of level i-1 (one root above level 0) has
    ``fanout`` children of ``tokens`` random tokens; every leaf is one prompt (all prompts equally long)."""

    name: str
    shape: str  # harness.SHAPES key
    levels: tuple
    new_tokens: int
    copies: int = 1  # num_return_sequences, with sampling
    chunk: int | None = None  # prefill_chunk_size of the stock-chunked baseline
    compiled: bool = False  # also run stock-compiled (transformers' static cache + torch.compile)

    @property
    def prompts(self) -> int:
        return math.prod(f for _, f in self.levels)

    @property
    def rows(self) -> int:
        return self.prompts * self.copies

    @property
    def prompt_len(self) -> int:
        return sum(t for t, _ in self.levels)

    @property
    def unique_prompt_tokens(self) -> int:
        return sum(t * math.prod(f for _, f in self.levels[: i + 1]) for i, (t, _) in enumerate(self.levels))

    def methods(self, cuda: bool = True) -> list[str]:
        shared = self.levels[0][1] == 1
        return [m for m in METHODS if (m != STOCK_CHUNKED or self.chunk) and (m != REUSE or shared)
                and (m != STOCK_COMPILED or self.compiled) and (cuda or m not in CUDA_ONLY)]

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=self.copies > 1)
        if self.copies > 1:
            kw["num_return_sequences"] = self.copies
        return kw

    def batch(self, vocab: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of the prompts (token ids drawn from [3, vocab))."""
        return tree_batch(self.levels, vocab, device, seed)

    def scaled(self, scale: str) -> "Workload":
        """``full``: as defined; ``tiny``: lengths / 32 (at least 4), fanouts and copies at most 4, at most 8 new
        tokens, the tiny model: the whole pipeline on a CPU in seconds."""
        if scale == "full":
            return self
        return replace(self, shape="tiny", levels=tuple((max(4, t // 32), min(f, 4)) for t, f in self.levels),
                       new_tokens=min(self.new_tokens, 8), copies=min(self.copies, 4),
                       chunk=self.chunk and self.chunk // 32)


def _doc(name, doc, questions, shape="llama-8b", new=128, chunk=1024):
    return Workload(name, shape, ((doc, 1), (64, questions)), new, chunk=chunk)


WORKLOADS = {w.name: w for w in [
    _doc("doc-qa-4k", 4096, 64),
    _doc("doc-qa-16k", 16384, 16),
    _doc("few-shot-1b", 650, 256, "llama-1b", 256, None),
    _doc("few-shot-8b", 650, 256, "llama-8b", 256, None),
    Workload("parallel-sampling", "llama-8b", ((2048, 1),), 256, copies=64),
    Workload("tree", "llama-8b", ((1024, 1), (2048, 8), (64, 8)), 128),
    Workload("no-sharing", "llama-8b", ((1024, 64),), 128),
    Workload("batch-1", "llama-8b", ((16, 1),), 128, compiled=True),
]}
CAPACITY = _doc("capacity", 8192, 1)  # the batch (questions) is searched
CAPACITY_METHODS = (STOCK_CHUNKED, EXPLICIT)
EXTRA = ("capacity", "profile")


# ---- measuring ---------------------------------------------------------------------------------------------------
def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kv_per_token(model) -> int:
    cfg = model.config
    hkv = cfg.num_key_value_heads or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * hkv * d * next(model.parameters()).element_size()


def gemm_params(model) -> list[torch.nn.Parameter]:
    """The parameters a decode step reads in full: all but the input embedding, which is a lookup of the step's
    tokens (unless the output projection shares its weight)."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    return [p for p in model.parameters() if tied or p is not embed]


def step_floor(model, wl: Workload) -> dict:
    """The floor of one decode step at the middle of ``wl``'s generation, in ms (see the module docstring): the
    GEMMs' (weights read, 2 * parameters FLOPs per row) plus the attention's (unique KV bytes, 4 * Hq * D FLOPs
    per layer, row and context token), each the larger of its bytes and FLOPs terms. Keys: ``floor_ms`` and its
    four terms ``floor_{gemm,attn}_{bytes,flops}_ms``."""
    cfg = model.config
    c = ceilings_for(model.get_input_embeddings().weight.device)
    params = gemm_params(model)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    context = wl.prompt_len + wl.new_tokens // 2
    kv = kv_per_token(model) * (wl.unique_prompt_tokens + wl.rows * wl.new_tokens // 2)
    gemm = c.floor_s(sum(p.numel() * p.element_size() for p in params), 2 * wl.rows * sum(p.numel() for p in params))
    attn = c.floor_s(kv, 4 * wl.rows * cfg.num_attention_heads * d * cfg.num_hidden_layers * context)
    return dict(floor_ms=(max(gemm) + max(attn)) * 1e3, floor_gemm_bytes_ms=gemm[0] * 1e3,
                floor_gemm_flops_ms=gemm[1] * 1e3, floor_attn_bytes_ms=attn[0] * 1e3, floor_attn_flops_ms=attn[1] * 1e3)


def run_method(model, wl: Workload, method: str, ids, mask, seed: int = 0, **overrides) -> Run:
    """One timed generate of ``wl`` by ``method`` (a METHODS name or "flashforge-explicit")."""
    kw = dict(wl.generate_kwargs(), **overrides)
    mode = STOCK if method == STOCK_CHUNKED else method
    if method == STOCK_CHUNKED:
        kw["prefill_chunk_size"] = wl.chunk
    return run_generate(model, ids, mask, mode, seed=seed, **kw)


_UNAVAILABLE: set[str] = set()  # generate-batch's reasons already printed


def measure(model, wl: Workload, method: str, ids, mask, repeats: int = 1, warmup: bool = True) -> Run | str:
    """Warm-up, then the best (least total time) of ``repeats`` runs; "OOM" when it runs out of memory;
    generate-batch failing otherwise: "not available: <why>" (printed once per reason)."""
    try:
        if warmup:
            ours = method in OURS + (EXPLICIT,) + PLAIN_METHODS
            warm = (ids, mask) if ours or method == STOCK_COMPILED else (ids[:2], mask[:2])
            run_method(model, wl, method, *warm, max_new_tokens=2, min_new_tokens=2)
            free_memory()
        return min((run_method(model, wl, method, ids, mask) for _ in range(repeats)), key=lambda r: r.total_s)
    except OOM_ERRORS:
        return "OOM"
    except Exception as e:  # generate-batch: transformers' continuous batching, on any version and device
        if method != GENERATE_BATCH:
            raise
        why = f"not available: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        why = why.replace("|", "/")  # a markdown table cell
        if why not in _UNAVAILABLE:
            _UNAVAILABLE.add(why)
            print(f"{method}: {why}")
        return why
    finally:
        free_memory()


def run_metrics(run: Run) -> dict:
    tokens = run.sequences.shape[0] * run.steps
    return dict(status="ok", ttft_ms=None if run.ttft_s is None else run.ttft_s * 1e3,
                tpot_ms=run.tpot_median_s * 1e3, tokens_per_s=tokens / run.total_s, total_s=run.total_s,
                kv_gib=None if run.kv_bytes is None else run.kv_bytes / 2**30,
                peak_gib=None if run.peak_bytes is None else run.peak_bytes / 2**30)


# ---- correctness checks ------------------------------------------------------------------------------------------
def check_rows(prompts: int, n: int) -> list[int]:
    """``n`` prompt indices: pairs of neighbours spread over the batch (so a tree keeps shared subtrees)."""
    starts = [i * prompts // max(1, n // 2) for i in range(max(1, n // 2))]
    return sorted({r for s in starts for r in (s, s + 1) if r < prompts})[:n]


def teacher_forced(model, ids, mask, forced, ours: bool, compile: bool = False) -> torch.Tensor:
    """Logits [rows, steps, V] (float32) predicting each forced token after the left-padded prompts ``ids``/``mask``:
    decode steps on a PrefixSharingCache (ours: eager; with ``compile``, the compiled steps of
    ``flashforge_hf.generate(..., compile=True)``, replayed from CUDA graphs on CUDA), else one sdpa pass over
    prompt + forced tokens."""
    n = forced.shape[1]
    if ours and compile:
        cache, _ = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=n)
        runner = FF.GraphDecoder(model, cache, mask.sum(-1) - 1, use_graph=ids.is_cuda, compile=True)
        out, tokens = [], ids[:, -1]
        try:
            for j in range(n):
                out.append(runner.step(tokens).clone())
                tokens = forced[:, j]
        finally:
            runner.close()
        return torch.stack(out, 1)
    if ours:
        cache, _ = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=n)
        kw, pos, step_in, out = flashforge_hf.cache_kwarg(model), mask.sum(-1, keepdim=True) - 1, ids[:, -1:], []
        for j in range(n):
            out.append(model(input_ids=step_in, position_ids=pos + j, use_cache=True, logits_to_keep=1,
                             **{kw: cache}).logits[:, -1].float())
            step_in = forced[:, j : j + 1]
        return torch.stack(out, 1)
    full_mask = torch.cat([mask, torch.ones_like(forced)], 1)
    with attention(model, "sdpa"):
        logits = model(input_ids=torch.cat([ids, forced], 1), attention_mask=full_mask, use_cache=False,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0), logits_to_keep=n + 1).logits
    return logits[:, :-1].float()


def logits_check(model, wl: Workload, ids, rows: int, seed: int = 0) -> dict:
    """Relative L2 error of ours and of stock against an fp32 copy of the model (see the module docstring)."""
    sub = ids[check_rows(wl.prompts, rows)]
    g = torch.Generator().manual_seed(seed + 1)
    forced = torch.randint(3, model.config.vocab_size, (sub.shape[0], FORCED), generator=g).to(ids.device)
    with torch.no_grad():
        mask = torch.ones_like(sub)
        ours = teacher_forced(model, sub, mask, forced, ours=True)
        compiled = teacher_forced(model, sub, mask, forced, ours=True, compile=True) if ids.is_cuda else None
        stock = teacher_forced(model, sub, mask, forced, ours=False)
        free_memory()
        reference = copy.deepcopy(model).float()
        ref = teacher_forced(reference, sub, mask, forced, ours=False)
        del reference
    free_memory()
    err_stock = rel_err(stock, ref)
    errs = [rel_err(x, ref) for x in (ours, compiled) if x is not None]
    return dict(check_rows=sub.shape[0], logit_err_stock=err_stock, logit_err_ours=errs[0],
                logit_err_compiled=errs[1] if len(errs) > 1 else None,
                logits_ok=max(errs) <= 2 * err_stock + 1e-6)


def token_agreement(a: torch.Tensor, b: torch.Tensor, n: int = FORCED) -> float:
    """Share of rows whose first ``n`` tokens are equal in ``a`` and ``b`` (int64 [rows, >= n]: new tokens only)."""
    return float((a[:, :n] == b[:, :n]).all(1).float().mean())


def greedy_agreement(a: Run, b: Run) -> float:
    """Share of rows whose first 16 (FORCED) new tokens are equal in two runs of the same prompts."""
    n = min(FORCED, a.steps, b.steps)
    return token_agreement(a.sequences[:, a.prompt_len :], b.sequences[:, b.prompt_len :], n)


def greedy_check(model, wl: Workload, ids, mask, runs: dict) -> dict:
    """Share of rows whose first 16 greedy tokens equal stock's (the first of stock, stock-chunked and reuse
    that ran: all three are transformers' sdpa math), for ours eager (greedy_agree) and with CUDA graphs
    (greedy_agree_graph) and compiled (greedy_agree_compiled)."""
    stock = next((runs[m] for m in (STOCK, STOCK_CHUNKED, REUSE) if isinstance(runs.get(m), Run)), None)
    ours = {m: runs.get(m) for m in OURS}
    if wl.copies > 1:  # sampling: greedy runs of the prompts themselves
        greedy = replace(wl, copies=1, new_tokens=min(FORCED, wl.new_tokens))
        try:
            stock = run_method(model, greedy, STOCK, ids, mask)
            ours = {m: run_method(model, greedy, m, ids, mask) for m in ours if m in runs}
        except OOM_ERRORS:
            stock = None
        free_memory()
    out = {}
    keys = {EAGER: "greedy_agree", GRAPH: "greedy_agree_graph", COMPILED: "greedy_agree_compiled"}
    for m, key in keys.items():
        run = ours.get(m)
        out[key] = greedy_agreement(stock, run) if isinstance(stock, Run) and isinstance(run, Run) else None
    share = [v for v in out.values() if v is not None]
    out["greedy_ok"] = min(share) >= GREEDY_SHARE if share else None
    # The noise floor of the criterion: two of transformers' own methods (same sdpa math, other shapes) agree?
    base = [runs[m] for m in (STOCK, STOCK_CHUNKED, REUSE) if isinstance(runs.get(m), Run)]
    out["greedy_agree_baselines"] = greedy_agreement(base[0], base[1]) if len(base) >= 2 and wl.copies == 1 else None
    batch = runs.get(GENERATE_BATCH)  # transformers' continuous batching against the same stock side
    out["greedy_agree_generate_batch"] = (greedy_agreement(stock, batch) if wl.copies == 1 and isinstance(stock, Run)
                                          and isinstance(batch, Run) else None)
    return out


# ---- one workload ------------------------------------------------------------------------------------------------
def bench_workload(model, wl: Workload, *, repeats: int = 1, check_rows_n: int = 4,
                   methods: list[str] | None = None) -> list[dict]:
    """Checks, then every method of ``wl`` (those of them in ``methods`` when given): one result dict per method."""
    device = model.get_input_embeddings().weight.device
    ids, mask = wl.batch(model.config.vocab_size, device)
    per_token = kv_per_token(model)
    unique = per_token * (wl.unique_prompt_tokens + wl.rows * wl.new_tokens)
    base = dict(workload=wl.name, model=wl.shape, rows=wl.rows, prompt_len=wl.prompt_len, new_tokens=wl.new_tokens,
                unique_kv_gib=unique / 2**30, **step_floor(model, wl))
    try:
        checks = logits_check(model, wl, ids, check_rows_n)
    except OOM_ERRORS:
        checks = dict(logits_ok="OOM")
        free_memory()
    cuda = device.type == "cuda"
    named = [m for m in NAMED_ONLY if methods and m in methods and (cuda or m not in CUDA_ONLY)]
    runs = {m: measure(model, wl, m, ids, mask, repeats) for m in wl.methods(cuda) + named
            if methods is None or m in methods}
    checks.update(greedy_check(model, wl, ids, mask, runs))
    return [dict(base, method=m, **(run_metrics(r) if isinstance(r, Run) else dict(status=r)), **checks)
            for m, r in runs.items()]


# ---- capacity ----------------------------------------------------------------------------------------------------
def largest_batch(probe, max_batch: int, guess: int = 1, tol: float = 0.05):
    """The largest batch ``b`` <= ``max_batch`` for which ``probe(b)`` returns a run rather than None (out of
    memory), within ``tol`` (relative), assuming fits are monotone: ``(b, run)``, ``(0, None)`` if none fits.
    Starts at ``guess``, grows by 1.25x until a failure, then bisects."""
    lo, hi, best = 0, max_batch + 1, None
    b = max(1, min(guess, max_batch))
    while hi - lo > max(1, int(tol * lo)):
        run = probe(b)
        if run is None:
            hi = b
        else:
            lo, best = b, run
        b = (lo + hi) // 2 if hi <= max_batch or lo * 5 // 4 >= hi else min(max_batch, max(lo + 1, lo * 5 // 4))
    return lo, best


def capacity(model, wl: Workload, max_batch: int, tol: float = 0.05) -> list[dict]:
    """Per side (stock-chunked, FlashForge one batch): the largest batch of ``wl`` (questions under its shared
    document) that runs, and tokens/s there. On CUDA the search starts at a guess from the peak memory of
    batches 1 and 2; elsewhere (no memory limit) at ``max_batch``."""
    rows = []
    for method in CAPACITY_METHODS:
        def probe(b, warmup=False):
            w = replace(wl, levels=(wl.levels[0], (wl.levels[1][0], b)))
            run = measure(model, w, method, *w.batch(model.config.vocab_size, model.device), warmup=warmup)
            return run if isinstance(run, Run) else None

        guess = max_batch
        if model.device.type == "cuda":
            one, two = probe(1), probe(2)
            if one and two and two.peak_bytes > one.peak_bytes:
                free, _ = torch.cuda.mem_get_info()
                per_row = two.peak_bytes - one.peak_bytes
                guess = int((free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
                             - one.peak_bytes + per_row) / per_row * 0.95)
        b, run = largest_batch(probe, max_batch, guess, tol)
        if run:  # timed again after a warm-up at that batch; at the edge of memory that may not fit: keep the probe's
            run = probe(b, warmup=True) or run
        row = dict(workload=wl.name, model=wl.shape, rows=b, prompt_len=wl.prompt_len, new_tokens=wl.new_tokens,
                   method=method)
        rows.append(dict(row, **(run_metrics(run) if run else dict(status="OOM"))))
    return rows


# ---- profile -----------------------------------------------------------------------------------------------------
GROUPS = (("attention", ("attention", "merge", "suffix", "segment", "flash", "fmha")),
          ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm")))


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "rest")


@contextmanager
def instrument():
    """Time our code per call (host): the cache's update, the hand-off's run (plan + attention launches) and the
    planning (:func:`flashforge_internals` names them); count plan_forward calls; warn on host syncs inside them
    (CUDA). Yields the tallies."""
    tally = {"update_s": 0.0, "attention_s": 0.0, "plan_s": 0.0, "plans": 0}
    originals = FF.timed
    cuda = torch.cuda.is_available()

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode() if cuda else None
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                tally[key] += time.perf_counter() - t
                if cuda:
                    torch.cuda.set_sync_debug_mode(mode)
        return wrapper

    plan_owner, plan_name = FF.counted
    plan_forward = getattr(plan_owner, plan_name)

    def counted(*args, **kwargs):
        tally["plans"] += 1
        return plan_forward(*args, **kwargs)

    saved = {k: getattr(*k) for k in originals}
    try:
        for (cls, name), key in originals.items():
            setattr(cls, name, timed(saved[(cls, name)], key))
        setattr(plan_owner, plan_name, counted)
        yield tally
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)
        setattr(plan_owner, plan_name, plan_forward)


def profile_decode_step(model, wl: Workload, steps: int = 8) -> dict:
    """One decode step of ours on ``wl`` (prefilled with prefill_shared, then model forward steps as generate
    runs them): GPU (CPU off CUDA) time per kernel group from torch.profiler (on CUDA also of the compiled step
    replayed from a CUDA graph at the middle of the generation, ``compiled_graph_*``: what ``compile=True`` runs);
    our host time per layer per step (cache update, planning, attention launches: mean of ``steps`` steps, each
    followed by a synchronize);
    host syncs in our code (and the file:line each was issued from), cudaMalloc calls and suffix-buffer moves
    during the steps, plans made per step (0 inside a bucket: its first one-token step made the bucket's plan)."""
    device = model.get_input_embeddings().weight.device
    cuda = device.type == "cuda"
    ids, _ = wl.batch(model.config.vocab_size, device)
    kw = flashforge_hf.cache_kwarg(model)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        cache, _ = flashforge_hf.prefill_shared(model, ids, torch.ones_like(ids), max_new_tokens=2 * steps + 4)
        tok = ids[:, -1:]

        def step(tok):
            logits = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
            return logits[:, -1].argmax(-1, keepdim=True)

        def sync():
            if cuda:
                torch.cuda.synchronize()

        for _ in range(2):
            tok = step(tok)
        sync()
        ptr = FF.suffix_keys(cache).data_ptr()
        mallocs = torch.cuda.memory_stats().get("segment.all.allocated", 0) if cuda else 0
        with warnings.catch_warnings(record=True) as caught, instrument() as tally:
            warnings.simplefilter("always")
            for _ in range(steps):
                tok = step(tok)
                sync()
        sync_warnings = [w for w in caught if "synchroniz" in str(w.message).lower()]
        syncs = len(sync_warnings)
        sync_sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in sync_warnings})
        mallocs = (torch.cuda.memory_stats().get("segment.all.allocated", 0) - mallocs) if cuda else 0
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            tok = step(tok)
            sync()
    groups = _kernel_groups(prof, cuda)
    compiled = _compiled_step_groups(model, ids, steps, wl.new_tokens) if cuda else dict(groups={})
    per_layer = lambda key: tally[key] / (steps * layers) * 1e6  # noqa: E731
    return dict(workload=wl.name, model=wl.shape, rows=wl.rows, timeline="GPU" if cuda else "CPU",
                **{f"{g}_ms": v for g, v in groups.items()}, step_ms=sum(groups.values()),
                **{f"compiled_graph_{g}_ms": v for g, v in compiled["groups"].items()},
                compiled_graph_step_ms=sum(compiled["groups"].values()) if cuda else None,
                compiled_graph_replay_ms=compiled.get("replay_ms"), compiled_graph_at_token=compiled.get("at_token"),
                compiled_graph_kernels=compiled.get("kernels"),
                host_update_us_per_layer=per_layer("update_s"), host_plan_us_per_layer=per_layer("plan_s"),
                host_attention_us_per_layer=per_layer("attention_s") - per_layer("plan_s"),
                host_us_per_layer=per_layer("update_s") + per_layer("attention_s"),
                plans_per_step=tally["plans"] / steps, host_syncs=syncs, host_sync_sites=" ".join(sync_sites) or "-", cuda_mallocs=mallocs,
                suffix_buffer_moved=FF.suffix_keys(cache).data_ptr() != ptr)


def _kernel_groups(prof, cuda: bool, steps: int = 1) -> dict:
    """Milliseconds per step of each kernel group (GPU kernels on CUDA, else aten ops on the CPU) in a profile
    of ``steps`` steps."""
    groups = {"attention": 0.0, "gemm": 0.0, "rest": 0.0}
    for e in prof.key_averages():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if on_device == cuda and (cuda or e.key.startswith("aten::")):
            us = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
            groups[kernel_group(e.key)] += (us or getattr(e, "self_cuda_time_total", 0)) / 1e3 / steps
    return groups


def _compiled_step_groups(model, ids, steps: int, new_tokens: int) -> dict:
    """Kernel groups of one compiled decode step replayed from a CUDA graph (GraphDecoder with compile),
    taken at the middle of a generation of ``new_tokens`` (the suffixes as long as at the median step that TPOT
    reports), the mean of ``steps`` replays (``rest`` includes the argmax between steps); ``replay`` is the wall
    time of one replay back to back with the next (CUDA events; the gaps between the graph's kernels included),
    ``kernels`` the graph's 12 costliest kernels (ms and launches per step, name cut to 60 characters),
    ``at_token`` the new token the profiled steps produce."""
    R, L = ids.shape
    mid = max(2, new_tokens // 2)
    cache, _ = flashforge_hf.prefill_shared(model, ids, torch.ones_like(ids), max_new_tokens=mid + 2 * steps + 2)
    runner = FF.GraphDecoder(model, cache, torch.full((R,), L - 1, device=ids.device), use_graph=True,
                                 compile=True)
    try:
        tok = ids[:, -1]
        for _ in range(mid):  # the bucket's eager step (and compilation), its capture, replays up to the middle
            tok = runner.step(tok).argmax(-1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tok = runner.step(tok).argmax(-1)
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            runner.step(tok)
        end.record()
        torch.cuda.synchronize()
    finally:
        runner.close()
    kernels = sorted(((e.key[:60], getattr(e, "self_device_time_total", 0) / 1e3 / steps, e.count / steps)
                      for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda k: -k[1])[:12]
    return dict(groups=_kernel_groups(prof, True, steps), replay_ms=start.elapsed_time(end) / steps,
                kernels=[dict(name=n, ms=round(ms, 4), per_step=c) for n, ms, c in kernels], at_token=mid + 1)


# ---- results -----------------------------------------------------------------------------------------------------
COLUMNS = ["workload", "model", "rows", "prompt_len", "new_tokens", "method", "status", "ttft_ms", "tpot_ms",
           "tokens_per_s", "total_s", "peak_gib", "kv_gib", "unique_kv_gib", "floor_ms", "floor_gemm_bytes_ms",
           "floor_gemm_flops_ms", "floor_attn_bytes_ms", "floor_attn_flops_ms", "check_rows",
           "logit_err_stock", "logit_err_ours", "logit_err_compiled", "logits_ok", "greedy_agree", "greedy_agree_graph",
           "greedy_agree_compiled", "greedy_agree_baselines", "greedy_agree_generate_batch", "greedy_ok", "card",
           "date", "commit", "command"]


def merge(old: list[dict], new: list[dict], by_method: bool = False) -> list[dict]:
    """``old`` rows of workloads not in ``new`` (``by_method``: of workload and method pairs not in ``new``), then
    ``new``."""
    key = (lambda r: (r["workload"], r["method"])) if by_method else (lambda r: r["workload"])
    done = {key(r) for r in new}
    return [r for r in old if key(r) not in done] + new


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    try:
        return float(v) if v not in (None, "", "None") else None
    except ValueError:
        return None


def _cell(v) -> str:
    x = _num({"v": v}, "v")
    if x is None:
        return str(v) if v not in (None, "", "None") else "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _find(rows, workload, method):
    return next((r for r in rows if r["workload"] == workload and r["method"] == method and r.get("status") == "ok"), None)


def _ratio(rows, workload, base_methods, key, ours=EAGER):
    """Best baseline's ``key`` over ours (time-like keys: >1 means ours is faster)."""
    o = _find(rows, workload, ours)
    base = [_num(r, key) for m in base_methods if (r := _find(rows, workload, m))]
    if not o or not base or not _num(o, key):
        return None
    return min(base) / _num(o, key)


# Time per output token over the decode step's floor that the compiled path must reach, per workload.
TPOT_OVER_FLOOR = {"doc-qa-4k": 1.25, "tree": 1.25, "parallel-sampling": 1.25, "few-shot-8b": 1.3, "batch-1": 1.2}


def targets(rows: list[dict], profile: dict | None) -> list[str]:
    """The speed targets with the measured values ("not run" where data is missing): time per output token of
    the compiled path over the decode step's floor (:data:`TPOT_OVER_FLOOR`), the KV cache's bytes over the
    unique KV's, no sharing against stock, and the host time per layer of a decode step."""
    def line(name, value, goal, ok):
        if value is None:
            return f"- {name}: not run"
        return f"- {name}: {value:.2f} (target {goal}) {'PASS' if ok(value) else 'FAIL'}"

    out = []
    for w, limit in TPOT_OVER_FLOOR.items():
        g = _find(rows, w, COMPILED)
        out.append(line(f"{w} TPOT ({COMPILED}) / decode-step floor", g and _num(g, "tpot_ms") / _num(g, "floor_ms"),
                        f"<= {limit}", lambda v, limit=limit: v <= limit))
    for r in rows:
        if r["method"] == EAGER and r.get("status") == "ok" and _num(r, "unique_kv_gib"):
            out.append(line(f"{r['workload']} KV bytes / unique", _num(r, "kv_gib") / _num(r, "unique_kv_gib"),
                            "<= 1.05", lambda v: v <= 1.05))
    ns = _ratio(rows, "no-sharing", [STOCK], "tpot_ms")
    out.append(line("no-sharing TPOT, ours (eager) / stock", ns and 1 / ns, "<= 1.05", lambda v: v <= 1.05))
    out.append(line("host us per layer per decode step (ours)", profile and profile["host_us_per_layer"], "<= 30",
                    lambda v: v <= 30))
    return out


def write_markdown(rows: list[dict], profile: dict | None, path: Path, ceilings) -> None:
    runs = sorted({(r["card"], r["date"], r["commit"], r["command"]) for r in rows})
    lines = ["# End-to-end generate benchmark", ""]
    lines += [f"- {card}, {date}, commit {commit}: `{command}`" for card, date, commit, command in runs]
    lines += [f"- {ceilings.describe()} (the latest run's)"]
    lines += ["", "Random-weight Llama models (see benchmarks/generate.py for the workloads, methods and what "
              "every column means). Times in ms; memory in GiB; floor: one decode step, the GEMMs' floor (the "
              "larger of weights at the bandwidth and their FLOPs at the matmul rate) plus the attention's (the "
              "larger of unique KV at the bandwidth and its FLOPs at the matmul rate).", ""]
    cols = ["workload", "method", "rows", "status", "ttft_ms", "tpot_ms", "tokens_per_s", "peak_gib", "kv_gib",
            "unique_kv_gib", "floor_ms", "floor_gemm_bytes_ms", "floor_gemm_flops_ms", "floor_attn_bytes_ms",
            "floor_attn_flops_ms"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    checks = ["workload", "check_rows", "logit_err_stock", "logit_err_ours", "logit_err_compiled", "logits_ok",
              "greedy_agree", "greedy_agree_graph", "greedy_agree_compiled", "greedy_agree_baselines",
              "greedy_agree_generate_batch", "greedy_ok", "commit"]
    lines += ["", "## Correctness checks (before timing; each workload's latest run)", "",
              "| " + " | ".join(checks) + " |", "|" + "---|" * len(checks)]
    latest = {r["workload"]: r for r in rows if r.get("logits_ok") not in (None, "")}  # rows are oldest first
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in checks) + " |" for r in latest.values()]
    if profile:
        flat = {k: v for k, v in profile.items() if k != "compiled_graph_kernels"}
        lines += ["", "## One decode step of ours", "", "| " + " | ".join(flat) + " |", "|" + "---|" * len(flat),
                  "| " + " | ".join(_cell(v) for v in flat.values()) + " |"]
        if profile.get("compiled_graph_kernels"):
            lines += ["", "Costliest kernels of the compiled step replayed from its CUDA graph:", "",
                      "| kernel | ms per step | launches per step |", "|---|---|---|"]
            lines += [f"| `{k['name']}` | {k['ms']} | {k['per_step']:g} |" for k in profile["compiled_graph_kernels"]]
    lines += ["", "## Targets", ""] + targets(rows, profile)
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup of ours, eager, with CUDA graphs and compiled (TPOT and TTFT, over the best of stock, stock-chunked
    and reuse) and KV-cache GiB per method, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows if r["workload"] != "capacity"))
    stock = (STOCK, STOCK_CHUNKED)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    x = range(len(workloads))
    for ax, key in zip(axes[:2], ("tpot_ms", "ttft_ms")):
        for i, ours in enumerate(OURS):
            ys = [_ratio(rows, w, stock + (REUSE,), key, ours) or 0 for w in workloads]
            ax.bar([j + 0.27 * i - 0.27 for j in x], ys, 0.27, label=f"{ours} vs best baseline")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_ylabel(f"speedup of ours in {key.removesuffix('_ms').upper()}")
    for i, m in enumerate(METHODS):
        ys = [_num(r, "kv_gib") or 0 if (r := _find(rows, w, m)) else 0 for w in workloads]
        axes[2].bar([j + 0.12 * i - 0.36 for j in x], ys, 0.12, label=m)
    axes[2].set_ylabel("KV-cache GiB")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xticks(list(x), workloads, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(new_rows: list[dict], profile: dict | None, stem: Path, card: str, ceilings,
                  by_method: bool = False) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, profile_path = stem.with_suffix(".csv"), stem.parent / f"{stem.name}_profile.json"
    rows = merge(read_csv(csv_path), [{k: r.get(k) for k in COLUMNS} for r in new_rows], by_method)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    if profile:
        profile_path.write_text(json.dumps(profile, indent=1))
    elif profile_path.exists():
        profile = json.loads(profile_path.read_text())
    rows = read_csv(csv_path)  # every value as text, as in a later run
    write_markdown(rows, profile, stem.with_suffix(".md"), ceilings)
    try:
        plot(rows, stem.with_suffix(".png"), f"FlashForge end-to-end: {card}")
    except ImportError:
        print("no PNG: the plot needs matplotlib (pip install matplotlib)")


# ---- command -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashforge-hf bench e2e", description=__doc__.split("\n\n")[0])
    names = list(WORKLOADS) + list(EXTRA)
    ap.add_argument("--workloads", nargs="+", choices=names, default=names, metavar="NAME",
                    help=f"what to run, in order (default all): {', '.join(names)}")
    ap.add_argument("--scale", choices=["full", "tiny"], default="full",
                    help="full: the issue's shapes; tiny: every length / 32, at most 4 rows per level, 8 new tokens, "
                    "a tiny model (CPU, seconds)")
    ap.add_argument("--methods", nargs="+", choices=METHODS + NAMED_ONLY, metavar="METHOD",
                    help=f"run only these methods of each workload (default all of: {', '.join(METHODS)}; "
                    f"{', '.join(NAMED_ONLY)} only when named); the other methods' rows of an earlier run stay "
                    "in the results")
    ap.add_argument("--repeats", type=int, default=1, help="best of N timed runs per method (default 1)")
    ap.add_argument("--check-rows", type=int, default=4, help="prompts in the teacher-forced logits check (default 4)")
    ap.add_argument("--profile-workload", choices=list(WORKLOADS), default="doc-qa-4k",
                    help="the workload whose decode step 'profile' profiles (default doc-qa-4k)")
    ap.add_argument("--max-batch", type=int, default=4096, help="largest batch the capacity search tries (default 4096)")
    ap.add_argument("--budget-s", type=float, default=540,
                    help="start no further workload after this many seconds (default 540: a 10-minute device call)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; default auto")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default bfloat16 at --scale full, float32 at tiny (a tiny bf16 model has many near-ties)")
    ap.add_argument("--out-dir", default="benchmarks/results", help="where generate_<card>.{csv,md,png} go")
    ap.add_argument("--commit", help="git commit to record (default: git rev-parse HEAD)")
    return ap


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.scale == "full" else "float32"))
    card, tag = card_name(device)
    ceilings = card_ceilings(device)
    stem = Path(args.out_dir) / (f"generate_{tag}" + ("" if args.scale == "full" else f"_{args.scale}"))
    stamp = dict(card=card, date=utc_now(), commit=args.commit or git_commit(), command="python benchmarks/generate.py " + " ".join(argv))
    start = time.perf_counter()
    todo = [(n, (CAPACITY if n == "capacity" else WORKLOADS[args.profile_workload if n == "profile" else n])
             .scaled(args.scale)) for n in args.workloads]
    models: dict = {}
    for name, wl in sorted(todo, key=lambda t: [w.shape for _, w in todo].index(t[1].shape)):  # one model at a time
        if time.perf_counter() - start > args.budget_s:
            print(f"{name}: skipped (budget of {args.budget_s:.0f} s spent)")
            continue
        if wl.shape not in models:
            models.clear()
            free_memory()
            models[wl.shape] = random_model(wl.shape, device, dtype)
        model = models[wl.shape]
        t0 = time.perf_counter()
        profile = None
        if name == "profile":
            profile = dict(profile_decode_step(model, wl), **stamp)
            rows = []
        elif name == "capacity":
            rows = capacity(model, wl, args.max_batch if args.scale == "full" else min(args.max_batch, 8))
        else:
            rows = bench_workload(model, wl, repeats=args.repeats, check_rows_n=args.check_rows,
                                  methods=args.methods)
        rows = [dict(r, **stamp) for r in rows]
        for r in rows:
            print(" ".join(f"{k}={_cell(r.get(k))}" for k in COLUMNS[:-4] if r.get(k) is not None))
        if profile:
            print("profile:", json.dumps(profile))
        write_results(rows, profile, stem, card, ceilings, by_method=args.methods is not None)
        print(f"{name}: {time.perf_counter() - t0:.1f} s; wrote {stem}.csv/.md/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
