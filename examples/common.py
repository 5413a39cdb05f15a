"""What the example scripts share: where the project's data lives, reading records, the few-shot evaluation loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tqdm.auto import tqdm

from flashforge_hf import cli
from flashforge_hf.bench_generate import compare
from flashforge_hf.models import encode

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
    """Greedy-generate ``prompts`` in batches of ``args.batch_size`` with stock transformers and with FlashForge
    (stopping at the next "Q:"), print each batch's timing table, then the accuracy of both
    (``is_correct(generated_text, gold)``) and how many generations have identical token ids."""
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, stop_strings=["Q:", "</s>", "<|im_end|>"],
               tokenizer=tokenizer)
    score = {"stock": 0, "flashforge": 0}
    identical = 0
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc="batches", disable=len(starts) == 1):
        ids, mask = encode(tokenizer, prompts[start : start + args.batch_size], model.device)
        runs = compare(model, ids, mask, warmup=not args.no_warmup, **gen)
        cli.print_comparison(*runs)
        texts = [tokenizer.batch_decode(run.new_ids, skip_special_tokens=True) for run in runs]
        for i, gold in enumerate(golds[start : start + args.batch_size]):
            for run, text in zip(runs, texts):
                score[run.mode] += bool(is_correct(text[i], gold))
            identical += runs[0].new_ids[i] == runs[1].new_ids[i]
            if args.verbose:
                print(f"\n#{start + i} gold {gold}\n  stock:      {texts[0][i].strip()!r}\n"
                      f"  flashforge: {texts[1][i].strip()!r}")
    n = len(prompts)
    print(f"\n{title}, {n} questions: accuracy stock {score['stock']}/{n} = {score['stock'] / n:.1%}, "
          f"flashforge {score['flashforge']}/{n} = {score['flashforge'] / n:.1%}; "
          f"identical token ids: {identical}/{n} questions")


def add_few_shot_args(parser, default_limit: int = 16) -> None:
    """--limit, --batch-size and --verbose of the few-shot evaluations."""
    parser.add_argument("--limit", type=cli.positive_int, default=default_limit, help=f"first N questions (default {default_limit})")
    parser.add_argument("--batch-size", type=cli.positive_int, default=16,
                        help="questions per batch (default 16); each batch shares the few-shot prefix")
    parser.add_argument("--verbose", action="store_true", help="print every question's generations")
