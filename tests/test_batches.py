"""Many prompts behind one prefix: batches that fit memory, one prefill of each shared segment per run."""

import pytest
import torch

import flashforge_hf
import flashforge_hf.generation as ffg
from flashforge_hf.prefix_tree import build_forest
from tiny_models import load, save_tiny, shared_prefix_batch, tree_batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    return load(folder, "sdpa"), load(folder, "flashforge")


def _count_prefix_passes(model, prefix: torch.Tensor, run) -> int:
    seen = []
    h = model.get_input_embeddings().register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    try:
        result = run()
    finally:
        h.remove()
    n = len(prefix)
    hits = sum(int((row.unfold(0, n, 1) == prefix).all(-1).sum()) for batch in seen for row in batch if len(row) >= n)
    return hits, result


def test_many_batches_prefill_the_prefix_once(pair):
    sdpa, ff = pair
    B, P = 7, 48
    ids, mask = shared_prefix_batch(seed=21, batch=B, prefix=P)
    prefix = ids[-1, ids.shape[1] - len(ids[-1][mask[-1].bool()]) :][:P]
    kw = dict(max_new_tokens=6, do_sample=False)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    hits, ours = _count_prefix_passes(ff, prefix, lambda: flashforge_hf.generate(ff, ids, mask, batch_size=2, **kw))
    assert hits == 1  # 4 batches, one prefill of the shared prefix
    assert torch.equal(stock, ours)
    hits, _ = _count_prefix_passes(sdpa, prefix, lambda: sdpa.generate(input_ids=ids, attention_mask=mask, **kw))
    assert hits == B  # the count can fail: stock pushes the prefix through once per row


def test_batches_follow_free_memory(pair, monkeypatch):
    sdpa, ff = pair
    ids, mask = tree_batch(seed=22)
    calls = []
    real = ffg.prompts_per_batch

    def small_memory(model, forest, copies, max_new, device, **kw):
        n = real(model, forest, copies, max_new, device, free_bytes=10**9)
        calls.append(n)
        return 3

    monkeypatch.setattr(ffg, "prompts_per_batch", small_memory)
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    ours = flashforge_hf.generate(ff, ids, mask, min_shared_tokens=4, **kw)
    assert calls and torch.equal(sdpa.generate(input_ids=ids, attention_mask=mask, **kw), ours)
    with pytest.raises(NotImplementedError, match="return_dict_in_generate needs all 8 prompts in one batch"):
        flashforge_hf.generate(ff, ids, mask, return_dict_in_generate=True, **kw)


def test_memory_estimate_and_clear_error(pair):
    _, ff = pair
    ids, mask = shared_prefix_batch(seed=23, batch=4, prefix=64)
    forest = build_forest(ids, mask, copies=2)
    big = ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**9)
    small = ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**7)
    assert big > small >= 1
    with pytest.raises(MemoryError, match="Not even one prompt fits"):
        ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**5)
