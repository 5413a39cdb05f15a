"""Two GPUs: tensor parallel over NCCL (tp_plan="auto" under torchrun) on a tiny fp32 model: FlashForge gives
stock's tokens on every rank, each rank holding its own KV heads."""

import os

import pytest
import torch
from test_tensor_parallel import run_two_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="run with TRITON_INTERPRET=0"),
]


def test_tensor_parallel_nccl(tmp_path):
    _, ranks = run_two_ranks(tmp_path, "nccl")
    for r in ranks:
        assert r["ours"] == r["stock"] and r["kv_heads"] == 1  # each rank: its own half of the 2 KV heads
    assert ranks[0]["ours"] == ranks[1]["ours"]
