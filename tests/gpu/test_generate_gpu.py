"""flashforge generation on CUDA (the Triton kernels) against stock SDPA generation (run with TRITON_INTERPRET=0)."""

import os

import pytest
import torch

import flashforge_hf
from flashforge_bench.generate import teacher_forced
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


def test_plain_generate_is_flashforge_generate_on_cuda(folder):
    """Plain model.generate takes our path on CUDA (CUDA graphs by default): bit for bit flashforge_hf.generate's
    value, greedy and seeded sampling, in bf16."""
    from flashforge_hf import graphs

    ff = load(folder, "flashforge", dtype=torch.bfloat16).cuda()
    ids, mask = (t.cuda() for t in shared_prefix_batch(batch=6, prefix=300))
    for kw in (dict(max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True),
               dict(max_new_tokens=20, do_sample=True, top_k=20, return_dict_in_generate=True, output_logits=True)):
        torch.manual_seed(1)
        ours = flashforge_hf.generate(ff, ids, mask, **kw)
        torch.manual_seed(1)
        plain = ff.generate(input_ids=ids, attention_mask=mask, **kw)
        assert graphs.last_stats["graphs"]  # the plain call decoded from CUDA graphs too
        assert torch.equal(ours.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(ours.logits, plain.logits, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_teacher_forced_logits_within_half_precision_tolerance(folder, dtype):
    """Our error against an fp32 reference is at most 2x stock SDPA's error in the same dtype."""
    ids, mask = tree_batch(seed=4)
    ids, mask = ids.cuda(), mask.cuda()
    forced = torch.randint(3, 90, (ids.shape[0], 10), device="cuda")
    with torch.no_grad():
        ref = teacher_forced(load(folder, "sdpa").cuda(), ids, mask, forced, ours=False)
        stock = teacher_forced(load(folder, "sdpa", dtype).cuda(), ids, mask, forced, ours=False)
        ours = teacher_forced(load(folder, "flashforge", dtype).cuda(), ids, mask, forced, ours=True)
    err_stock = (stock - ref).norm() / ref.norm()
    err_ours = (ours - ref).norm() / ref.norm()
    assert err_ours <= 2 * err_stock + 1e-6, (err_ours.item(), err_stock.item())


@pytest.mark.parametrize("doc", [650, 4096])
def test_long_shared_document_teacher_forced(doc):
    """A shared document of 4k tokens (its decode plan splits it into 32 chunks where 33 were wanted) (8B head geometry: 32 query / 8 KV heads, head dim 128), four
    questions: fp32 logits equal sdpa's to fp32 rounding; bf16 error against fp32 at most 2x sdpa's."""
    folder = save_tiny("llama", f"/tmp/ff_long_{doc}", hidden_size=1024, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=32768)
    g = torch.Generator().manual_seed(doc)
    shared = torch.randint(3, 90, (doc,), generator=g)
    ids = torch.stack([torch.cat([shared, torch.randint(3, 90, (64,), generator=g)]) for _ in range(4)]).cuda()
    mask = torch.ones_like(ids)
    forced = torch.randint(3, 90, (4, 8), generator=g).cuda()
    with torch.no_grad():
        ref = teacher_forced(load(folder, "sdpa").cuda(), ids, mask, forced, ours=False)
        ours32 = teacher_forced(load(folder, "flashforge").cuda(), ids, mask, forced, ours=True)
        stock = teacher_forced(load(folder, "sdpa", torch.bfloat16).cuda(), ids, mask, forced, ours=False)
        ours = teacher_forced(load(folder, "flashforge", torch.bfloat16).cuda(), ids, mask, forced, ours=True)
    err32 = ((ours32 - ref).norm() / ref.norm()).item()
    err_stock = ((stock - ref).norm() / ref.norm()).item()
    err_ours = ((ours - ref).norm() / ref.norm()).item()
    print(f"doc {doc}: fp32 {err32:.3g}; bf16 ours {err_ours:.3g} stock {err_stock:.3g}")
    assert err32 < 1e-3, err32
    assert err_ours <= 2 * err_stock + 1e-6, (err_ours, err_stock)
