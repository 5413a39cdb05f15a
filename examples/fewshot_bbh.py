#!/usr/bin/env python
"""BIG-Bench Hard 3-shot chain-of-thought: every question of a task follows the task's 3 worked exemplars.

The prompt is the task's cot-prompts/<task>.txt, then "Q: {input}\\nA: Let's think step by step."; greedy decoding
stops at the next "Q:". The prediction is what follows "the answer is" on its line (exact match with the
target). Prints the accuracy of stock transformers and of FlashForge, whether their token ids are identical,
and the timing table of each batch.

    python examples/fewshot_bbh.py --task date_understanding --limit 16
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from common import SHARED_DATA, add_few_shot_args, evaluate_few_shot, load_records

from flashforge_hf import cli


def cot_prompt(path: Path) -> str:
    """The task's 3-shot prompt, without the canary header (everything up to the "-----" line)."""
    text = path.read_text()
    return text.split("-----\n", 1)[-1].strip()


def extract_answer(text: str) -> str | None:
    """What follows "the answer is" on its line, without the final period."""
    match = re.search(r"[Tt]he answer is (.+?)\.?\s*(?:\n|$)", text)
    return match.group(1).strip() if match else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser, max_new_tokens=256)
    parser.add_argument("--task", default="boolean_expressions",
                        help="BBH task name, e.g. date_understanding, navigate, word_sorting (default boolean_expressions)")
    parser.add_argument("--data", default=str(SHARED_DATA / "bbh"),
                        help="folder with <task>.json and cot-prompts/<task>.txt (default: the project's copy), or a "
                        "Hub name such as lukaemon/bbh for the questions (needs `datasets`; the prompts stay local, "
                        "see --prompts)")
    parser.add_argument("--prompts", help="folder of the CoT prompts (default: <data>/cot-prompts, or the project's copy)")
    add_few_shot_args(parser)
    args = parser.parse_args(argv)

    data = Path(args.data)
    local = data.is_dir()
    prompts_dir = Path(args.prompts) if args.prompts else (data if local else SHARED_DATA / "bbh") / "cot-prompts"
    prompt_file = prompts_dir / f"{args.task}.txt"
    if not prompt_file.is_file() or (local and not (data / f"{args.task}.json").is_file()):
        tasks = sorted(p.stem for p in prompts_dir.glob("*.txt"))
        raise SystemExit(f"error: no BBH task {args.task!r} in {data} / {prompts_dir}; tasks there: {', '.join(tasks)}.")
    prefix = cot_prompt(prompt_file)
    examples = load_records(str(data / f"{args.task}.json") if local else args.data, hub_config=args.task)[: args.limit]
    model, tokenizer = cli.load(args)
    prompts = [f"{prefix}\n\nQ: {ex['input']}\nA: Let's think step by step." for ex in examples]
    golds = [ex["target"] for ex in examples]
    evaluate_few_shot(args, model, tokenizer, prompts, golds, lambda text, gold: extract_answer(text) == gold,
                      f"BBH {args.task} 3-shot CoT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
