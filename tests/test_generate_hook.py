"""Plain ``model.generate`` on a "flashforge" model is the FlashForge path (flashforge_hf.generate_hook): the same
value as flashforge_hf.generate, the arguments tools send, the switch, what runs stock and says so once."""

import warnings

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

import flashforge_hf
from flashforge_hf import generate_hook
from flashforge_hf.cache import PrefixSharingCache
from tiny_models import Tape, load, save_tiny, shared_prefix_batch, tree_batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    return load(folder, "sdpa"), load(folder, "flashforge")


@pytest.fixture
def caches(monkeypatch):
    """The PrefixSharingCaches built while the test runs (each with its forest)."""
    built = []
    init = PrefixSharingCache.__init__

    def counting(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(PrefixSharingCache, "__init__", counting)
    return built


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch):
    monkeypatch.setattr(generate_hook, "_stock_said", set())


def _shared(cache) -> bool:
    return len(cache.forest.seg_tokens) > 0


def test_plain_generate_is_flashforge_generate(pair, caches):
    """Same value, bit for bit, as flashforge_hf.generate (one cache, its segments shared), and stock's tokens."""
    sdpa, ff = pair
    ids, mask = tree_batch(seed=1)
    kw = dict(max_new_tokens=7, do_sample=False, return_dict_in_generate=True, output_logits=True)
    plain = ff.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(caches) == 1 and _shared(caches[0])
    ours = flashforge_hf.generate(ff, ids, mask, **kw)
    assert len(caches) == 2  # flashforge_hf.generate's own model.generate call did not re-enter the hook
    assert torch.equal(plain.sequences, ours.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, ours.logits, strict=True))
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(stock.sequences, plain.sequences)
    assert ff.generate(ids, attention_mask=mask, max_new_tokens=3).shape == (ids.shape[0], ids.shape[1] + 3)  # positional


class StopAfter(StoppingCriteria):
    """Stops each row once it has ``n`` new tokens, row 0 one token earlier (a per-row criterion, as lm-eval's)."""

    def __init__(self, prompt_len: int, n: int):
        self.prompt_len, self.n = prompt_len, n

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt_len >= self.n, device=input_ids.device)
        done[0] |= input_ids.shape[1] - self.prompt_len >= self.n - 1
        return done


def _tool_arguments(ids):
    """(name, kwargs factory): the ways tools (lm-eval, pipeline, users' scripts) call generate."""
    L = ids.shape[1]
    return [
        ("max_length", lambda: dict(max_length=L + 6, do_sample=False)),
        ("stopping_criteria", lambda: dict(max_new_tokens=8, stopping_criteria=StoppingCriteriaList([StopAfter(L, 5)]),
                                          pad_token_id=0, do_sample=False)),
        ("generation_config", lambda: dict(generation_config=GenerationConfig(max_new_tokens=5, do_sample=False,
                                                                               pad_token_id=0, eos_token_id=2))),
        ("pad_token_id, use_cache", lambda: dict(max_new_tokens=5, pad_token_id=0, use_cache=True, do_sample=False)),
        ("return_dict_in_generate", lambda: dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                                output_scores=True)),
        ("lm-eval", lambda: dict(max_length=L + 6, stopping_criteria=StoppingCriteriaList([StopAfter(L, 4)]),
                                 pad_token_id=0, use_cache=True, do_sample=False)),
    ]


@pytest.mark.parametrize("case", range(len(_tool_arguments(torch.zeros(1, 1)))),
                         ids=[n for n, _ in _tool_arguments(torch.zeros(1, 1))])
def test_arguments_as_tools_send_them(pair, caches, case):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch(seed=30 + case)
    name, kwargs = _tool_arguments(ids)[case]
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kwargs())
    ours = ff.generate(input_ids=ids, attention_mask=mask, **kwargs())
    assert len(caches) == 1 and _shared(caches[0]), name
    if isinstance(stock, torch.Tensor):
        assert torch.equal(stock, ours), name
    else:
        assert type(stock) is type(ours) and torch.equal(stock.sequences, ours.sequences)
        for a, b in zip(stock.scores, ours.scores, strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_streamer(pair, caches):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch(seed=40, batch=1, prefix=24)
    tapes = []
    for model in (sdpa, ff):
        tapes.append(Tape())
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, streamer=tapes[-1])
    assert len(caches) == 1
    assert len(tapes[0].parts) == len(tapes[1].parts) == 1 + 5 + 1 and tapes[1].parts[-1] == "end"
    assert all(torch.equal(a, b) for a, b in zip(tapes[0].parts[:-1], tapes[1].parts[:-1]))


def test_switch_per_call_and_global(pair, caches, monkeypatch):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch(seed=41)
    kw = dict(max_new_tokens=4, do_sample=False)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switching off is silent
        assert torch.equal(ff.generate(input_ids=ids, attention_mask=mask, flashforge=False, **kw), stock)
        flashforge_hf.set_generate_hook(False)
        try:
            assert torch.equal(ff.generate(input_ids=ids, attention_mask=mask, **kw), stock)
            assert not caches
            ff.generate(input_ids=ids, attention_mask=mask, flashforge=True, **kw)  # per call beats global
            assert len(caches) == 1
        finally:
            flashforge_hf.set_generate_hook(True)
        monkeypatch.setenv("FLASHFORGE_HF_GENERATE", "0")
        ff.generate(input_ids=ids, attention_mask=mask, min_shared_tokens=4, **kw)  # FlashForge options dropped
        assert len(caches) == 1
        monkeypatch.delenv("FLASHFORGE_HF_GENERATE")
    ff.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(caches) == 2
    with pytest.raises(ValueError, match="attn_implementation='flashforge'"):
        sdpa.generate(input_ids=ids, attention_mask=mask, flashforge=True, **kw)


def _stock_cases(sdpa, ff, ids, mask):
    """(reason matched in the message, model, kwargs) of calls that run stock."""
    return [
        ("a cache of the caller's", ff, dict(past_key_values=DynamicCache(config=ff.config))),
        ("assisted generation", ff, dict(assistant_model=sdpa)),
        ("prompt lookup", ff, dict(prompt_lookup_num_tokens=2)),
        ("use_cache=False", ff, dict(use_cache=False)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_what_we_cannot_serve_runs_stock_saying_why_once(pair, caches, case):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch(seed=42, batch=1)  # batch 1: assisted generation needs it
    reason, model, extra = _stock_cases(sdpa, ff, ids, mask)[case]
    kw = dict(max_new_tokens=4, do_sample=False)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    for n_messages in (1, 0):  # the second call says nothing
        extra = _stock_cases(sdpa, ff, ids, mask)[case][2]  # a fresh cache each time
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
        ours = [str(w.message) for w in seen if "flashforge:" in str(w.message)]
        assert len(ours) == n_messages and all(reason in m for m in ours), ours
        assert torch.equal(out, stock)
    assert not caches
    with pytest.raises(NotImplementedError, match=reason):
        model.generate(input_ids=ids, attention_mask=mask, flashforge=True, **kw, **_stock_cases(sdpa, ff, ids, mask)[case][2])


def test_model_features_we_refuse_run_stock(tmp_path, caches):
    """A sliding-window model whose rows would pass the window runs stock (flashforge_hf.generate refuses it)."""
    folder = save_tiny("mistral", tmp_path, sliding_window=64)
    sdpa, ff = load(folder, "sdpa"), load(folder, "flashforge")
    ids, mask = shared_prefix_batch(prefix=40)
    kw = dict(max_new_tokens=40, do_sample=False)
    with pytest.warns(UserWarning, match="sliding-window"):
        out = ff.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not caches and torch.equal(out, sdpa.generate(input_ids=ids, attention_mask=mask, **kw))
    ff.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)  # inside the window: ours
    assert len(caches) == 1


def test_bad_input_raises_before_work(pair):
    _, ff = pair
    ids, mask = shared_prefix_batch()
    with pytest.raises(ValueError, match="Padding must be on the left"):
        ff.generate(input_ids=ids, attention_mask=mask.flip(-1), max_new_tokens=2)


def test_pipeline_shares_prefixes_within_each_batch(tmp_path, caches):
    """pipeline("text-generation", batch_size=4) on 8 few-shot prompts: one PrefixSharingCache per batch, its
    shared prefix stored once; the same texts as the sdpa pipeline."""
    from transformers import AutoTokenizer, pipeline

    from tiny import save_tiny_chat_model

    folder = save_tiny_chat_model(tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    prefix = "q how many days are there in a week ? a 7 . q how much money is left after each day ? a 3 dollars . "
    prompts = [prefix + f"q how many {w} are there ? a" for w in "days weeks years tools numbers dollars files times".split()]
    texts = []
    for attn in ("sdpa", "flashforge"):
        gen = pipeline("text-generation", model=load(folder, attn), tokenizer=tok, batch_size=4)
        out = gen(prompts, max_new_tokens=6, do_sample=False, return_full_text=False)
        texts.append([o[0]["generated_text"] for o in out])
    assert texts[0] == texts[1]
    assert len(caches) == 2 and all(c.num_rows == 4 and _shared(c) for c in caches)
