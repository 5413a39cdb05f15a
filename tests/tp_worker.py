"""One rank of tests/test_tensor_parallel.py (run under torchrun): flashforge (flashforge_hf.generate and plain
model.generate) vs stock generation, tensor parallel.
``backend`` gloo: CPU processes; nccl: one GPU per rank (tests/gpu/test_multi_gpu.py)."""

import os

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig

import flashforge_hf
from flashforge_hf import graphs
from flashforge_hf.cache import PrefixSharingCache
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
        built = []  # plain model.generate (the generate hook) on every rank: the FlashForge path, one cache
        init = PrefixSharingCache.__init__
        PrefixSharingCache.__init__ = lambda self, *a, **k: (init(self, *a, **k), built.append(self))[0]
        try:
            plain = ff.generate(input_ids=ids, attention_mask=mask, min_shared_tokens=4, **gen)
        finally:
            PrefixSharingCache.__init__ = init
        stock = sdpa.generate(input_ids=ids, attention_mask=mask, **gen)
        cache, _ = flashforge_hf.prefill_shared(ff, ids, mask, min_shared_tokens=4)
        # Our static decode loop (CUDA graphs on CUDA, eager steps on the CPU) with every row ending early at its
        # own EOS: every rank must stop at the same step (each step holds collectives).
        L = ids.shape[1]
        eos = dict(eos_token_id=[int(stock[r, L + 1 + r % 3]) for r in range(ids.shape[0])], pad_token_id=0,
                   max_new_tokens=12, do_sample=False)
        stock_eos = sdpa.generate(input_ids=ids, attention_mask=mask, **eos)
        static, _ = flashforge_hf.prefill_shared(ff, ids, mask, min_shared_tokens=4, max_new_tokens=12)
        kw = dict(input_ids=ids, attention_mask=mask, **{flashforge_hf.cache_kwarg(ff): static}, **eos)
        ours_eos = ff.generate(**graphs.decode_kwargs(ff, kw, cuda_graph=backend == "nccl"))
        plain_eos = ff.generate(input_ids=ids, attention_mask=mask, min_shared_tokens=4, **eos)
        result = dict(rank=rank, ours=ours.tolist(), plain=plain.tolist(), plain_caches=len(built),
                      plain_eos=plain_eos.tolist(), stock=stock.tolist(), kv_heads=cache.layers[0].seg_k.shape[0],
                      ours_eos=ours_eos.tolist(), stock_eos=stock_eos.tolist(), prompt_len=L,
                      graphs=dict(graphs.last_stats))
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(result, f)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()  # without it, gloo aborts the process at exit


if __name__ == "__main__":
    main(*sys.argv[1:])
