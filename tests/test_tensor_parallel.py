"""Tensor parallel (tp_plan="auto") with 2 CPU processes on the gloo backend: every rank gets stock's tokens."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashforge_hf
from tiny_models import load, save_tiny, tree_batch


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not found")
def test_tensor_parallel_two_ranks(tmp_path):
    folder = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "result"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(__file__).with_name("tp_worker.py")), folder, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    single = flashforge_hf.generate(load(folder, "flashforge"), *tree_batch(), min_shared_tokens=4, max_new_tokens=6,
                                    do_sample=False)
    for r in ranks:
        assert r["ours"] == r["stock"] == single.tolist()
        assert r["kv_heads"] == 1  # each rank holds its own half of the 2 KV heads
    assert torch.equal(torch.tensor(ranks[0]["ours"]), torch.tensor(ranks[1]["ours"]))
