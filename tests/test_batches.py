"""Many prompts behind one prefix: batches that fit memory, one prefill of each shared segment per run."""

import pytest
import torch

import flashforge_hf
import flashforge_hf.generation as ffg
from flashforge_hf.models import layer_devices
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


def test_many_batches_prefill_the_prefix_once(pair, entry):
    sdpa, ff = pair
    B, P = 7, 48
    ids, mask = shared_prefix_batch(seed=21, batch=B, prefix=P)
    prefix = ids[-1, ids.shape[1] - len(ids[-1][mask[-1].bool()]) :][:P]
    kw = dict(max_new_tokens=6, do_sample=False)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    hits, ours = _count_prefix_passes(ff, prefix, lambda: entry(ff, ids, mask, batch_size=2, **kw))
    assert hits == 1  # 4 batches, one prefill of the shared prefix
    assert torch.equal(stock, ours)
    hits, _ = _count_prefix_passes(sdpa, prefix, lambda: sdpa.generate(input_ids=ids, attention_mask=mask, **kw))
    assert hits == B  # the count can fail: stock pushes the prefix through once per row


def test_batches_follow_free_memory(pair, monkeypatch, entry):
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
    ours = entry(ff, ids, mask, min_shared_tokens=4, **kw)
    assert calls and torch.equal(sdpa.generate(input_ids=ids, attention_mask=mask, **kw), ours)
    with pytest.raises(NotImplementedError, match="return_dict_in_generate needs all 8 prompts in one batch"):
        entry(ff, ids, mask, return_dict_in_generate=True, **kw)


def test_memory_estimate_and_clear_error(pair):
    _, ff = pair
    ids, mask = shared_prefix_batch(seed=23, batch=4, prefix=64)
    forest = build_forest(ids, mask, copies=2)
    big = ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**9)
    small = ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**7)
    assert big > small >= 1
    with pytest.raises(MemoryError, match="Not even one prompt fits"):
        ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**5)


def test_memory_estimate_per_device_under_device_map(pair, entry):
    """A model that device_map spread over two GPUs (its hf_device_map faked here) is sized on each GPU with that
    GPU's share of the layers' K/V (activations and logits counted on both): more prompts fit than on one device
    with the same free memory; compile=True (one device needed) is refused naming device_map."""
    _, ff = pair
    ids, mask = shared_prefix_batch(seed=23, batch=4, prefix=64)
    forest = build_forest(ids, mask, copies=2)
    n = ff.config.num_hidden_layers
    one = ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**7)
    ff.hf_device_map = {"model.embed_tokens": 0, **{f"model.layers.{i}": int(i >= n // 2) for i in range(n)},
                        "model.norm": 1, "lm_head": 1}
    try:
        assert layer_devices(ff) == {torch.device("cuda", 0): n // 2, torch.device("cuda", 1): n - n // 2}
        assert ffg.prompts_per_batch(ff, forest, 2, 100, "cpu", free_bytes=10**7) > one
        with pytest.raises(NotImplementedError, match="device_map"):
            entry(ff, ids, mask, compile=True, max_new_tokens=2)
    finally:
        del ff.hf_device_map
