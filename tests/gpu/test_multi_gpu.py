"""Two GPUs: tensor parallel over NCCL (DistributedConfig(tp_plan="auto") under torchrun; decode steps replayed
from CUDA graphs) and device_map over both GPUs in one process, on tiny fp32 models: FlashForge gives stock's
tokens through both entry points (the tensor-parallel workers call plain model.generate and
flashforge_hf.generate); each layer's storage stays on its layer's GPU."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import flashforge_hf
from flashforge_hf import graphs
from flashforge_hf.comparison import attention
from flashforge_hf.models import layer_devices
from test_tensor_parallel import run_two_ranks
from tiny_models import save_tiny, tree_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="run with TRITON_INTERPRET=0"),
]


def test_tensor_parallel_nccl(tmp_path):
    _, ranks = run_two_ranks(tmp_path, "nccl")
    for r in ranks:
        assert r["ours"] == r["stock"] and r["kv_heads"] == 1  # each rank: its own half of the 2 KV heads
        # CUDA graphs holding NCCL collectives, every row ending early: both ranks stop on the same step
        assert r["ours_eos"] == r["stock_eos"] and r["graphs"]["graphs"] and r["graphs"]["captures"] >= 1
    assert ranks[0]["ours"] == ranks[1]["ours"]


def test_device_map_over_two_gpus(tmp_path, entry, monkeypatch):
    """Through both entry points (flashforge_hf.generate and plain model.generate on the "flashforge" model)."""
    monkeypatch.setattr(graphs, "_fallback_warned", set())  # the eager-loop fallback is said once per process
    folder = save_tiny("llama", tmp_path / "model", num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="flashforge", dtype=torch.float32,
                                                 device_map="balanced").eval()
    assert len(layer_devices(model)) == 2, model.hf_device_map
    ids, mask = (t.to(model.device) for t in tree_batch())
    kw = dict(max_new_tokens=12, do_sample=False)
    with pytest.warns(UserWarning, match="device_map"):
        ours = entry(model, ids, mask, min_shared_tokens=4, **kw)
    with torch.no_grad(), attention(model, "sdpa"):
        stock = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ours, stock)
    cache, _ = flashforge_hf.prefill_shared(model, ids, mask, min_shared_tokens=4, max_new_tokens=4)
    devices = [layer.seg_k.device for layer in cache.layers]
    assert len(set(devices)) == 2 and all(layer.suf_k.device == d for layer, d in zip(cache.layers, devices))
    with pytest.raises(NotImplementedError, match="several devices"):
        entry(model, ids, mask, min_shared_tokens=4, cuda_graph=True, **kw)
