"""Stock transformers vs FlashForge on the same batch: timed generate runs (the CLI's demo and ``generate
--stock``, the examples, and the benchmarks in benchmarks/, which add their own baselines through
:func:`run_generate`'s ``generator``).

Stock is ``model.generate`` with attn_implementation="sdpa" and its default DynamicCache; FlashForge is
:func:`flashforge_hf.generate` with attn_implementation="flashforge". One model serves both: :func:`attention`
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
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import flashforge_hf
from flashforge_hf.compat import output_cache_field

STOCK, FLASHFORGE = "stock", "flashforge"
EAGER, GRAPH, COMPILED = "flashforge-eager", "flashforge-graph", "flashforge-compiled"


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


class StepClock(LogitsProcessor):
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


def stock_generate(model, input_ids, attention_mask, **generate_kwargs):
    """Stock transformers: ``model.generate`` with sdpa attention and its default DynamicCache."""
    with torch.inference_mode(), attention(model, "sdpa"):
        return model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)


# FlashForge modes: flashforge_hf.generate with these settings (the default: CUDA graphs where they apply).
FLASHFORGE_SETTINGS = {FLASHFORGE: {}, EAGER: dict(cuda_graph=False), GRAPH: dict(cuda_graph=True),
                       COMPILED: dict(compile=True)}


def _flashforge_generator(settings: dict):
    """flashforge_hf.generate with ``settings``."""
    def run(model, input_ids, attention_mask, **generate_kwargs):
        return flashforge_hf.generate(model, input_ids, attention_mask, **settings, **generate_kwargs)

    return run


GENERATORS = {STOCK: stock_generate,
              **{mode: _flashforge_generator(settings) for mode, settings in FLASHFORGE_SETTINGS.items()}}


def run_generate(model, input_ids, attention_mask, mode: str, *, generator=None, seed: int | None = None,
                 progress: bool = False, **generate_kwargs) -> Run:
    """One timed generate call by ``mode``: "stock" (sdpa + DynamicCache, ``model.generate``), "flashforge"
    (:func:`flashforge_hf.generate`) or "flashforge-eager" / "flashforge-graph" / "flashforge-compiled" (the same
    with CUDA graphs off / required / ``compile=True``); any other name with ``generator``, a callable
    ``(model, input_ids, attention_mask, **generate_kwargs)`` returning what ``model.generate`` returns with
    ``return_dict_in_generate=True`` (the benchmarks' baselines). ``model`` must be loaded with
    attn_implementation="flashforge". ``seed`` seeds torch right before the call (sampling); ``progress`` shows
    a bar of decode steps."""
    from tqdm.auto import tqdm

    generator = generator or GENERATORS.get(mode)
    if generator is None:
        raise ValueError(f"mode must be one of {', '.join(GENERATORS)} (or come with a generator), got {mode!r}.")
    device = input_ids.device
    bar = tqdm(total=generate_kwargs.get("max_new_tokens"), desc=f"{mode} generate", unit="tok", leave=False,
               disable=not progress)
    clock = StepClock(device, bar)
    kwargs = dict(generate_kwargs, return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    if seed is not None:
        torch.manual_seed(seed)
    start, start_mark = time.perf_counter(), clock.mark()
    out = generator(model, input_ids, attention_mask, **kwargs)
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
