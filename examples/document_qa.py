#!/usr/bin/env python
"""Long-document QA (L-Eval): one document and all the questions asked of it, in one batch.

Each prompt is the chat template applied to one user message "{document}\\n\\nQuestion: {question}", so the whole
document is the batch's shared prefix (prefilled and stored once by FlashForge, once per question by stock
transformers). Prints each question with the reference and both generations, the timing and memory table, and
whether the token ids are identical.

A document longer than the model's context (config.max_position_embeddings minus --max-new-tokens) is refused,
unless --truncate is given (then the document is cut to fit).

The documents come from the Hugging Face Hub (L4NLP/LEval, --task as config, split test; needs `datasets`) or,
with --data, from a local .jsonl with one document a line: "input" (the document), "instructions" (its
questions) and "outputs" (their reference answers).

    python examples/document_qa.py --task multidoc_qa --doc-index 0 --truncate
    python examples/document_qa.py --data my_documents.jsonl
"""

from __future__ import annotations

import argparse

from common import load_records

from flashforge_hf import cli
from flashforge_hf.comparison import compare
from flashforge_hf.models import decode_texts, encode

TASKS = ("coursera", "financial_qa", "legal_contract_qa", "multidoc_qa")
PROMPT = "{document}\n\nAnswer the question about the document above briefly.\nQuestion: {question}"


def prompts_for(document: str, questions: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": PROMPT.format(document=document, question=q)}] for q in questions]


def fit_document(tokenizer, document: str, questions: list[str], budget: int, truncate: bool) -> str:
    """``document``, or with ``truncate`` its beginning, such that the longest prompt has at most ``budget``
    tokens; exits with the numbers and the ways out when it does not fit and ``truncate`` is off."""
    longest = max(len(ids) for ids in _token_lists(tokenizer, prompts_for(document, questions)))
    if longest <= budget:
        return document
    if not truncate:
        raise SystemExit(
            f"error: the longest prompt of this document has {longest} tokens, but the model's context leaves "
            f"{budget} for the prompt (max_position_embeddings minus --max-new-tokens). Pass --truncate to cut the "
            "document to fit, choose a shorter document (--doc-index), or use a model with a longer context.")
    doc_ids = tokenizer(document, add_special_tokens=False).input_ids
    keep = len(doc_ids) - (longest - budget)
    while keep > 0:  # decoding and re-encoding can change the count a little: shrink until it fits
        cut = tokenizer.decode(doc_ids[:keep])
        longest = max(len(ids) for ids in _token_lists(tokenizer, prompts_for(cut, questions)))
        if longest <= budget:
            print(f"document truncated to its first {keep} of {len(doc_ids)} tokens")
            return cut
        keep -= longest - budget
    raise SystemExit(f"error: the questions alone exceed the {budget}-token prompt budget; lower --max-new-tokens.")


def _token_lists(tokenizer, chats) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return tokenizer(texts, add_special_tokens=False).input_ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser, max_new_tokens=64)
    parser.add_argument("--task", choices=TASKS, default="multidoc_qa",
                        help="L-Eval task, the Hub data set's config (default multidoc_qa)")
    parser.add_argument("--data", default="L4NLP/LEval",
                        help="a data set on the Hugging Face Hub (config --task, split 'test'; needs `datasets`; "
                        "default L4NLP/LEval) or a local .jsonl of documents (input, instructions, outputs per line)")
    parser.add_argument("--doc-index", type=int, default=0, help="which document (line) of the file (default 0)")
    parser.add_argument("--max-questions", type=int, help="ask only the first N questions of the document")
    parser.add_argument("--truncate", action="store_true",
                        help="cut a document that does not fit the model's context instead of refusing it")
    args = parser.parse_args(argv)

    records = load_records(args.data, hub_config=args.task)
    if not 0 <= args.doc_index < len(records):
        raise SystemExit(f"error: --doc-index {args.doc_index} is out of range: the data has {len(records)} documents.")
    record = records[args.doc_index]
    questions = record["instructions"][: args.max_questions]
    references = record["outputs"][: args.max_questions]
    model, tokenizer = cli.load(args)
    if tokenizer.chat_template is None:
        raise SystemExit("error: this example applies the chat template, and the tokenizer has none: use a chat model.")
    budget = model.config.max_position_embeddings - args.max_new_tokens
    document = fit_document(tokenizer, record["input"], questions, budget, args.truncate)
    ids, mask = encode(tokenizer, prompts_for(document, questions), model.device)
    print(f"{args.task} document {args.doc_index}: {len(questions)} questions, prompts of up to {ids.shape[1]} tokens")
    stock, ours = compare(model, ids, mask, warmup=not args.no_warmup, **cli.decoding(args),
                          max_new_tokens=args.max_new_tokens, do_sample=False)
    texts = [decode_texts(tokenizer, run.new_ids) for run in (stock, ours)]
    for i, (question, reference) in enumerate(zip(questions, references)):
        print(f"\nQ{i + 1}: {question.strip()[:300]}\n   reference:  {reference.strip()[:300]}")
        print(f"   stock:      {texts[0][i].strip()}\n   flashforge: {texts[1][i].strip()}")
    cli.print_comparison(stock, ours)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
