"""flashforge generation on CUDA (the Triton kernels) against stock SDPA generation (run with TRITON_INTERPRET=0)."""

import os

import pytest
import torch

import flashforge_hf
from tiny_models import load, save_tiny, shared_prefix_batch, tree_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="run with TRITON_INTERPRET=0"),
]

# GPU-sized heads: (family, overrides) covering D 64/128, GQA 1/3/4 and MQA.
MODELS = {
    "llama_d128_gqa4": ("llama", dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128)),
    "qwen3_d64_gqa3": ("qwen3", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)),
    "mistral_d128_mha": ("mistral", dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=128)),
    "qwen2_d128_mqa": ("qwen2", dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=1)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def folder(request, tmp_path_factory):
    family, over = MODELS[request.param]
    return save_tiny(family, tmp_path_factory.mktemp(request.param), **over)


def test_greedy_fp32_matches_sdpa(folder):
    sdpa = load(folder, "sdpa").cuda()
    ff = load(folder, "flashforge").cuda()
    for ids, mask in (tree_batch(), shared_prefix_batch(batch=6, prefix=300)):
        ids, mask = ids.cuda(), mask.cuda()
        kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
        stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
        ours = flashforge_hf.generate(ff, ids, mask, min_shared_tokens=4, **kw)
        assert torch.equal(stock.sequences, ours.sequences)
        for a, b in zip(stock.logits, ours.logits):
            torch.testing.assert_close(b, a, atol=2e-3, rtol=0)


def _teacher_forced(model, ids, mask, forced, ours: bool):
    """Logits [steps, B, V] of each forced token's prediction, via decode steps (ours) or one full pass (stock)."""
    if not ours:
        full = torch.cat([ids, forced], 1)
        fmask = torch.cat([mask, torch.ones_like(forced)], 1)
        pos = (fmask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=full, attention_mask=fmask, position_ids=pos).logits.float()
        return logits[:, ids.shape[1] - 1 : -1].transpose(0, 1)
    cache, inputs = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=forced.shape[1], min_shared_tokens=4)
    kw = flashforge_hf.cache_kwarg(model)
    pos = mask.sum(-1, keepdim=True) - 1
    step_in = ids[:, -1:]
    out = []
    for j in range(forced.shape[1]):
        out.append(model(input_ids=step_in, position_ids=pos + j, use_cache=True, **{kw: cache}).logits[:, -1].float())
        step_in = forced[:, j : j + 1]
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_teacher_forced_logits_within_half_precision_tolerance(folder, dtype):
    """Our error against an fp32 reference is at most 2x stock SDPA's error in the same dtype."""
    ids, mask = tree_batch(seed=4)
    ids, mask = ids.cuda(), mask.cuda()
    forced = torch.randint(3, 90, (ids.shape[0], 10), device="cuda")
    with torch.no_grad():
        ref = _teacher_forced(load(folder, "sdpa").cuda(), ids, mask, forced, ours=False)
        stock = _teacher_forced(load(folder, "sdpa", dtype).cuda(), ids, mask, forced, ours=False)
        ours = _teacher_forced(load(folder, "flashforge", dtype).cuda(), ids, mask, forced, ours=True)
    err_stock = (stock - ref).norm() / ref.norm()
    err_ours = (ours - ref).norm() / ref.norm()
    assert err_ours <= 2 * err_stock + 1e-6, (err_ours.item(), err_stock.item())
