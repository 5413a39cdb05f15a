"""The demo and the GSM8K example on a GPU machine that cannot receive the real SmolLM2 weights.

The device machines take at most 64 MiB of files per call and have no hub, so SmolLM2-135M-Instruct's 93 MB GGUF
cannot travel. ``prepare`` (here) writes what can: the converted model's config, generation config, tokenizer and
chat template, plus the GSM8K files. ``run`` (there) builds a model of that shape with random bf16 weights and
the real tokenizer and runs ``flashforge-hf demo`` and ``examples/fewshot_gsm8k.py`` on CUDA: timings are those of
the real shape; the text is noise (random weights), and near-ties make stock and FlashForge differ on some rows.

    python benchmarks/gpu_demo.py prepare .carry/gpu_demo                  # here (converts SmolLM2 once)
    python benchmarks/gpu_demo.py run .carry/gpu_demo --out $OUT/demo.txt  # on the GPU machine
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")
GSM8K_FILES = ("test.jsonl", "cot_8shot_exemplars.jsonl")


def prepare(folder: Path, gsm8k: Path) -> None:
    from flashforge_hf.models import smollm2_path

    model = Path(smollm2_path())
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "gsm8k").mkdir(exist_ok=True)
    for name in MODEL_FILES:
        if (model / name).is_file():
            shutil.copy(model / name, folder / "model" / name)
    for name in GSM8K_FILES:
        shutil.copy(gsm8k / name, folder / "gsm8k" / name)
    print(f"wrote {folder}: carry it to the GPU machine and run `python benchmarks/gpu_demo.py run {folder}`")


def run(folder: Path, out, questions: int, max_new_tokens: int, device: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(tempfile.mkdtemp(prefix="smollm2_random_"))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder / "model")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(folder / "model").save_pretrained(model_dir)
    shutil.copy(folder / "model" / "generation_config.json", model_dir)
    print(f"random-weight SmolLM2-135M shape with the real tokenizer: {model_dir}", file=out, flush=True)
    commands = [
        [sys.executable, "-m", "flashforge_hf", "demo", "--model", str(model_dir), "--device", device,
         "--max-new-tokens", str(max_new_tokens)],
        [sys.executable, str(ROOT / "examples" / "fewshot_gsm8k.py"), "--model", str(model_dir), "--device", device,
         "--limit", str(questions), "--max-new-tokens", str(max_new_tokens),
         "--data", str(folder / "gsm8k" / GSM8K_FILES[0]), "--exemplars", str(folder / "gsm8k" / GSM8K_FILES[1])],
    ]
    for cmd in commands:
        print("$", " ".join(cmd), file=out, flush=True)
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the model's config, tokenizer and the GSM8K files to FOLDER (here)")
    p.add_argument("folder", type=Path)
    p.add_argument("--gsm8k", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k",
                   help="folder with test.jsonl and cot_8shot_exemplars.jsonl (default ../shared/data/gsm8k)")
    r = sub.add_parser("run", help="build the random-weight model and run the demo and the GSM8K example (CUDA)")
    r.add_argument("folder", type=Path)
    r.add_argument("--out", type=argparse.FileType("w"), default=sys.stdout, help="log file (default stdout)")
    r.add_argument("--questions", type=int, default=64, help="GSM8K questions (default 64)")
    r.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    r.add_argument("--device", default="cuda", help="default cuda (cpu: a quick check of the script itself)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.folder, args.gsm8k)
    else:
        run(args.folder, args.out, args.questions, args.max_new_tokens, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
