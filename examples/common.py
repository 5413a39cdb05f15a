"""What the example scripts share: the data they ship with, reading records, the few-shot evaluation loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

import flashforge_hf
from flashforge_hf import cli
from flashforge_hf.comparison import STOCK, stop_ids, compare, generated_ids, run_generate
from flashforge_hf.models import decode_texts, encode

# Small samples of the public data sets (data/SOURCES.md says where each comes from): the tests and offline runs
# pass them with --data; by default the examples load the full sets from the Hugging Face Hub.
DATA = Path(__file__).resolve().parent / "data"
HOW_TO_FIX = ("pass --data PATH with a local .json/.jsonl file instead (small samples ship in examples/data/, "
              "see examples/data/SOURCES.md)")


def read_records(path: Path, field: str | None = None) -> list[dict]:
    """Records of a local .jsonl file (one JSON object a line) or .json file (a list; with ``field``, an object
    holding the list under that key, as BIG-Bench Hard's files hold theirs under "examples")."""
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    data = json.loads(path.read_text())
    return data[field] if field else data


def load_records(data: str, *, hub_config: str | None = None, split: str = "test",
                 field: str | None = None) -> list[dict]:
    """Records from ``data``: a local .json/.jsonl file (``field`` as in :func:`read_records`), read with
    ``datasets.load_dataset("json", data_files=data)`` where the `datasets` package is installed and with
    :func:`read_records` otherwise; or a data set on the Hugging Face Hub, ``datasets.load_dataset(data,
    hub_config, split=split)``. Exits with what failed, why, and how to fix it (a local file) where the Hub
    cannot be used: `datasets` missing, offline, or no such data set."""
    path = Path(data)
    local = path.suffix in (".json", ".jsonl") or path.exists()
    if local and not path.is_file():
        raise SystemExit(f"error: {data} is not a file (--data takes a local .json/.jsonl file or the name of a "
                         "data set on the Hugging Face Hub).")
    try:
        import datasets
    except ImportError as e:
        if local:
            return read_records(path, field)
        raise SystemExit(f"error: could not load {data!r} from the Hugging Face Hub: the `datasets` package is not "
                         f"installed ({e}). Install it (pip install datasets), or {HOW_TO_FIX}.") from e
    if local:
        json_field = field if path.suffix == ".json" else None  # a .jsonl file has one record a line
        return list(datasets.load_dataset("json", data_files=str(path), field=json_field, split="train"))
    try:
        return list(datasets.load_dataset(data, hub_config, split=split))
    except Exception as e:  # offline, no such data set or config, a server error: the way out is the same
        raise SystemExit(f"error: could not load {data!r} (config {hub_config!r}, split {split!r}) from the Hugging "
                         f"Face Hub: {type(e).__name__}: {e}. Offline, or a wrong name? Then {HOW_TO_FIX}.") from e


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
