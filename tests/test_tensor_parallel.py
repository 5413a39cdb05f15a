"""Tensor parallel (DistributedConfig(tp_plan="auto")) with 2 CPU processes on the gloo backend: every rank gets
stock's tokens, from transformers' loop and from our static decode loop."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashforge_hf
from tiny_models import load, save_tiny, tree_batch


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


_VENV_TORCHRUN = Path(sys.executable).with_name("torchrun")
TORCHRUN = str(_VENV_TORCHRUN) if _VENV_TORCHRUN.exists() else shutil.which("torchrun")  # None: not installed
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
# The CPU runs hide any GPU: on a machine with GPUs, transformers' tensor parallelism would otherwise place each
# rank's model on cuda:<rank> (and fail on a machine with one GPU) while these tests feed CPU tensors.
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def run_two_ranks(tmp_path, backend: str) -> tuple[str, list[dict]]:
    """tests/tp_worker.py under torchrun with 2 processes on ``backend``: (model folder, each rank's result)."""
    folder = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "result"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(),
           str(Path(__file__).with_name("tp_worker.py")), folder, str(out), backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent,
                          env=CPU_ONLY if backend == "gloo" else None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder, [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


@needs_torchrun
def test_tensor_parallel_two_ranks(tmp_path):
    folder, ranks = run_two_ranks(tmp_path, "gloo")
    single = flashforge_hf.generate(load(folder, "flashforge"), *tree_batch(), min_shared_tokens=4, max_new_tokens=6,
                                    do_sample=False)
    for r in ranks:
        assert r["ours"] == r["plain"] == r["stock"] == single.tolist()
        assert r["plain_caches"] == 1  # plain model.generate took the FlashForge path on this rank
        assert r["kv_heads"] == 1  # each rank holds its own half of the 2 KV heads
        # the static loop stopped early (every row at its EOS) on the same step on both ranks, with stock's tokens
        assert r["ours_eos"] == r["plain_eos"] == r["stock_eos"] and len(r["stock_eos"][0]) < r["prompt_len"] + 12
    assert torch.equal(torch.tensor(ranks[0]["ours"]), torch.tensor(ranks[1]["ours"]))


@needs_torchrun
def test_multi_gpu_benchmark_pipeline_on_cpu(tmp_path):
    """benchmarks/multi_gpu.py end to end at a tiny scale on the CPU (gloo): one device, tensor parallel over 2
    processes, device_map (one device here), then the report; the logits checks pass and the fp32 greedy tokens
    of every run are the one-device run's."""
    script = str(Path(__file__).parents[1] / "benchmarks" / "multi_gpu.py")
    folder = save_tiny("llama", tmp_path / "model")
    small = ["--doc", "40", "--questions", "4", "--new-tokens", "3"]
    runs = {"single": [sys.executable, script], "device-map": [sys.executable, script],
            "tp": [TORCHRUN, "--nproc_per_node", "2", "--master_port", free_port(), script]}
    for mode, head in runs.items():
        proc = subprocess.run(head + [mode, folder, "--out", str(tmp_path / f"{mode}.json")] + small,
                              capture_output=True, text=True, timeout=600, env=CPU_ONLY)
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads((tmp_path / f"{mode}.json").read_text())
        assert result["logits_ok"] and len(result["greedy"]["ours"]) == len(result["greedy_fp32"]) == 4, result
        assert set(result["timings"]) == (set() if mode == "single" else {"reuse", "flashforge-eager"})
    results = {mode: json.loads((tmp_path / f"{mode}.json").read_text()) for mode in runs}
    assert results["tp"]["gpus"] == 2
    assert results["tp"]["greedy_fp32"] == results["device-map"]["greedy_fp32"] == results["single"]["greedy_fp32"]
    md = tmp_path / "r.md"
    subprocess.run([sys.executable, script, "report", *(str(tmp_path / f"{m}.json") for m in runs), "--md", str(md)],
                   check=True, capture_output=True, timeout=120)
    assert "| tp | CPU | 2 |" in md.read_text()
