#!/usr/bin/env python
"""Tool use: one long system prompt describing ~20 tools (JSON schemas), shared by many user requests.

Each prompt is the chat template applied to [system: instructions + tool schemas, user: request]; the system
prompt is the batch's shared prefix. The model is asked to answer with one JSON tool call. Prints each request
with both generations (and whether they parse as a JSON call), the timing and memory table, and whether the
token ids are identical.

    python examples/tool_use.py
    python examples/tool_use.py --tools my_tools.json --requests my_requests.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import read_records

from flashforge_hf import cli
from flashforge_hf.comparison import compare
from flashforge_hf.models import decode_texts, encode

SYSTEM = (
    "You are an assistant that can call tools. The tools are described below as JSON schemas. To call a tool, "
    'answer with exactly one JSON object {{"name": <tool name>, "arguments": {{...}}}} and nothing else. If no tool '
    "fits, answer in plain text.\n\nTools:\n{tools}"
)
REQUESTS = [
    "What's the weather like in Lisbon right now, in celsius?",
    "Find me a cheap Thai restaurant near Union Square that is open now.",
    "Convert 250 euros to Japanese yen.",
    "Send an email to maria@example.com with the subject 'Slides' saying the slides are attached.",
    "Book a flight from JFK to LHR on 2025-03-14 for two people in economy.",
    "Remind me to call the dentist tomorrow at 9am (2025-03-02T09:00).",
    "Translate 'Where is the train station?' into German.",
    "What is (17 + 4) * 3 / 7?",
    "How do I get from the Louvre to the Eiffel Tower on foot?",
    "Where is my parcel? The UPS tracking number is 1Z999AA10123456784.",
]


def parses_as_call(text: str, names: set[str]) -> bool:
    """Whether ``text`` is a JSON object naming one of the tools."""
    try:
        call = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(call, dict) and call.get("name") in names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser, max_new_tokens=64)
    parser.add_argument("--tools", default=str(Path(__file__).with_name("tools.json")),
                        help="JSON list of tool schemas (OpenAI function format); default: examples/tools.json")
    parser.add_argument("--requests", metavar="FILE",
                        help='JSONL of user requests, {"request": "..."} a line; default: 10 built-in requests')
    parser.add_argument("--limit", type=int, help="use only the first N requests")
    args = parser.parse_args(argv)

    tools = json.loads(Path(args.tools).read_text())
    names = {t["function"]["name"] for t in tools}
    requests = [r["request"] for r in read_records(Path(args.requests))] if args.requests else REQUESTS
    requests = requests[: args.limit]
    system = SYSTEM.format(tools=json.dumps(tools, indent=1))
    model, tokenizer = cli.load(args)
    if tokenizer.chat_template is None:
        raise SystemExit("error: this example applies the chat template, and the tokenizer has none: use a chat model.")
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": r}] for r in requests]
    ids, mask = encode(tokenizer, chats, model.device)
    print(f"{len(tools)} tools, {len(requests)} requests, prompts of up to {ids.shape[1]} tokens")
    stock, ours = compare(model, ids, mask, warmup=not args.no_warmup, **cli.decoding(args),
                          max_new_tokens=args.max_new_tokens, do_sample=False)
    texts = [decode_texts(tokenizer, run.new_ids) for run in (stock, ours)]
    for i, request in enumerate(requests):
        print(f"\n{i + 1}. {request}")
        for mode, text in zip(("stock", "flashforge"), texts):
            tag = "tool call" if parses_as_call(text[i], names) else "text"
            print(f"   {mode:>10} [{tag}]: {text[i].strip()}")
    cli.print_comparison(stock, ours)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
