"""End-to-end: flashforge generation equals stock sdpa + DynamicCache generation, on every supported family."""

import pytest
import torch

import flashforge_hf
from tiny_models import CONFIGS, load, save_tiny, shared_prefix_batch, tree_batch

FAMILIES = sorted(CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return load(folder, "sdpa"), load(folder, "flashforge")


def _greedy(model, ids, mask, **kw):
    return dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)


def _assert_same(stock, ours, atol=1e-4):
    assert torch.equal(stock.sequences, ours.sequences)
    assert len(stock.logits) == len(ours.logits)
    for a, b in zip(stock.logits, ours.logits):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


@pytest.mark.parametrize("batch", ["tree", "shared_prefix"])
def test_generate_matches_sdpa(pair, batch, entry):
    sdpa, ff = pair
    ids, mask = tree_batch() if batch == "tree" else shared_prefix_batch()
    kw = _greedy(sdpa, ids, mask)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    ours = entry(ff, ids, mask, min_shared_tokens=4, **kw)
    _assert_same(stock, ours)


def test_explicit_path_matches_sdpa(pair):
    sdpa, ff = pair
    ids, mask = tree_batch(seed=3)
    kw = _greedy(sdpa, ids, mask)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=8, min_shared_tokens=4)
    assert cache.forest.num_levels == 2 and len(cache.forest.seg_tokens) == 3
    ours = ff.generate(**inputs, **{flashforge_hf.cache_kwarg(ff): cache}, **kw)
    _assert_same(stock, ours)


def test_flashforge_with_dynamic_cache_is_sdpa(pair):
    """A model loaded with "flashforge" and given an ordinary DynamicCache generates exactly like sdpa."""
    sdpa, ff = pair
    ids, mask = tree_batch(seed=5)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(sdpa.generate(input_ids=ids, attention_mask=mask, **kw), ff.generate(input_ids=ids, attention_mask=mask, **kw))


def test_suffix_buffer_grows_when_max_new_tokens_unknown(pair):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch(seed=7)
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, min_shared_tokens=4)  # no max_new_tokens: grows
    kw = dict(max_new_tokens=70, min_new_tokens=70, do_sample=False)
    ours = ff.generate(**inputs, **{flashforge_hf.cache_kwarg(ff): cache}, **kw)
    assert torch.equal(sdpa.generate(input_ids=ids, attention_mask=mask, **kw), ours)
    assert cache.layers[0].suf_k.shape[2] >= 70 + cache.suffix_len
