"""The example scripts, each on a few items of the data shipped in examples/data (or a file the test writes) with
a tiny model: output format, stock and FlashForge producing the same token ids, and the message that replaces
the Hugging Face Hub where it cannot be used."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from tiny import save_tiny_chat_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "data"
GSM8K = DATA / "gsm8k" / "test_16.jsonl"
EXEMPLARS = DATA / "gsm8k" / "cot_8shot_exemplars.jsonl"
BBH_NAVIGATE = DATA / "bbh" / "navigate_16.json"
SCRIPTS = ["fewshot_gsm8k", "fewshot_bbh", "document_qa", "tool_use"]


def run_example(name: str, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """examples/<name>.py with ``args`` (and ``pythonpath`` ahead of the installed packages), never reaching the
    network (HF_HUB_OFFLINE)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--no-warmup", *args],
                          capture_output=True, text=True, timeout=180, env=env)


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


def test_gsm8k(tiny_model):
    result = run_example("fewshot_gsm8k", "--model", tiny_model, "--data", str(GSM8K), "--limit", "2",
                         "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "GSM8K 8-shot CoT, 2 questions: accuracy stock" in result.stdout
    assert "identical token ids: 2/2 questions" in result.stdout


def test_gsm8k_several_batches_prefill_the_prefix_once_for_the_run(tiny_model):
    result = run_example("fewshot_gsm8k", "--model", tiny_model, "--data", str(GSM8K), "--limit", "3",
                         "--batch-size", "2", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "3 prompts in batches of 2" in result.stdout and "prefilled once for the run" in result.stdout
    assert "identical token ids: 3/3 questions" in result.stdout


def test_bbh(tiny_model):
    result = run_example("fewshot_bbh", "--model", tiny_model, "--task", "navigate", "--data", str(BBH_NAVIGATE),
                         "--limit", "2", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "BBH navigate 3-shot CoT, 2 questions" in result.stdout
    assert "identical token ids: 2/2 questions" in result.stdout


def write_documents(path: Path) -> Path:
    """A .jsonl of one document in L-Eval's fields: 1,000 tokens of the tiny tokenizer's words (longer than a
    512-token context), 3 questions and their answers."""
    text = " ".join(f"after day {d} there were {3 * d + 1} dollars left, so the total cost was {2 * d} dollars ."
                    for d in range(50))
    record = {"input": text, "instructions": ["how much money was left after day 7 ?", "what was the total cost ?",
                                              "how many days were there ?"], "outputs": ["22 dollars", "98", "50"]}
    path.write_text(json.dumps(record) + "\n")
    return path


def test_document_qa_refuses_then_truncates(tmp_path):
    short_context = save_tiny_chat_model(tmp_path / "short", max_position_embeddings=512)
    args = ("--model", short_context, "--data", str(write_documents(tmp_path / "documents.jsonl")),
            "--max-questions", "2", "--max-new-tokens", "4")
    refused = run_example("document_qa", *args)
    assert refused.returncode != 0
    assert "--truncate" in refused.stderr and "max_position_embeddings" in refused.stderr
    result = run_example("document_qa", *args, "--truncate")
    assert result.returncode == 0, result.stderr
    assert "document truncated" in result.stdout
    assert "Q2:" in result.stdout and "identical token ids: yes" in result.stdout


HUB_DEFAULTS = {"fewshot_gsm8k": "openai/gsm8k", "fewshot_bbh": "lukaemon/bbh", "document_qa": "L4NLP/LEval"}
# Stand-ins for the `datasets` package, put ahead of the installed one: not installed at all, and installed but
# offline (the error datasets raises then).
DATASETS_STUBS = {
    "not installed": ('raise ImportError("No module named \'datasets\'")\n', "`datasets` package is not installed"),
    "offline": ("def load_dataset(path, name=None, **kwargs):\n"
                "    raise ConnectionError(f\"Couldn't reach {path!r} on the Hub (OfflineModeIsEnabled)\")\n",
                "ConnectionError: Couldn't reach"),
}


@pytest.mark.parametrize("case", list(DATASETS_STUBS))
@pytest.mark.parametrize("name", list(HUB_DEFAULTS))
def test_hub_unavailable_says_what_failed_and_how_to_fix_it(name, case, tiny_model, tmp_path):
    """Without --data the examples read the Hub: where `datasets` is missing or offline they exit non-zero with
    one message (the data set, the reason, --data PATH as the way out), not a traceback."""
    stub, reason = DATASETS_STUBS[case]
    (tmp_path / "datasets.py").write_text(stub)
    result = run_example(name, "--model", tiny_model, pythonpath=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert repr(HUB_DEFAULTS[name]) in result.stderr and reason in result.stderr, result.stderr
    assert "--data PATH" in result.stderr and "examples/data/" in result.stderr


@pytest.mark.parametrize("path, field", [(GSM8K, None), (BBH_NAVIGATE, "examples")])
def test_local_data_through_datasets_where_installed(path, field, monkeypatch):
    """load_records on a local file: datasets.load_dataset("json", data_files=...) where `datasets` imports (a
    recording stand-in here), else the plain reader; the same records either way."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from common import load_records, read_records

    expected = read_records(path, field)
    assert len(expected) == 16
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    assert load_records(str(path), field=field) == expected
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter(read_records(Path(kwargs["data_files"]), kwargs["field"]))

    stand_in = types.ModuleType("datasets")
    stand_in.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", stand_in)
    assert load_records(str(path), field=field) == expected
    assert calls == [(("json",), dict(data_files=str(path), field=field, split="train"))]


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
                             "--data", str(GSM8K), "--exemplars", str(EXEMPLARS), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


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
