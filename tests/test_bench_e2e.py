"""The end-to-end generate benchmark (flashforge_bench.generate, benchmarks/generate.py) at --scale tiny on the
CPU: every workload, the capacity search and the profile run; the checks pass; a method that runs out of memory
is recorded as OOM."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

from flashforge_bench import generate as be
from flashforge_hf import cli

def test_workloads_match_the_issue():
    w = be.WORKLOADS
    assert (w["doc-qa-4k"].levels, w["doc-qa-4k"].new_tokens) == (((4096, 1), (64, 64)), 128)
    assert (w["doc-qa-16k"].levels, w["doc-qa-16k"].rows) == (((16384, 1), (64, 16)), 16)
    assert w["few-shot-1b"].shape == "llama-1b" and w["few-shot-8b"].levels == ((650, 1), (64, 256))
    assert (w["parallel-sampling"].rows, w["parallel-sampling"].generate_kwargs()["do_sample"]) == (64, True)
    assert (w["tree"].rows, w["tree"].prompt_len, w["tree"].unique_prompt_tokens) == (64, 3136, 1024 + 8 * 2048 + 64 * 64)
    assert w["no-sharing"].methods() == [be.STOCK, be.EAGER, be.GRAPH, be.COMPILED]
    assert w["no-sharing"].methods(cuda=False) == [be.STOCK, be.EAGER]
    assert w["batch-1"].methods() == [be.STOCK_COMPILED, be.STOCK, be.REUSE, be.EAGER, be.GRAPH, be.COMPILED]
    ids, mask = w["tree"].scaled("tiny").batch(1000, "cpu")
    assert ids.shape == (16, 32 + 64 + 4) and bool(mask.all())
    assert torch.equal(ids[0, :96], ids[3, :96]) and not torch.equal(ids[0, :96], ids[4, :96])
    assert torch.equal(ids[0, :32], ids[15, :32])


def test_largest_batch_bisects_to_the_limit():
    probes = []

    def probe(b):
        probes.append(b)
        return None if b > 37 else f"run {b}"

    assert be.largest_batch(probe, 4096, guess=30, tol=0) == (37, "run 37")
    assert be.largest_batch(lambda b: None, 64) == (0, None)
    assert be.largest_batch(lambda b: "ok", 8, guess=8)[0] == 8


def test_tiny_run_writes_results_and_checks_pass(tmp_path, monkeypatch):
    real = be.run_generate

    def stock_runs_out_of_memory(model, ids, mask, mode, **kw):
        if mode == be.STOCK and "prefill_chunk_size" not in kw and ids.shape[0] > 2:  # its timed runs, not warm-ups
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, ids, mask, mode, **kw)

    monkeypatch.setattr(be, "run_generate", stock_runs_out_of_memory)
    assert cli.main(["bench", "e2e", "--scale", "tiny", "--out-dir", str(tmp_path), "--commit", "test",
                     "--workloads", "doc-qa-4k", "tree", "parallel-sampling", "capacity", "profile"]) == 0
    with open(tmp_path / "generate_cpu_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == be.COLUMNS
    got = {(r["workload"], r["method"]): r for r in rows}
    cpu = (be.STOCK, be.REUSE, be.EAGER)  # stock-chunked on the document workloads only; no CUDA-only methods
    assert set(got) == {("doc-qa-4k", m) for m in cpu + (be.STOCK_CHUNKED,)} | {("tree", m) for m in cpu} \
        | {("parallel-sampling", m) for m in cpu} \
        | {("capacity", m) for m in be.CAPACITY_METHODS}
    assert got["doc-qa-4k", be.STOCK]["status"] == "OOM" and got["doc-qa-4k", be.STOCK]["tpot_ms"] == ""
    for (workload, method), r in got.items():
        if workload != "capacity":
            assert r["logits_ok"] == "True" and r["greedy_ok"] == "True", r
        if r["status"] == "ok":
            assert float(r["ttft_ms"]) > 0 and float(r["tpot_ms"]) > 0 and float(r["kv_gib"]) > 0
    ours = got["doc-qa-4k", be.EAGER]
    assert float(ours["kv_gib"]) <= 1.05 * float(ours["unique_kv_gib"])
    assert got["capacity", be.EXPLICIT]["rows"] == "8"  # nothing runs out of memory on the CPU: the cap
    for r in rows:  # the decode-step floor: the GEMMs' floor plus the attention's, each the larger of two terms > 0
        if r["workload"] != "capacity":
            gemm, attn = ([float(r[f"floor_{phase}_{term}_ms"]) for term in ("bytes", "flops")]
                          for phase in ("gemm", "attn"))
            assert min(gemm + attn) > 0, r
            assert float(r["floor_ms"]) == pytest.approx(max(gemm) + max(attn), rel=1e-9), r
    md = (tmp_path / "generate_cpu_tiny.md").read_text()
    assert "commit test" in md and "## Targets" in md and "| doc-qa-4k | stock | 4 | OOM |" in md
    assert "card ceilings (CPU, measured): bandwidth " in md and " TFLOP/s (large matmul, bf16 on CUDA)" in md
    assert "host us per layer per decode step (ours):" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "generate_cpu_tiny.png").stat().st_size > 0
    profile = (tmp_path / "generate_cpu_tiny_profile.json").read_text()
    # the profiled steps lie in one bucket, whose plan the warm-up steps made: no step plans
    assert '"plans_per_step": 0.0' in profile and '"suffix_buffer_moved": false' in profile

    # A later run of one workload replaces its rows and keeps the others.
    monkeypatch.setattr(be, "run_generate", real)
    assert be.main(["--scale", "tiny", "--out-dir", str(tmp_path), "--workloads", "doc-qa-4k"]) == 0
    with open(tmp_path / "generate_cpu_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["workload"], r["method"]): r["status"] for r in rows}["doc-qa-4k", be.STOCK] == "ok"
    assert len(rows) == len(got)

    # --methods re-runs only those methods and keeps the workload's other rows.
    assert be.main(["--scale", "tiny", "--out-dir", str(tmp_path), "--workloads", "tree", "--methods", be.EAGER,
                    "--commit", "again"]) == 0
    with open(tmp_path / "generate_cpu_tiny.csv") as f:
        rows = {(r["workload"], r["method"]): r["commit"] for r in csv.DictReader(f)}
    assert len(rows) == len(got) and rows["tree", be.EAGER] == "again" and rows["tree", be.STOCK] == "test"


def test_commit_is_only_read_from_our_own_checkout(tmp_path):
    """A copy of the code inside another repository (a GPU machine's carried folder) reports "unknown", not that
    repository's HEAD; our own checkout reports its HEAD."""
    import subprocess
    from pathlib import Path

    from flashforge_bench.harness import git_commit

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "copy").mkdir()
    assert git_commit(tmp_path / "copy") == "unknown"
    assert git_commit(tmp_path) == "unknown"  # a repository without commits
    ours = git_commit(Path(be.__file__).resolve().parents[1])
    assert ours == "unknown" or len(ours.split("+")[0]) == 40


def test_generate_batch_is_a_named_baseline(tmp_path, monkeypatch, capsys):
    """transformers' continuous batching (--methods generate-batch) at --scale tiny on the CPU: where the installed
    transformers has model.generate_batch (5.17 and 5.25 do, and run it on a CPU) a timed row without TTFT whose
    greedy tokens are stock's; else, and when it fails, a row that says why, printed once, the other methods
    run."""
    import transformers

    def rows():
        with open(tmp_path / "generate_cpu_tiny.csv") as f:
            return {(r["workload"], r["method"]): r for r in csv.DictReader(f)}

    assert be.GENERATE_BATCH not in be.METHODS and be.GENERATE_BATCH in be.build_parser().parse_args(
        ["--methods", be.GENERATE_BATCH]).methods
    argv = ["--scale", "tiny", "--out-dir", str(tmp_path), "--workloads", "doc-qa-4k", "--methods", be.STOCK,
            be.GENERATE_BATCH]
    assert be.main(argv) == 0
    r = rows()["doc-qa-4k", be.GENERATE_BATCH]
    if hasattr(transformers.GenerationMixin, "generate_batch"):
        assert r["status"] == "ok", r
        assert r["ttft_ms"] == "" and r["kv_gib"] == "" and float(r["tpot_ms"]) > 0 and float(r["total_s"]) > 0
        assert r["greedy_agree_generate_batch"] == "1.0", r  # every row's 8 new tokens are greedy stock's
    else:
        assert r["status"].startswith("not available: "), r

    def fails(self, *args, **kwargs):
        raise RuntimeError("continuous batching cannot run here (simulated)")

    monkeypatch.setattr(transformers.GenerationMixin, "generate_batch", fails)
    capsys.readouterr()
    assert be.main(argv) == 0
    got = rows()
    why = "not available: RuntimeError: continuous batching cannot run here (simulated)"
    assert got["doc-qa-4k", be.GENERATE_BATCH]["status"] == why and got["doc-qa-4k", be.STOCK]["status"] == "ok"
    assert got["doc-qa-4k", be.GENERATE_BATCH]["greedy_agree_generate_batch"] == ""
    assert capsys.readouterr().out.count(why) == 2  # once printed by measure, once in the row's line
