"""What the example scripts share: where the project's data lives, reading records, the few-shot evaluation loop."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

import flashforge_hf
from flashforge_hf import cli
from flashforge_hf.bench_generate import STOCK, stop_ids, compare, generated_ids, run_generate
from flashforge_hf.models import decode_texts, encode

# The repository's checkout and the shared data sit side by side: <root>/main (this repo) and <root>/shared.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_records(path: Path) -> list[dict]:
    """Records of a local .jsonl (one JSON object a line) or .json file (a list, or an object whose "examples"
    holds the list, as BIG-Bench Hard's files do)."""
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    data = json.loads(path.read_text())
    return data["examples"] if isinstance(data, dict) else data


def load_records(data: str, *, hub_config: str | None = None, split: str = "test") -> list[dict]:
    """Records from ``data``: a local JSON/JSONL file, else (when the `datasets` package is installed) a data set
    name on the Hugging Face Hub, loaded with ``datasets.load_dataset(data, hub_config, split=split)``."""
    path = Path(data)
    if path.exists():
        return read_records(path)
    if importlib.util.find_spec("datasets") is None:
        raise SystemExit(f"error: {data} is not a local file, and loading it from the Hugging Face Hub needs the "
                         "`datasets` package (pip install datasets). Pass --data with a local .json/.jsonl path.")
    import datasets

    return list(datasets.load_dataset(data, hub_config, split=split))


def evaluate_few_shot(args, model, tokenizer, prompts: list[str], golds: list[str], is_correct, title: str) -> None:
    """Greedy-generate ``prompts`` (stopping at the next "Q:") with stock transformers and with FlashForge, then
    print the accuracy of both (``is_correct(generated_text, gold)``) and how many generations have identical
    token ids.

    One batch: both run on it and the timing table is printed. Several batches of ``args.batch_size``: stock runs
    batch by batch, as ``model.generate`` users batch; FlashForge gets every prompt in one
    ``flashforge_hf.generate(..., batch_size=args.batch_size)`` call, which prefills the shared few-shot prefix
    once for the whole run and reuses it in every batch; the totals are printed."""
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, stop_strings=["Q:", "</s>", "<|im_end|>"],
               tokenizer=tokenizer)
    if len(prompts) <= args.batch_size:
        ids, mask = encode(tokenizer, prompts, model.device)
        stock, ours = compare(model, ids, mask, warmup=not args.no_warmup, **cli.decoding(args),
                              **gen)
        cli.print_comparison(stock, ours)
        new = {"stock": stock.new_ids, "flashforge": ours.new_ids}
    else:
        new = {"stock": [], "flashforge": []}
        stock_s = 0.0
        for start in tqdm(range(0, len(prompts), args.batch_size), desc="stock batches"):
            ids, mask = encode(tokenizer, prompts[start : start + args.batch_size], model.device)
            run = run_generate(model, ids, mask, STOCK, **gen)
            stock_s += run.total_s
            new["stock"] += run.new_ids
        ids, mask = encode(tokenizer, prompts, model.device)
        start_s = time.perf_counter()
        out = flashforge_hf.generate(model, ids, mask, batch_size=args.batch_size,
                                     **cli.decoding(args), **gen)
        ours_s = time.perf_counter() - start_s
        new["flashforge"] = generated_ids(out, ids.shape[1], stop_ids(model))
        tokens = {mode: sum(map(len, rows)) for mode, rows in new.items()}
        print(f"{len(prompts)} prompts in batches of {args.batch_size}: stock {stock_s:.1f} s "
              f"({tokens['stock'] / stock_s:.1f} tokens/s); flashforge {ours_s:.1f} s "
              f"({tokens['flashforge'] / ours_s:.1f} tokens/s), the few-shot prefix prefilled once for the run")
    texts = {mode: decode_texts(tokenizer, rows) for mode, rows in new.items()}
    score = {mode: sum(bool(is_correct(t, g)) for t, g in zip(texts[mode], golds)) for mode in texts}
    identical = sum(a == b for a, b in zip(new["stock"], new["flashforge"]))
    if args.verbose:
        for i, gold in enumerate(golds):
            print(f"\n#{i} gold {gold}\n  stock:      {texts['stock'][i].strip()!r}\n"
                  f"  flashforge: {texts['flashforge'][i].strip()!r}")
    n = len(prompts)
    print(f"\n{title}, {n} questions: accuracy stock {score['stock']}/{n} = {score['stock'] / n:.1%}, "
          f"flashforge {score['flashforge']}/{n} = {score['flashforge'] / n:.1%}; "
          f"identical token ids: {identical}/{n} questions")


def add_few_shot_args(parser, default_limit: int = 16) -> None:
    """--limit, --batch-size and --verbose of the few-shot evaluations."""
    parser.add_argument("--limit", type=cli.positive_int, default=default_limit, help=f"first N questions (default {default_limit})")
    parser.add_argument("--batch-size", type=cli.positive_int, default=16,
                        help="questions per batch (default 16): stock runs batch by batch; FlashForge runs all "
                        "batches in one call that prefills the few-shot prefix once")
    parser.add_argument("--verbose", action="store_true", help="print every question's generations")
