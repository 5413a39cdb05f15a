#!/usr/bin/env python
"""GSM8K 8-shot chain-of-thought: every question follows the same 8 worked exemplars (a ~650-token shared prefix).

Prompts are "Q: {question}\\nA: {answer}" blocks (the CoT exemplars of Wei et al. 2022), then "Q: {question}\\nA:";
greedy decoding stops at the next "Q:". The prediction is the number after "The answer is"; the reference is the
number after "####". Prints the accuracy of stock transformers and of FlashForge, how many generations have
identical token ids, and the timing table of each batch.

The questions come from the Hugging Face Hub (openai/gsm8k, config main, split test; needs `datasets`) or, with
--data, from a local .jsonl of question/answer records such as the 16 shipped in examples/data/gsm8k.

    python examples/fewshot_gsm8k.py --limit 16
    python examples/fewshot_gsm8k.py --data examples/data/gsm8k/test_16.jsonl    # offline
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import DATA, add_few_shot_args, evaluate_few_shot, load_records, read_records

from flashforge_hf import cli
from flashforge_hf.demo_prompts import extract_answer


def gsm8k_prompts(questions: list[dict], exemplars: str) -> list[str]:
    """One prompt per question record: the exemplars (a local .jsonl of question/answer) as "Q: ...\nA: ..." blocks,
    then "Q: {question}\nA:"."""
    prefix = "".join(f"Q: {e['question']}\nA: {e['answer']}\n\n" for e in read_records(Path(exemplars)))
    return [f"{prefix}Q: {q['question']}\nA:" for q in questions]


def gold_answer(answer: str) -> str:
    """The reference number: what follows "####", commas removed."""
    return answer.split("####")[-1].strip().replace(",", "")


def is_correct(text: str, gold: str) -> bool:
    """Whether the number after "The answer is" in ``text`` equals ``gold``."""
    prediction = extract_answer(text)
    try:
        return prediction is not None and float(prediction) == float(gold)
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser, max_new_tokens=256)
    parser.add_argument("--data", default="openai/gsm8k",
                        help="GSM8K test set: a data set on the Hugging Face Hub (config 'main', split 'test'; needs "
                        "`datasets`; default openai/gsm8k) or a local .jsonl with question/answer, e.g. "
                        "examples/data/gsm8k/test_16.jsonl")
    parser.add_argument("--exemplars", default=str(DATA / "gsm8k" / "cot_8shot_exemplars.jsonl"),
                        help="the few-shot exemplars (.jsonl with question/answer); default: the 8 CoT exemplars "
                        "shipped in examples/data/gsm8k")
    add_few_shot_args(parser)
    args = parser.parse_args(argv)

    questions = load_records(args.data, hub_config="main")[: args.limit]
    prompts = gsm8k_prompts(questions, args.exemplars)
    model, tokenizer = cli.load(args)
    golds = [gold_answer(q["answer"]) for q in questions]
    evaluate_few_shot(args, model, tokenizer, prompts, golds, is_correct, "GSM8K 8-shot CoT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
