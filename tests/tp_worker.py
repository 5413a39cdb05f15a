"""One rank of tests/test_tensor_parallel.py (run under torchrun): flashforge vs stock generation, tensor parallel.
``backend`` gloo: CPU processes; nccl: one GPU per rank (tests/gpu/test_multi_gpu.py)."""

import os

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig

import flashforge_hf
from tiny_models import tree_batch


def main(folder: str, out_file: str, backend: str = "gloo") -> None:
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        rank = dist.get_rank()
        kw = dict(attn_implementation="flashforge", dtype=torch.float32,
                  distributed_config=DistributedConfig(tp_plan="auto"))
        ff = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
        sdpa = AutoModelForCausalLM.from_pretrained(folder, **{**kw, "attn_implementation": "sdpa"}).eval()
        ids, mask = (t.to(device) for t in tree_batch())
        gen = dict(max_new_tokens=6, do_sample=False)
        ours = flashforge_hf.generate(ff, ids, mask, min_shared_tokens=4, **gen)
        stock = sdpa.generate(input_ids=ids, attention_mask=mask, **gen)
        cache, _ = flashforge_hf.prefill_shared(ff, ids, mask, min_shared_tokens=4)
        result = dict(rank=rank, ours=ours.tolist(), stock=stock.tolist(), kv_heads=cache.layers[0].seg_k.shape[0])
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(result, f)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()  # without it, gloo aborts the process at exit


if __name__ == "__main__":
    main(*sys.argv[1:])
