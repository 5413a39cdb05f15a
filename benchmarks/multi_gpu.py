"""Issue 6 on two GPUs: FlashForge under tensor parallel (DistributedConfig(tp_plan="auto"), torchrun, NCCL) and
device_map="auto", against one GPU, on document QA (one 4,096-token document, 64 questions of 64 tokens, 64 new
tokens) with a random-weight Llama-3-8B-shape model in bf16.

Each run (one GPU, tensor parallel, device_map) measures, on its own setup:
  - teacher-forced logits of 4 rows over 16 random forced tokens, ours and stock (sdpa, one pass) in bf16,
    against the same setup's fp32 model: relative L2 errors (ours passes at <= 2x stock's);
  - the first 16 greedy tokens of every row, ours (flashforge_hf.generate) and stock (the prefix-reuse pattern:
    plain stock prefill of 64 x 4,160 tokens runs out of memory on one GPU), and ours again with the fp32 model:
    random bf16 weights leave near-ties everywhere, so any change of reduction order (tensor parallel's
    all-reduce) flips bf16 greedy choices, stock's as much as ours; in fp32 the rounding noise is ~1e5 times
    smaller, and the fp32 tokens of a multi-GPU run must match the one-GPU run's;
  - time to first token, time per output token and tokens/s of ours (transformers' eager loop; under tensor
    parallel also our decode steps replayed from CUDA graphs, which need one device per process) and of stock
    with prefix reuse, best of 2 after a warm-up (not on one GPU).
``report`` compares the greedy tokens of each multi-GPU run with the one-GPU run's and writes the table.

    python benchmarks/multi_gpu.py save /tmp/ff8b                          # random 8B-shape bf16 model
    python benchmarks/multi_gpu.py single /tmp/ff8b --out single.json
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py tp /tmp/ff8b --out tp.json
    python benchmarks/multi_gpu.py device-map /tmp/ff8b --out device_map.json
    python benchmarks/multi_gpu.py report single.json tp.json device_map.json --md benchmarks/results/multi_gpu_h100.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch

FORCED, CHECK_ROWS = 16, 4


def _load(folder: str, mode: str, dtype, attn: str = "flashforge"):
    from transformers import AutoModelForCausalLM, DistributedConfig

    import flashforge_hf  # noqa: F401  (registers "flashforge")

    kw = dict(dtype=dtype, attn_implementation=attn)
    if mode == "tp":
        kw["distributed_config"] = DistributedConfig(tp_plan="auto")
    elif mode == "device-map":
        kw["device_map"] = "auto"
    else:
        kw["device_map"] = {"": 0 if torch.cuda.is_available() else "cpu"}
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def run(folder: str, mode: str, doc: int, questions: int, new: int) -> dict:
    from flashforge_bench import generate as be
    from flashforge_bench.harness import card_name, rel_err, tree_batch
    from flashforge_hf.models import layer_devices

    torch.set_grad_enabled(False)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    levels = ((doc, 1), (64, questions))  # the document, then the questions of 64 tokens
    ids, mask = tree_batch(levels, vocab, "cpu")
    sub = ids[be.check_rows(ids.shape[0], CHECK_ROWS)]
    forced = torch.randint(3, vocab, (sub.shape[0], FORCED), generator=torch.Generator().manual_seed(1))
    ones = torch.ones_like(sub)

    ref_model = _load(folder, mode, torch.float32)  # the fp32 reference, same placement
    dev = ref_model.get_input_embeddings().weight.device
    ref = be.teacher_forced(ref_model, sub.to(dev), ones.to(dev), forced.to(dev), ours=False)
    run32 = be.run_generate(ref_model, ids.to(dev), mask.to(dev), be.EAGER, max_new_tokens=FORCED,
                            min_new_tokens=FORCED, do_sample=False)
    greedy_fp32 = run32.sequences[:, ids.shape[1]:].tolist()
    del ref_model, run32
    be.free_memory()

    model = _load(folder, mode, torch.bfloat16)
    dev = model.get_input_embeddings().weight.device
    ids, mask, sub, ones, forced = (t.to(dev) for t in (ids, mask, sub, ones, forced))
    err = {}
    for name, ours in (("ours", True), ("stock", False)):
        logits = be.teacher_forced(model, sub, ones, forced, ours=ours)
        err[name] = rel_err(logits, ref)
    wl = be.Workload("doc-qa", "llama-8b", levels, new)
    greedy = {}
    for name, method in (("ours", be.EAGER), ("stock", be.REUSE)):
        run16 = be.run_generate(model, ids, mask, method, max_new_tokens=FORCED, min_new_tokens=FORCED,
                                do_sample=False)
        greedy[name] = run16.sequences[:, ids.shape[1]:].tolist()
    timings = {}
    if mode != "single":
        graph = (be.GRAPH,) if mode == "tp" and dev.type == "cuda" else ()  # device_map: one device needed
        for method in (be.REUSE, be.EAGER) + graph:
            r = be.measure(model, wl, method, ids, mask, repeats=2)
            timings[method] = be.run_metrics(r) if isinstance(r, be.Run) else dict(status=r)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    return dict(mode=mode, card=card_name(dev)[0],
                doc=doc, questions=questions, new_tokens=new,
                gpus=torch.distributed.get_world_size() if dist else max(1, len(layer_devices(model))),
                devices=sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}),
                logit_err=err, logits_ok=err["ours"] <= 2 * err["stock"], greedy=greedy, greedy_fp32=greedy_fp32,
                timings=timings,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def report(paths: list[str], md: str, commit: str) -> None:
    runs = {r["mode"]: r for r in (json.loads(Path(p).read_text()) for p in paths)}
    single = runs.get("single")
    first = next(iter(runs.values()))
    lines = ["# Two GPUs: tensor parallel and device_map", "",
             f"Random-weight Llama-3-8B shape, bf16; document QA: a {first['doc']}-token document, {first['questions']} "
             f"questions of 64 tokens, {first['new_tokens']} new tokens (timed runs); commit {commit}; "
             "`benchmarks/multi_gpu.py` (its docstring has the commands and the method).", "",
             "| run | card | GPUs | date | logit err ours | logit err stock | ours <= 2x stock "
             "| greedy 16 = one-GPU, ours fp32 | ours bf16 | stock bf16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    def same(a, b):
        return f"{agreement(a, b):.0%}" if single else "-"

    for mode, r in runs.items():
        s = single or r
        lines.append(f"| {mode} | {r['card']} | {r['gpus']} | {r['date']} | {r['logit_err']['ours']:.4f} | "
                     f"{r['logit_err']['stock']:.4f} | {r['logits_ok']} | {same(r['greedy_fp32'], s['greedy_fp32'])} | "
                     f"{same(r['greedy']['ours'], s['greedy']['ours'])} | "
                     f"{same(r['greedy']['stock'], s['greedy']['stock'])} |")
    lines += ["", "| run | method | status | TTFT ms | TPOT ms | tokens/s | KV GiB (this process) |",
              "|---|---|---|---|---|---|---|"]
    for mode, r in runs.items():
        for method, t in r["timings"].items():
            cells = [f"{t[k]:.4g}" if isinstance(t.get(k), float) else "-"
                     for k in ("ttft_ms", "tpot_ms", "tokens_per_s", "kv_gib")]
            lines.append(f"| {mode} | {method} | {t.get('status')} | " + " | ".join(cells) + " |")
    Path(md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["save", "single", "tp", "device-map", "report"])
    ap.add_argument("paths", nargs="+", help="model folder (save/single/tp/device-map) or result files (report)")
    ap.add_argument("--out", help="result JSON (single/tp/device-map)")
    ap.add_argument("--md", help="markdown table (report)")
    ap.add_argument("--commit", default="unknown", help="commit to record (report)")
    ap.add_argument("--doc", type=int, default=4096, help="document tokens (default 4096)")
    ap.add_argument("--questions", type=int, default=64, help="questions of 64 tokens (default 64)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per question, timed runs (default 64)")
    args = ap.parse_args()
    if args.what == "save":
        from flashforge_bench.harness import random_model

        random_model("llama-8b", torch.device("cuda", 0), torch.bfloat16, max_positions=8192).save_pretrained(
            args.paths[0])
        return
    if args.what == "report":
        report(args.paths, args.md, args.commit)
        return
    tp = args.what == "tp"
    if tp:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        result = run(args.paths[0], args.what, args.doc, args.questions, args.new_tokens)
        if not tp or torch.distributed.get_rank() == 0:
            Path(args.out).write_text(json.dumps(result))
            print(json.dumps({k: v for k, v in result.items() if k not in ("greedy", "greedy_fp32")}))
        if tp:
            torch.distributed.barrier()
    finally:
        if tp:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
