"""The cache really shares: what it stores, what passes through the model, what decode allocates."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashforge_hf
from tiny_models import load, save_tiny, shared_prefix_batch, tree_batch
from flashforge_hf.prefix_tree import build_forest


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    return load(folder, "sdpa"), load(folder, "flashforge")


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_decode_never_materialises_batch_times_prefix(pair):
    sdpa, ff = pair
    B, P = 8, 96
    ids, mask = shared_prefix_batch(seed=3, batch=B, prefix=P)
    cfg = ff.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    limit = B * P * hkv * d
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=6, min_shared_tokens=8)
    with LargestAllocation() as ours:
        ff.generate(**inputs, **{flashforge_hf.cache_kwarg(ff): cache}, max_new_tokens=6, do_sample=False)
    with LargestAllocation() as stock:  # the check can fail: stock decode does materialise per-row KV
        sdpa.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert stock.largest >= limit
    assert ours.largest < limit


def test_each_shared_segment_goes_through_the_model_once(pair, entry):
    _, ff = pair
    ids, mask = tree_batch(seed=8)
    forest = build_forest(ids, mask, min_shared_tokens=4)
    seen = []
    hook = ff.get_input_embeddings().register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    try:
        entry(ff, ids, mask, max_new_tokens=3, do_sample=False, min_shared_tokens=4)
    finally:
        hook.remove()
    for seg in forest.seg_tokens:
        seg = torch.tensor(seg)
        hits = sum(int((row.unfold(0, len(seg), 1) == seg).all(-1).sum()) for batch in seen for row in batch if len(row) >= len(seg))
        assert hits == 1, f"segment of {len(seg)} tokens went through the model {hits} times"
    # Stock generate would push the shared system prompt through once per row.
    assert len(forest.seg_tokens) == 3 and min(map(len, forest.seg_tokens)) >= 24


def test_cache_memory_is_unique_segments_plus_suffix_buffers(pair):
    _, ff = pair
    B, P, new = 8, 96, 5
    ids, mask = shared_prefix_batch(seed=3, batch=B, prefix=P)
    cache, _ = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=new, min_shared_tokens=8)
    cfg = ff.config
    hkv, d, layers = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    seg_tokens = sum(map(len, cache.forest.seg_tokens))
    assert seg_tokens == P  # the prefix is stored once
    per_token = 2 * hkv * d * 4 * layers  # K and V, float32
    expected = per_token * (seg_tokens + B * (cache.suffix_len + 1 + new))
    assert cache.nbytes() == expected
    stock = per_token * B * (ids.shape[1] + new)
    assert cache.nbytes() < 0.5 * stock


def test_forest_structure():
    ids, mask = tree_batch()
    f = build_forest(ids, mask, min_shared_tokens=4)
    assert f.seg_level == (0, 1, 1) and f.seg_parent == (-1, 0, 0)
    # doc_b's segment stops one token short: row 6 ends with doc_b, and its last token stays in its suffix.
    lens = [len(t) for t in f.seg_tokens]
    assert lens[0] == 24 and sorted(lens[1:]) == [32, 40]
    assert [lens[s] for s in f.paths[0]] == [24, 40] and [lens[s] for s in f.paths[3]] == [24, 32]
    assert f.paths[0] == f.paths[1] == f.paths[2] and f.paths[3] == f.paths[6] and f.paths[7] == ()
    assert f.suffix_tokens[6] == (int(ids[6, -1]),)  # a row that is a prefix of others keeps its last token
    # Every row's path plus suffix is its prompt.
    for r in range(f.num_rows):
        toks = [t for s in f.paths[r] for t in f.seg_tokens[s]] + list(f.suffix_tokens[r])
        assert toks == ids[r][mask[r].bool()].tolist()
    # Shared runs shorter than min_shared_tokens are pushed down into the segments below them.
    g = build_forest(ids, mask, min_shared_tokens=30)
    assert sorted(len(t) for t in g.seg_tokens) == [56, 64] and g.num_levels == 1


def test_pad_id_that_is_a_real_token_is_not_padding(pair, entry):
    """Padding comes from attention_mask only: a row may start with the pad id as a real token."""
    sdpa, ff = pair
    ids, mask = shared_prefix_batch(seed=5, batch=3)
    ids[:, ids.shape[1] - 20] = 0  # pad id inside the shared prefix, as a real token
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(sdpa.generate(input_ids=ids, attention_mask=mask, **kw), entry(ff, ids, mask, **kw))


def test_cache_is_freed_without_the_garbage_collector(tmp_path):
    """No reference cycle: a finished cache is freed as soon as the last reference goes (GPU memory with it)."""
    import gc
    import weakref

    from tiny_models import load, save_tiny, tree_batch

    model = load(save_tiny("llama", tmp_path), "flashforge")
    ids, mask = tree_batch(seed=1)
    cache, inputs = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=3, min_shared_tokens=4)
    model.generate(**inputs, **{flashforge_hf.cache_kwarg(model): cache}, max_new_tokens=3, do_sample=False)
    ref = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert ref() is None
    finally:
        gc.enable()
