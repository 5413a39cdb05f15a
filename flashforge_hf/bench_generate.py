"""End-to-end generation: stock transformers vs FlashForge on the same batch, and the ``bench generate`` sweep.

Stock is ``model.generate`` with attn_implementation="sdpa" and its default DynamicCache; FlashForge is
:func:`flashforge_hf.generate` with attn_implementation="flashforge"; "reuse" is the prefix-reuse pattern of the
transformers docs (:func:`reuse_generate`). One model serves both: :func:`attention`
switches its attention implementation for the stock run, so both runs use the same weights and the memory of
one model.

Measured per run (:class:`Run`):
    time to first token (TTFT)  from the call to the moment the first token's logits exist (a logits processor
                                timestamps its first call, after a CUDA synchronize), so it includes the prefill;
    time per output token       (total - TTFT) / (decode steps - 1); ``tpot_median_s``: the median of the
                                per-step intervals between the logits processor's timestamps;
    tokens/s                    generated tokens of all rows (up to and including each row's EOS) / total time;
    KV-cache bytes              the cache's K/V tensors after generation (DynamicCache: its keys and values;
                                PrefixSharingCache: ``nbytes()``, shared segments once plus suffix buffers);
    peak memory                 CUDA only: peak allocated during the call minus what was allocated before it.
"""

from __future__ import annotations

import contextlib
import csv
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import flashforge_hf
from flashforge_hf.compat import output_cache_field

STOCK, FLASHFORGE, REUSE, EXPLICIT = "stock", "flashforge", "reuse", "flashforge-explicit"
EAGER, GRAPH, COMPILED = "flashforge-eager", "flashforge-graph", "flashforge-compiled"
STOCK_COMPILED = "stock-compiled"
PLAIN, PLAIN_COMPILED = "plain-generate", "plain-generate-compiled"  # model.generate on the flashforge model


@dataclass
class Run:
    """One timed generate call (see the module docstring for what each number means)."""

    mode: str
    sequences: torch.Tensor = field(repr=False)  # [B, prompt + new] as generate returns them
    prompt_len: int
    new_ids: list[list[int]] = field(repr=False)  # each row's new tokens up to and including its EOS
    ttft_s: float
    total_s: float
    kv_bytes: int
    peak_bytes: int | None
    step_s: list[float] = field(default_factory=list, repr=False)  # intervals between consecutive decode steps

    @property
    def steps(self) -> int:
        return self.sequences.shape[1] - self.prompt_len

    @property
    def generated_tokens(self) -> int:
        return sum(map(len, self.new_ids))

    @property
    def tpot_s(self) -> float:
        return (self.total_s - self.ttft_s) / max(self.steps - 1, 1)

    @property
    def tpot_median_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else self.tpot_s

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s

    def metrics(self) -> dict:
        """The numbers of this run, for tables and CSV rows."""
        return {"mode": self.mode, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "tokens_per_s": self.tokens_per_s,
                "generated_tokens": self.generated_tokens, "total_s": self.total_s, "kv_bytes": self.kv_bytes,
                "peak_bytes": self.peak_bytes}


class _StepClock(LogitsProcessor):
    """Timestamps every call of generate's logits processing (the first: the first token's logits exist) and
    ticks an optional progress bar once per decode step. On CUDA the stamps are CUDA events (no host sync; the
    GPU timeline, idle gaps included), elsewhere ``perf_counter``; :meth:`seconds` reads them after the call."""

    def __init__(self, device: torch.device, bar=None):
        self.cuda = device.type == "cuda"
        self.bar = bar
        self.marks: list = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, input_ids, scores):
        if self.bar is not None:
            self.bar.update()
        self.marks.append(self.mark())
        return scores

    def seconds(self, start) -> list[float]:
        """Each stamp's time since ``start`` (a :meth:`mark`), in seconds; on CUDA after a synchronize."""
        if not self.cuda:
            return [m - start for m in self.marks]
        torch.cuda.synchronize()
        return [start.elapsed_time(m) / 1e3 for m in self.marks]


@contextlib.contextmanager
def attention(model, implementation: str):
    """Run the block with ``model`` switched to attention ``implementation``, then switch it back."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def kv_bytes(cache) -> int:
    """Bytes of a cache's K/V tensors: ``nbytes()`` when it has one (PrefixSharingCache), else the keys and
    values of its layers (DynamicCache)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def generated_ids(sequences: torch.Tensor, prompt_len: int, stop_ids) -> list[list[int]]:
    """Each row's new tokens, up to and including the first of ``stop_ids`` (EOS/pad), as lists of ids."""
    stop = set(stop_ids)
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:end])
    return rows


def stop_ids(model) -> list[int]:
    """The ids that end a row: the generation config's EOS and pad tokens."""
    gc = model.generation_config
    ids = []
    for value in (gc.eos_token_id, gc.pad_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return ids


def common_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Columns, from the left, that every row holds as the same real (unpadded) token."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return int(same.cumprod(0).sum())


def rows_per_prompt(model, generate_kwargs: dict) -> int:
    """Rows generate makes of each prompt: ``num_beams``, else ``num_return_sequences`` (default 1)."""
    gc = model.generation_config
    beams = generate_kwargs.get("num_beams") or gc.num_beams or 1
    return beams if beams > 1 else generate_kwargs.get("num_return_sequences") or gc.num_return_sequences or 1


def stock_generate(model, input_ids, attention_mask, **generate_kwargs):
    """Stock transformers: ``model.generate`` with sdpa attention and its default DynamicCache."""
    with torch.inference_mode(), attention(model, "sdpa"):
        return model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)


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


# FlashForge modes: flashforge_hf.generate with these settings (the default: CUDA graphs where they apply).
FLASHFORGE_SETTINGS = {FLASHFORGE: {}, EAGER: dict(cuda_graph=False), GRAPH: dict(cuda_graph=True),
                       COMPILED: dict(compile=True)}


def _flashforge_generator(settings: dict, plain: bool = False):
    """flashforge_hf.generate with ``settings``; ``plain``: plain ``model.generate`` with them instead (the
    generate hook's path, which must be the same)."""
    def run(model, input_ids, attention_mask, **generate_kwargs):
        if plain:
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings, **generate_kwargs)
        return flashforge_hf.generate(model, input_ids, attention_mask, **settings, **generate_kwargs)

    return run


def stock_compiled_generate(model, input_ids, attention_mask, **generate_kwargs):
    """transformers' own fast path: sdpa with ``cache_implementation="static"``, whose forward ``generate``
    compiles by itself (torch.compile, mode "reduce-overhead": CUDA graphs) on CUDA."""
    with torch.inference_mode(), attention(model, "sdpa"):
        return model.generate(input_ids, attention_mask=attention_mask, cache_implementation="static",
                              **generate_kwargs)


GENERATORS = {STOCK: stock_generate, REUSE: reuse_generate, EXPLICIT: explicit_generate,
              STOCK_COMPILED: stock_compiled_generate,
              **{mode: _flashforge_generator(settings) for mode, settings in FLASHFORGE_SETTINGS.items()},
              PLAIN: _flashforge_generator({}, plain=True), PLAIN_COMPILED: _flashforge_generator(dict(compile=True), plain=True)}


def run_generate(model, input_ids, attention_mask, mode: str, *, seed: int | None = None, progress: bool = False,
                 **generate_kwargs) -> Run:
    """One timed generate call by ``mode``, a key of :data:`GENERATORS`: "stock" (sdpa + DynamicCache,
    ``model.generate``), "flashforge" (:func:`flashforge_hf.generate`), "flashforge-eager" / "flashforge-graph" /
    "flashforge-compiled" (the same with CUDA graphs off / required / ``compile=True``), "reuse"
    (:func:`reuse_generate`), "flashforge-explicit" (:func:`explicit_generate`), "stock-compiled" (:func:`stock_compiled_generate`) or "plain-generate" / "plain-generate-compiled" (plain ``model.generate``, default settings / ``compile=True``). ``model`` must be loaded with
    attn_implementation="flashforge". ``seed`` seeds torch right before the call (sampling); ``progress`` shows
    a bar of decode steps."""
    from tqdm.auto import tqdm

    if mode not in GENERATORS:
        raise ValueError(f"mode must be one of {', '.join(GENERATORS)}, got {mode!r}.")
    device = input_ids.device
    bar = tqdm(total=generate_kwargs.get("max_new_tokens"), desc=f"{mode} generate", unit="tok", leave=False,
               disable=not progress)
    clock = _StepClock(device, bar)
    kwargs = dict(generate_kwargs, return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    if seed is not None:
        torch.manual_seed(seed)
    start, start_mark = time.perf_counter(), clock.mark()
    out = GENERATORS[mode](model, input_ids, attention_mask, **kwargs)
    if cuda:
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    bar.close()
    stamps = clock.seconds(start_mark)
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    prompt_len = input_ids.shape[1]
    new = generated_ids(out.sequences, prompt_len, stop_ids(model))
    return Run(mode, out.sequences.cpu(), prompt_len, new, stamps[0] if stamps else total, total,
               kv_bytes(getattr(out, output_cache_field(type(out)))), peak, [b - a for a, b in zip(stamps, stamps[1:])])


def flashforge_mode(cuda_graph: bool | None, compile: bool = False) -> str:
    """The FlashForge mode of :func:`flashforge_hf.generate`'s ``cuda_graph`` (None: auto) and ``compile``
    settings (compile: with CUDA graphs where they apply)."""
    if compile:
        if cuda_graph is not None:
            raise ValueError("The compiled mode takes CUDA graphs where they apply: leave cuda_graph at auto.")
        return COMPILED
    return {None: FLASHFORGE, True: GRAPH, False: EAGER}[cuda_graph]


def compare(model, input_ids, attention_mask, *, warmup: bool = True, seed: int | None = None,
            progress: bool = True, cuda_graph: bool | None = None, compile: bool = False,
            **generate_kwargs) -> tuple[Run, Run]:
    """Stock and FlashForge generate on the same batch: ``(stock, flashforge)``, both seeded with ``seed``;
    ``cuda_graph`` and ``compile`` as in :func:`flashforge_hf.generate`. ``warmup`` first runs both for two tokens on the same
    batch (kernel compilation, allocator warm-up) so that the timings are steady."""
    ours = flashforge_mode(cuda_graph, compile)
    if warmup:
        short = dict(generate_kwargs, max_new_tokens=2, min_new_tokens=None)
        for mode in (STOCK, ours):
            run_generate(model, input_ids, attention_mask, mode, seed=seed, **short)
    return tuple(run_generate(model, input_ids, attention_mask, mode, seed=seed, progress=progress, **generate_kwargs)
                 for mode in (STOCK, ours))


def same_tokens(a: Run, b: Run) -> bool:
    """Whether two runs generated exactly the same token ids."""
    return a.sequences.shape == b.sequences.shape and torch.equal(a.sequences, b.sequences)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def format_table(stock: Run, ours: Run) -> str:
    """A plain-text table of both runs' metrics, with FlashForge's ratio to stock."""
    rows = [
        ("time to first token", f"{stock.ttft_s * 1e3:.1f} ms", f"{ours.ttft_s * 1e3:.1f} ms", stock.ttft_s / ours.ttft_s),
        ("time per output token", f"{stock.tpot_s * 1e3:.2f} ms", f"{ours.tpot_s * 1e3:.2f} ms", stock.tpot_s / ours.tpot_s),
        ("tokens/s", f"{stock.tokens_per_s:.1f}", f"{ours.tokens_per_s:.1f}", ours.tokens_per_s / stock.tokens_per_s),
        ("KV-cache memory", _mib(stock.kv_bytes), _mib(ours.kv_bytes), stock.kv_bytes / max(ours.kv_bytes, 1)),
    ]
    if stock.peak_bytes is not None:
        rows.append(("peak memory (generate)", _mib(stock.peak_bytes), _mib(ours.peak_bytes),
                     stock.peak_bytes / max(ours.peak_bytes, 1)))
    lines = [f"{'':24}{'stock':>14}{'flashforge':>14}   flashforge gain", "-" * 70]
    lines += [f"{name:24}{a:>14}{b:>14}   {gain:.2f}x" for name, a, b, gain in rows]
    lines.append(f"identical token ids: {'yes' if same_tokens(stock, ours) else 'NO'}")
    return "\n".join(lines)


# ---- bench generate: random-weight models and synthetic shared-prefix workloads -----------------------------

# Llama shapes (random weights): what matters for attention and KV memory is layers, heads and head dim.
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}

# Synthetic workloads: every row is shared_len tokens shared by the whole batch, then its own suffix_len tokens.
WORKLOADS = {
    "doc-qa": dict(shared_len=4096, suffix_len=32, description="one long document, many short questions"),
    "few-shot": dict(shared_len=768, suffix_len=96, description="a few-shot prompt, questions of a paragraph"),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0, max_positions: int = 131072):
    """A Llama of the named shape with random weights, loaded with attn_implementation="flashforge"."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}: choose one of {', '.join(SHAPES)}, or pass --model PATH.")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="flashforge")
    return model.eval()


def tree_batch(levels, vocab: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts shaped by a tree: ``levels[i] = (tokens, fanout)``, each node of level i-1 (one root above
    level 0) has ``fanout`` children of ``tokens`` random ids in [3, vocab); one prompt per leaf, all equally
    long (no padding). ``((shared, 1), (suffix, batch))`` is ``batch`` rows sharing ``shared`` tokens.
    Returns ``(input_ids, attention_mask)``."""
    g = torch.Generator().manual_seed(seed)
    prompts = math.prod(f for _, f in levels)
    parts, nodes = [], 1
    for tokens, fanout in levels:
        nodes *= fanout
        level = torch.randint(3, vocab, (nodes, tokens), generator=g)
        parts.append(level.repeat_interleave(prompts // nodes, 0))
    ids = torch.cat(parts, 1).to(device)
    return ids, torch.ones_like(ids)


def bench_generate(model, workloads: list[str], batch_sizes: list[int], max_new_tokens: int, *,
                   shared_len: int | None = None, suffix_len: int | None = None, progress: bool = True) -> list[dict]:
    """Stock vs FlashForge on each workload and batch size (greedy, exactly ``max_new_tokens`` tokens per row).
    Returns one CSV-ready dict per (workload, batch size, mode)."""
    from tqdm.auto import tqdm

    device = model.get_input_embeddings().weight.device
    cases = [(w, b) for w in workloads for b in batch_sizes]
    results = []
    for workload, batch in tqdm(cases, desc="bench generate", disable=not progress):
        spec = WORKLOADS[workload]
        shared = shared_len or spec["shared_len"]
        suffix = suffix_len or spec["suffix_len"]
        ids, mask = tree_batch(((shared, 1), (suffix, batch)), model.config.vocab_size, device)
        stock, ours = compare(model, ids, mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              do_sample=False, progress=False)
        for run in (stock, ours):
            results.append(dict(workload=workload, batch=batch, shared_len=shared, suffix_len=suffix,
                                max_new_tokens=max_new_tokens, **run.metrics(), identical_tokens=same_tokens(stock, ours)))
    return results


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the result dicts as CSV (columns: the keys of the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """A PNG with, per metric (TTFT, time per output token, tokens/s, KV bytes, CUDA peak memory), one line per
    (workload, mode) against batch size. Needs matplotlib (``pip install matplotlib``, or ``pip install flashforge-hf[bench]``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("The bench plot needs matplotlib: pip install matplotlib  (CSV was written)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("ttft_s", "time to first token (s)"), ("tpot_s", "time per output token (s)"),
               ("tokens_per_s", "tokens/s"), ("kv_bytes", "KV-cache MiB")]
    if all(r["peak_bytes"] is not None for r in rows):
        metrics.append(("peak_bytes", "peak memory of generate (MiB)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4))
    series = sorted({(r["workload"], r["mode"]) for r in rows})
    for ax, (key, label) in zip(axes, metrics):
        for workload, mode in series:
            pts = [(r["batch"], r[key]) for r in rows if (r["workload"], r["mode"]) == (workload, mode)]
            xs, ys = zip(*pts)
            if key.endswith("_bytes"):
                ys = [y / 2**20 for y in ys]
            ax.plot(xs, ys, marker="o", linestyle="-" if mode == FLASHFORGE else "--", label=f"{workload} {mode}")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

