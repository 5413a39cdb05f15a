#!/usr/bin/env python
"""BIG-Bench Hard 3-shot chain-of-thought: every question of a task follows the task's 3 worked exemplars.

The prompt is the task's cot-prompts/<task>.txt, then "Q: {input}\\nA: Let's think step by step."; greedy decoding
stops at the next "Q:". The prediction is what follows "the answer is" on its line (exact match with the
target). Prints the accuracy of stock transformers and of FlashForge, whether their token ids are identical,
and the timing table of each batch.

The questions come from the Hugging Face Hub (lukaemon/bbh, the task as config, split test; needs `datasets`)
or, with --data, from a local BIG-Bench Hard task file (such as examples/data/bbh/navigate_16.json) or a folder
of them; the 27 tasks' CoT prompts ship in examples/data/bbh/cot-prompts.

    python examples/fewshot_bbh.py --task date_understanding --limit 16
    python examples/fewshot_bbh.py --task navigate --data examples/data/bbh/navigate_16.json    # offline
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from common import DATA, add_few_shot_args, evaluate_few_shot, load_records

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
    parser.add_argument("--data", default="lukaemon/bbh",
                        help="the questions: a data set on the Hugging Face Hub (the task as config, split 'test'; "
                        "needs `datasets`; default lukaemon/bbh), a local BIG-Bench Hard task file (.json with "
                        "\"examples\": [{input, target}, ...]), or a folder holding <task>.json")
    parser.add_argument("--prompts", default=str(DATA / "bbh" / "cot-prompts"),
                        help="folder of the CoT prompts, <task>.txt (default: the 27 shipped in "
                        "examples/data/bbh/cot-prompts)")
    add_few_shot_args(parser)
    args = parser.parse_args(argv)

    prompts_dir = Path(args.prompts)
    prompt_file = prompts_dir / f"{args.task}.txt"
    if not prompt_file.is_file():
        tasks = sorted(p.stem for p in prompts_dir.glob("*.txt"))
        raise SystemExit(f"error: no CoT prompt {prompt_file} for BBH task {args.task!r}; tasks there: "
                         f"{', '.join(tasks) or 'none'}.")
    folder = Path(args.data)
    data = str(folder / f"{args.task}.json") if folder.is_dir() else args.data
    prefix = cot_prompt(prompt_file)
    examples = load_records(data, hub_config=args.task, field="examples")[: args.limit]
    model, tokenizer = cli.load(args)
    prompts = [f"{prefix}\n\nQ: {ex['input']}\nA: Let's think step by step." for ex in examples]
    golds = [ex["target"] for ex in examples]
    evaluate_few_shot(args, model, tokenizer, prompts, golds, lambda text, gold: extract_answer(text) == gold,
                      f"BBH {args.task} 3-shot CoT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
