"""The example scripts, each on a few items of the project's data with a tiny model: output format, and stock
and FlashForge producing the same token ids."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_chat_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRIPTS = ["fewshot_gsm8k", "fewshot_bbh", "document_qa", "tool_use"]

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"the shared data folder {DATA} is missing")


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--no-warmup", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


@needs_data
def test_gsm8k(tiny_model):
    result = run_example("fewshot_gsm8k", "--model", tiny_model, "--limit", "2", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "GSM8K 8-shot CoT, 2 questions: accuracy stock" in result.stdout
    assert "identical token ids: 2/2 questions" in result.stdout


@needs_data
def test_gsm8k_several_batches_prefill_the_prefix_once_for_the_run(tiny_model):
    result = run_example("fewshot_gsm8k", "--model", tiny_model, "--limit", "3", "--batch-size", "2",
                         "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "3 prompts in batches of 2" in result.stdout and "prefilled once for the run" in result.stdout
    assert "identical token ids: 3/3 questions" in result.stdout


@needs_data
def test_bbh(tiny_model):
    result = run_example("fewshot_bbh", "--model", tiny_model, "--task", "navigate", "--limit", "2", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "BBH navigate 3-shot CoT, 2 questions" in result.stdout
    assert "identical token ids: 2/2 questions" in result.stdout


@needs_data
def test_document_qa_refuses_then_truncates(tmp_path):
    short_context = save_tiny_chat_model(tmp_path / "short", max_position_embeddings=512)
    args = ("--model", short_context, "--task", "multidoc_qa", "--max-questions", "2", "--max-new-tokens", "4")
    refused = run_example("document_qa", *args)
    assert refused.returncode != 0
    assert "--truncate" in refused.stderr and "max_position_embeddings" in refused.stderr
    result = run_example("document_qa", *args, "--truncate")
    assert result.returncode == 0, result.stderr
    assert "document truncated" in result.stdout
    assert "Q2:" in result.stdout and "identical token ids: yes" in result.stdout


def test_tool_use(tiny_model):
    result = run_example("tool_use", "--model", tiny_model, "--limit", "2", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "20 tools, 2 requests" in result.stdout
    assert "identical token ids: yes" in result.stdout


def _agreement(model: str, tmp_path, *extra: str) -> dict:
    """benchmarks/agreement.py on 2 GSM8K prompts on the CPU (with ``extra`` arguments): its JSON result."""
    import json

    out = tmp_path / "agreement.json"
    script = EXAMPLES.parent / "benchmarks" / "agreement.py"
    result = subprocess.run([sys.executable, str(script), "--model", model, "--device", "cpu", "--limit", "2", *extra,
                             "--data", str(DATA / "gsm8k" / "test.jsonl"),
                             "--exemplars", str(DATA / "gsm8k" / "cot_8shot_exemplars.jsonl"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@needs_data
def test_agreement_benchmark(tiny_model, tmp_path):
    """benchmarks/agreement.py on a tiny model (CPU, bf16): every method reported, every share in [0, 1], stock
    in one batch of 8 equal to stock (tokens aligned), logit errors in (0, 1) (bf16 against fp32), transformers'
    eager loop with our cache against our own decode (CUDA-only compiled rows absent)."""
    r = _agreement(tiny_model, tmp_path)
    assert r["rows"] == 2 and r["tokens"] == 16
    assert set(r["greedy_agreement_with_stock"]) == {"stock (eager attention)", "flashforge", "flashforge eager loop",
                                                     "stock (sdpa), batches of 8", "stock (sdpa), one prompt at a time"}
    assert r["greedy_agreement_with_stock"]["stock (sdpa), batches of 8"] == 1.0  # 2 rows: the same single batch
    assert set(r["greedy_agreement_with_fp32"]) == {"stock (sdpa)", "stock (eager attention)", "flashforge",
                                                    "flashforge eager loop"}
    assert set(r["greedy_agreement_with_flashforge"]) == {"flashforge eager loop"}
    assert r["logits_rel_err_vs_flashforge"] == {}
    shares = [*r["greedy_agreement_with_stock"].values(), *r["greedy_agreement_with_fp32"].values(),
              *r["greedy_agreement_with_flashforge"].values(), *r["top1_equal_to_fp32"].values()]
    assert all(0.0 <= s <= 1.0 for s in shares)
    assert all(0.0 < e < 1.0 for e in r["logits_rel_err_vs_fp32"].values())


@needs_data
def test_agreement_benchmark_float32(tiny_model, tmp_path):
    """benchmarks/agreement.py --dtype float32 on a tiny model (CPU): without bf16 rounding our default decode and
    transformers' eager loop with our cache give stock's 16 greedy tokens on every row, and stock's logits are the
    fp32 reference itself (error 0), ours within float32 rounding of them."""
    r = _agreement(tiny_model, tmp_path, "--dtype", "float32")
    assert r["dtype"] == "float32"
    assert r["greedy_agreement_with_stock"]["flashforge"] == 1.0
    assert r["greedy_agreement_with_stock"]["flashforge eager loop"] == 1.0
    assert r["greedy_agreement_with_flashforge"] == {"flashforge eager loop": 1.0}
    assert r["logits_rel_err_vs_fp32"]["stock (sdpa)"] == 0.0
    assert 0.0 < r["logits_rel_err_vs_fp32"]["flashforge"] < 1e-5
