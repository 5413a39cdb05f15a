"""Generation features through flashforge_hf.generate, each against stock generate on the same model weights."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import flashforge_hf
from tiny_models import VOCAB, load, save_tiny, shared_prefix_batch, tree_batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    return load(folder, "sdpa"), load(folder, "flashforge")


def _stock_and_ours(pair, entry, ids, mask, seed=None, **kw):
    sdpa, ff = pair
    if seed is not None:
        torch.manual_seed(seed)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    if seed is not None:
        torch.manual_seed(seed)
    ours = entry(ff, ids, mask, min_shared_tokens=4, **kw)
    return stock, ours


def test_sampling_seeded(pair, entry):
    ids, mask = tree_batch(seed=11)
    stock, ours = _stock_and_ours(pair, entry, ids, mask, seed=123, max_new_tokens=12, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(stock, ours)


def test_num_return_sequences_share_the_prompt(pair, entry):
    ids, mask = shared_prefix_batch(seed=2, batch=3)
    kw = dict(max_new_tokens=10, do_sample=True, num_return_sequences=4)
    stock, ours = _stock_and_ours(pair, entry, ids, mask, seed=7, **kw)
    assert ours.shape[0] == 12 and torch.equal(stock, ours)
    # The 4 copies of a prompt share every prompt token but the last: nothing of the prompt is stored per copy.
    cache, _ = flashforge_hf.prefill_shared(pair[1], ids, mask, num_copies=4, max_new_tokens=10)
    assert all(len(t) == 1 for t in cache.forest.suffix_tokens)


def test_beam_search(pair, entry):
    ids, mask = tree_batch(seed=12)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    stock, ours = _stock_and_ours(pair, entry, ids, mask, **kw)
    assert torch.equal(stock.sequences, ours.sequences)
    torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, atol=1e-4, rtol=0)


def test_eos_and_stop_strings(pair, entry):
    ids, mask = shared_prefix_batch(seed=4)
    free = pair[0].generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    eos = int(free[0, ids.shape[1] + 2])  # a token row 0 really generates: it must stop there
    stock, ours = _stock_and_ours(pair, entry, ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stock, ours) and (ours[0, ids.shape[1] + 3 :] == 0).all()

    tok = PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), unk_token=" ", pad_token=" ")
    stop = tok.decode(free[1, ids.shape[1] + 1 : ids.shape[1] + 3])
    kw = dict(max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=tok, pad_token_id=0)
    stock, ours = _stock_and_ours(pair, entry, ids, mask, **kw)
    assert torch.equal(stock, ours) and (ours[1, ids.shape[1] + 3 :] == 0).all()  # row 1 stopped on the string


def test_return_dict_scores_and_logits(pair, entry):
    ids, mask = tree_batch(seed=13)
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    stock, ours = _stock_and_ours(pair, entry, ids, mask, **kw)
    assert type(stock) is type(ours)
    assert torch.equal(stock.sequences, ours.sequences)
    for a, b in zip(stock.scores + stock.logits, ours.scores + ours.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_unsupported_generation_modes_raise(pair):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch()
    with pytest.raises(NotImplementedError, match="assistant_model"):
        flashforge_hf.generate(ff, ids, mask, max_new_tokens=2, assistant_model=sdpa)
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=4)
    for op, name in ((lambda: cache.crop(3), "crop"), (lambda: cache.batch_select_indices(torch.tensor([0])), "batch selection"),
                     (lambda: cache.batch_repeat_interleave(2), "batch_repeat_interleave")):
        with pytest.raises(NotImplementedError, match=name):
            op()


def test_explicit_path_with_copies_needs_matching_generate_setting(pair):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch(seed=9, batch=2)
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, num_copies=3, max_new_tokens=5)
    torch.manual_seed(0)
    ours = ff.generate(**inputs, **{flashforge_hf.cache_kwarg(ff): cache}, max_new_tokens=5, do_sample=True, num_return_sequences=3)
    torch.manual_seed(0)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, num_return_sequences=3)
    assert torch.equal(stock, ours)
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, num_copies=3, max_new_tokens=5)
    with pytest.raises(ValueError, match="num_return_sequences/num_beams"):
        ff.generate(**inputs, **{flashforge_hf.cache_kwarg(ff): cache}, max_new_tokens=5)


def _char_tokenizer():
    """One token per printable ASCII character (id = code - 32), so that stop strings can be matched."""
    t = Tokenizer(models.WordLevel(vocab={chr(32 + i): i for i in range(VOCAB)}, unk_token=" "))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t
