"""The ``flashforge-hf`` command: every subcommand through ``python -m flashforge_hf`` on a tiny model."""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import subprocess
import sys

import pytest
from tiny import save_tiny_chat_model

from flashforge_hf import cli, models


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashforge_hf", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)
        else:
            yield parser.prog, action


def test_every_option_has_help():
    """The CLI's options and those of the benchmarks that `flashforge-hf bench NAME` hands its arguments to."""
    parsers = [cli.build_parser()] + [importlib.import_module(m).build_parser()
                                      for m in cli.FORWARDED_BENCHMARKS.values()]
    assert len(parsers) == 4
    missing = [f"{prog} {action.option_strings}" for parser in parsers for prog, action in _all_actions(parser)
               if action.option_strings and not action.help]
    assert not missing, f"options without help: {missing}"


def test_bench_names_its_benchmarks(capsys):
    """`flashforge-hf bench --help` lists every benchmark; `bench NAME --help` is the benchmark's own help (its
    options, under the name the CLI gives it), from the installed package flashforge_bench."""
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in cli.FORWARDED_BENCHMARKS)
    for name, flag in (("attention", "--cases"), ("generate", "--batch-sizes"), ("e2e", "--workloads")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", name, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and flag in out and f"usage: flashforge-hf bench {name}" in out, out


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "generate", "bench"):
        assert command in out


@pytest.mark.parametrize("graph", ["auto", "off"])
def test_demo(tiny_model, graph):
    result = run_cli("demo", "--model", tiny_model, "--num-questions", "3", "--max-new-tokens", "4", "--no-warmup",
                     "--cuda-graph", graph)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Q3:" in out and "Q4:" not in out and out.count("flashforge: ") == 3
    for row in ("time to first token", "time per output token", "tokens/s", "KV-cache memory"):
        assert row in out
    assert "identical token ids: yes" in out


def test_demo_compile(tiny_model):
    """--compile runs FlashForge's decode loop through torch.compile (CPU: without graphs), same tokens; it
    refuses a --cuda-graph other than auto before any work."""
    from test_graphs import has_cxx

    bad = run_cli("demo", "--model", tiny_model, "--compile", "--cuda-graph", "on")
    assert bad.returncode != 0 and "leave --cuda-graph at auto" in bad.stderr
    if not has_cxx():
        pytest.skip("torch.compile (inductor) on CPU needs a C++ compiler")
    result = run_cli("demo", "--model", tiny_model, "--num-questions", "2", "--max-new-tokens", "4", "--no-warmup",
                     "--compile")
    assert result.returncode == 0, result.stderr
    assert "identical token ids: yes" in result.stdout


def test_generate_jsonl(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "how many days are there in 3 weeks ?"},
        {"id": "chat", "messages": [{"role": "system", "content": "you are a tool assistant"},
                                    {"role": "user", "content": "what is the time ?"}]},
        {"prompt": "how many days are there in 5 weeks ?"},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "out.jsonl"
    result = run_cli("generate", "--model", tiny_model, "--prompts", str(prompts), "--output", str(output),
                     "--max-new-tokens", "5", "--batch-size", "2", "--stock", "--no-warmup")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "chat", "2"]
    for r in records:
        assert isinstance(r["text"], str) and 1 <= len(r["token_ids"]) <= 5
        assert r["token_ids"] == r["stock_token_ids"] and r["identical"] is True
    assert "token ids identical to stock for all prompts: yes" in result.stderr


def test_generate_rejects_bad_line(tiny_model, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", tiny_model, "--prompts", str(prompts)])
    assert 'neither "prompt" nor "messages"' in str(exit_info.value)


def test_bench_generate(tmp_path):
    result = run_cli("bench", "generate", "--shape", "tiny", "--workload", "few-shot", "--batch-sizes", "1", "2",
                     "--shared-len", "32", "--suffix-len", "4", "--max-new-tokens", "3", "--out-dir", str(tmp_path))
    with open(tmp_path / "bench_generate.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["batch"], r["mode"]) for r in rows] == [("1", "stock"), ("1", "flashforge"), ("2", "stock"), ("2", "flashforge")]
    assert all(r["identical_tokens"] == "True" and float(r["ttft_s"]) > 0 and int(r["kv_bytes"]) > 0 for r in rows)
    if importlib.util.find_spec("matplotlib") is None:
        assert result.returncode == 1 and "pip install matplotlib" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "bench_generate.png").stat().st_size > 0


def test_missing_smollm2_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(models.CACHE_DIR_ENV, str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo"])
    assert models.SMOLLM2_INSTALL in str(exit_info.value)
