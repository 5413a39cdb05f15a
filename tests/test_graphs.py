"""The static decode loop of flashforge_hf.graphs on the CPU: the same steps a CUDA graph replays, run eagerly.

Each test compares against transformers' own loop (``_sample``) on the same PrefixSharingCache (whose one-token
steps take their bucket's plan too), over several plan buckets (MIN_BUCKET shrunk to 4 columns), so the device-side
end, the bucket plans, the deferred stop check, early-finished rows and the trimming are exercised without a GPU.
tests/gpu/ checks graph replay against these eager static steps on CUDA.
"""

import pytest
import torch
from transformers import (LogitsProcessor, LogitsProcessorList, MinLengthLogitsProcessor,
                          MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper)

import flashforge_hf
from flashforge_hf import dispatch
from flashforge_hf import generation, graphs, planner
from flashforge_hf.compat import output_cache_field
from tiny_models import load, save_tiny, tree_batch


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(save_tiny("qwen3", tmp_path_factory.mktemp("qwen3")), "flashforge")


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    monkeypatch.setattr(dispatch, "MIN_BUCKET", 4)


def _generate(model, ids, mask, ours: bool, seed=None, copies=1, **kw):
    """generate on a fresh prefilled cache: our static loop (ours) or transformers' eager loop."""
    cache, inputs = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=kw["max_new_tokens"],
                                                 num_copies=copies, min_shared_tokens=4)
    if seed is not None:
        torch.manual_seed(seed)
    extra = dict(custom_generate=graphs.decode, cuda_graph=False) if ours else {}
    out = model.generate(**inputs, **{flashforge_hf.cache_kwarg(model): cache}, **extra, **kw)
    return out, cache


def test_bucket_bounds(monkeypatch):
    monkeypatch.setattr(dispatch, "MIN_BUCKET", 256)
    bounds = [dispatch.bucket_bound(e, 1000) for e in (1, 256, 257, 512, 513, 999)]
    assert bounds == [256, 256, 512, 512, 1000, 1000]
    assert dispatch.bucket_bound(5, 100) == 100
    assert dispatch.bucket_bound(1001, 1000) == 1001  # past the capacity (an eager loop's grown buffers)


def _halves(num_rows, num_kv_heads, end, q_len, device, device_model=None):
    """Suffix plans of two splits whose boundary depends on the plan's bound: a step planned for another bound
    than the static step's merges other partials (fp32 logits differ in the last bits)."""
    return (-(-end // 2), 2) if end > 8 else (planner.ONE_SPLIT, 1)


def test_plan_key_holds_the_segment_waves(model, monkeypatch):
    """A captured graph replays in the next bucket only where that bucket's plan is the same: the key holds the
    segment waves that the bucket's suffix length picks (here one wave up to 16 columns, two past them)."""
    monkeypatch.setattr(planner.SegmentLoad, "best_waves", lambda self, suffix_cols=0: 1 if suffix_cols <= 16 else 2)
    ids, mask = tree_batch(seed=3)
    cache, inputs = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=8, min_shared_tokens=4)
    model(**inputs, **{flashforge_hf.cache_kwarg(model): cache})  # the suffixes' prefill
    model(input_ids=inputs["input_ids"][:, -1:], **{flashforge_hf.cache_kwarg(model): cache})  # one decode step
    key = cache.static_plan_key
    assert key(8) == key(16) != key(32) == key(64)
    assert key(8)[-1] == 1 and key(32)[-1] == 2


@pytest.mark.parametrize("splits", ["planner", "halves"])
def test_eager_loop_equals_static_loop_bitwise(model, monkeypatch, splits, entry):
    """flashforge_hf.generate with cuda_graph=False (transformers' loop) against our static loop: logits and tokens
    bit for bit over 40 steps and 3 buckets. transformers' one-token steps get the bucket's plan (one per bucket,
    made once: the planner runs once per bucket, not per step) and hand the token to the attention. With plans of
    two splits sized by the bound, planning the eager steps for their own end instead fails this."""
    if splits == "halves":
        monkeypatch.setattr(planner, "plan_suffix_splits", _halves)
        monkeypatch.setattr(dispatch, "plan_suffix_splits", _halves)
    planned = []
    real_plan_forward = dispatch.plan_forward
    monkeypatch.setattr(dispatch, "plan_forward", lambda *a: planned.append(a[3]) or real_plan_forward(*a))
    ids, mask = tree_batch(seed=3)
    kw = dict(max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=True, min_shared_tokens=4)
    eager = entry(model, ids, mask, cuda_graph=False, **kw)
    cache = getattr(eager, output_cache_field(type(eager)))
    bounds, planned[:] = list(planned), []
    assert bounds[1:] == [16, 32, cache.capacity], bounds  # the suffixes' prefill, then one plan per bucket
    monkeypatch.setattr(graphs, "decode_policy", lambda *a: dict(cuda_graph=True, compile=False))
    static = entry(model, ids, mask, **kw)
    assert planned == bounds
    assert torch.equal(eager.sequences, static.sequences)
    assert all(torch.equal(a, b) for a, b in zip(eager.logits, static.logits, strict=True))


def test_greedy_over_buckets_equals_eager_loop(model):
    ids, mask = tree_batch(seed=3)
    eager, _ = _generate(model, ids, mask, False, max_new_tokens=20, do_sample=False)
    ours, cache = _generate(model, ids, mask, True, max_new_tokens=20, do_sample=False)
    assert torch.equal(eager, ours)
    assert not cache.static and cache.cursor == cache.suffix_len + 20  # left static mode, cursor right
    assert graphs.last_stats["captures"] == 0 and not graphs.last_stats["graphs"]
    assert graphs.last_stats["fused_qkv_layers"] == model.config.num_hidden_layers  # one q/k/v GEMM per layer


def test_seeded_sampling_with_processors_equals_eager_loop(model):
    ids, mask = tree_batch(seed=4)
    kw = dict(max_new_tokens=14, do_sample=True, top_k=30, top_p=0.9, temperature=0.8, repetition_penalty=1.3,
              num_return_sequences=3)
    eager, _ = _generate(model, ids, mask, False, seed=5, copies=3, **kw)
    ours, _ = _generate(model, ids, mask, True, seed=5, copies=3, **kw)
    assert ours.shape[0] == 3 * ids.shape[0] and torch.equal(eager, ours)


@pytest.mark.parametrize("eos", [5, [7, -1, 3], [2, 10**6]], ids=["one", "with_negative", "out_of_vocab"])
def test_eos_floor_equals_transformers_min_length_processors(eos):
    """The in-place replacements give transformers' scores below, at and past the minimum length, and touch
    nothing else; other processors, subclasses of those two included, pass through unchanged."""
    class Sub(MinLengthLogitsProcessor):
        pass

    others = [TemperatureLogitsWarper(0.7), Sub(3, [1])]
    procs = [MinLengthLogitsProcessor(6, eos), MinNewTokensLengthLogitsProcessor(4, 3, eos), *others]
    lean = graphs.lean_processors(procs, 50, "cpu")
    assert [type(p) for p in lean[:2]] == [graphs.EosFloor, graphs.EosFloor] and list(lean[2:]) == others
    gen = torch.Generator().manual_seed(0)
    for length in range(3, 10):
        ids = torch.zeros(4, length, dtype=torch.long)
        for theirs, ours in zip(procs[:2], lean[:2]):
            scores = torch.randn(4, 50, generator=gen)
            want = theirs(ids, scores.clone())
            got = ours(ids, scores)
            assert got is scores and torch.equal(got, want), (length, type(theirs).__name__)


def test_min_new_tokens_hold_eos_back_as_in_eager_loop(model):
    """min_new_tokens (through the in-place processor) against transformers' loop, with EOS made the likeliest
    token so that the minimum decides where rows stop."""
    ids, mask = tree_batch(seed=10)
    eos = model.generation_config.eos_token_id

    class EosFirst(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + torch.nn.functional.one_hot(torch.tensor(eos), scores.shape[-1]) * 1e4

    outs = [_generate(model, ids, mask, ours, max_new_tokens=9, min_new_tokens=5, do_sample=False,
                      logits_processor=LogitsProcessorList([EosFirst()]))[0] for ours in (False, True)]
    assert torch.equal(outs[0], outs[1])
    assert outs[1].shape[1] == ids.shape[1] + 6  # EOS is held back for 5 tokens, then every row emits it
    assert (outs[1][:, ids.shape[1] + 5] == eos).all() and (outs[1][:, ids.shape[1]:ids.shape[1] + 5] != eos).all()


class ForceEos(LogitsProcessor):
    """Row r emits EOS at step ``at[r]`` and never before (None: never); records the cache's suffix starts seen
    at each step."""

    def __init__(self, at, eos, cache_box):
        self.at, self.eos, self.cache_box, self.seen, self.step = at, eos, cache_box, [], 0

    def __call__(self, input_ids, scores):
        cache = self.cache_box.get("cache")
        if cache is not None:
            self.seen.append(cache.suffix_start.clone())
        for r, k in enumerate(self.at):
            if k == self.step:
                scores[r] = -1e9
                scores[r, self.eos] = 0.0
            else:
                scores[r, self.eos] = -1e9
        self.step += 1
        return scores


@pytest.mark.parametrize("logits", [False, True], ids=["tokens", "with_logits"])
@pytest.mark.parametrize("at", [[2, None, 5, 0, 3, 1, 7, 4], [2, 6, 5, 0, 3, 1, 7, 4]], ids=["some_rows", "all_rows"])
def test_eos_rows_padded_stopped_and_skipped(model, at, logits):
    """Rows that emit EOS are padded as transformers pads them; when every row has finished the loop stops and
    the output is trimmed exactly where transformers' loop stops; finished rows' suffix starts move past the
    end (no suffix attention) and are restored afterwards, except when logits are returned (then finished rows'
    logits equal transformers')."""
    ids, mask = tree_batch(seed=6)
    eos = model.generation_config.eos_token_id
    out_kw = dict(return_dict_in_generate=True, output_logits=True) if logits else {}
    outs = []
    for ours in (False, True):
        box = {}
        proc = ForceEos(at, eos, box)
        cache, inputs = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=12, min_shared_tokens=4)
        box["cache"] = cache
        start0 = cache.suffix_start.clone()
        extra = dict(custom_generate=graphs.decode, cuda_graph=False) if ours else {}
        outs.append(model.generate(**inputs, **{flashforge_hf.cache_kwarg(model): cache}, max_new_tokens=12,
                                   do_sample=False, logits_processor=LogitsProcessorList([proc]), **extra, **out_kw))
        assert torch.equal(cache.suffix_start, start0)
        if ours:
            big = torch.iinfo(torch.int32).max
            for r, k in enumerate(at):  # seen[s] is read at step s, before that step's token
                for s, starts in enumerate(proc.seen):
                    assert (starts[r] == big) == (k is not None and s > k and not logits), (r, s)
    eager, ours = outs
    if logits:
        for a, b in zip(eager.logits, ours.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        eager, ours = eager.sequences, ours.sequences
    assert torch.equal(eager, ours)
    if None not in at:
        assert ours.shape[1] == ids.shape[1] + max(at) + 1  # stopped at the last row's EOS


def test_scores_and_logits_equal_eager_loop(model, monkeypatch):
    """Scores and logits of our decode loop equal transformers' eager loop; the output holds our cache under the
    field name of the installed transformers, without the deprecation warning 5.24 logs for ``past_key_values``."""
    from transformers.utils import generic

    ids, mask = tree_batch(seed=8)
    kw = dict(max_new_tokens=9, do_sample=False, return_dict_in_generate=True, output_scores=True,
              output_logits=True, temperature=None, top_k=None, top_p=None, repetition_penalty=1.5)
    eager, _ = _generate(model, ids, mask, False, **kw)
    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    ours, cache = _generate(model, ids, mask, True, **kw)
    assert not [m for m in said if "deprecated" in m], said
    assert torch.equal(eager.sequences, ours.sequences)
    assert len(ours.scores) == len(ours.logits) == 9 and getattr(ours, output_cache_field(type(ours))) is cache
    for a, b in zip(eager.scores + eager.logits, ours.scores + ours.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_errors_before_work(model, entry):
    ids, mask = tree_batch(seed=9)
    cache, inputs = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=4, min_shared_tokens=4)
    kw = {flashforge_hf.cache_kwarg(model): cache}
    with pytest.raises(ValueError, match="do not fit the cache's suffix buffers"):
        model.generate(**inputs, **kw, custom_generate=graphs.decode, cuda_graph=False, max_new_tokens=50,
                       do_sample=False)
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(**inputs, **kw, custom_generate=graphs.decode, cuda_graph=False, max_new_tokens=4,
                       num_beams=2, do_sample=False)
    assert not cache.static  # nothing was started
    with pytest.raises(NotImplementedError, match="cuda_graph=True cannot be served: the model is on cpu"):
        entry(model, ids, mask, max_new_tokens=4, cuda_graph=True)


def test_stop_strings_and_streamer_reach_the_loop():
    """transformers drops `tokenizer` and `streamer` for a custom_generate callable: decode_kwargs carries them
    (stop strings as a stopping criterion); rows stop on the string and the streamer sees every token."""
    from test_features import _char_tokenizer
    from transformers import PreTrainedTokenizerFast
    from tiny_models import Tape, shared_prefix_batch

    import tempfile

    m = load(save_tiny("llama", tempfile.mkdtemp()), "flashforge")
    ids, mask = shared_prefix_batch(seed=4, batch=1)
    free = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), unk_token=" ", pad_token=" ")
    stop = tok.decode(free[0, ids.shape[1] + 2 : ids.shape[1] + 4])
    outs, tapes = [], []
    for ours in (False, True):
        tape = Tape()
        cache, inputs = flashforge_hf.prefill_shared(m, ids, mask, max_new_tokens=8, min_shared_tokens=4)
        kw = dict(inputs, max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=tok, pad_token_id=0,
                  streamer=tape, **{flashforge_hf.cache_kwarg(m): cache})
        outs.append(m.generate(**(graphs.decode_kwargs(m, kw, cuda_graph=False) if ours else kw)))
        tapes.append(tape.parts)
    assert torch.equal(outs[0], outs[1]) and outs[1].shape[1] == ids.shape[1] + 4  # stopped on the string
    assert len(tapes[0]) == len(tapes[1]) == 1 + 4 + 1 and tapes[1][-1] == "end"
    assert all(torch.equal(a, b) for a, b in zip(tapes[0][:-1], tapes[1][:-1]))


def test_generate_routes_through_the_loop_across_batches(monkeypatch, entry):
    """flashforge_hf.generate with the graph policy on (forced here; on CUDA it is the default) runs every batch
    of a many-batch call through graphs.decode, stop strings included (the GSM8K example's setting), and equals
    stock generate."""
    import functools
    import tempfile

    from test_features import _char_tokenizer
    from transformers import PreTrainedTokenizerFast

    from flashforge_hf import generation
    from tiny_models import shared_prefix_batch

    folder = save_tiny("llama", tempfile.mkdtemp())
    sdpa, ff = load(folder, "sdpa"), load(folder, "flashforge")
    ids, mask = shared_prefix_batch(seed=4, batch=5)
    free = sdpa.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), unk_token=" ", pad_token=" ")
    stop = tok.decode(free[1, ids.shape[1] + 1 : ids.shape[1] + 3])
    kw = dict(max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=tok, pad_token_id=0)
    calls = []
    real = graphs.decode

    @functools.wraps(real)  # transformers reads the callable's signature
    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(graphs, "decode_policy", lambda *a: dict(cuda_graph=True, compile=False))
    monkeypatch.setattr(graphs, "decode", counted)
    ours = entry(ff, ids, mask, min_shared_tokens=4, batch_size=2, **kw)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(calls) == 3 and torch.equal(stock, ours)


def has_cxx() -> bool:
    """Whether torch.compile (inductor) can build CPU kernels here: it needs a C++ compiler."""
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not has_cxx(), reason="torch.compile (inductor) on CPU needs a C++ compiler")
def test_compiled_steps_equal_stock_and_compile_once(model, monkeypatch, entry):
    """compile=True runs our loop with the model's forward under torch.compile: the cache update and our attention
    stay outside the compiled graphs (torch.compiler.disable), the layers share one compilation (their index is
    not a constant), and a second call with other lengths compiles nothing new. fp32: same tokens as SDPA."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(dispatch, "MIN_BUCKET", 256)
    sdpa = load(model.name_or_path, "sdpa")
    torch._dynamo.reset()  # compile afresh for each entry point
    before = counters["stats"]["unique_graphs"]
    for seed, new in ((11, 10), (12, 17)):
        ids, mask = tree_batch(seed=seed)
        kw = dict(max_new_tokens=new, do_sample=False)
        stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
        ours = entry(model, ids, mask, min_shared_tokens=4, compile=True, **kw)
        assert torch.equal(stock, ours)
        assert graphs.last_stats["compiled"] and not graphs.last_stats["graphs"]
        assert graphs.last_stats["fused_qkv_layers"] == model.config.num_hidden_layers  # traced through the fusion
        if seed == 11:
            graphs_after_first = counters["stats"]["unique_graphs"]
            assert 0 < graphs_after_first - before <= 12  # per-layer code compiled once, not once per layer
    assert counters["stats"]["unique_graphs"] == graphs_after_first
    ids, mask = tree_batch(seed=13)  # batches of 3, 3 and 2 prompts: the compiled step meets a new batch size
    kw = dict(max_new_tokens=6, do_sample=False)
    stock = sdpa.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(stock, entry(model, ids, mask, min_shared_tokens=4, batch_size=3,
                                                     compile=True, **kw))
    with pytest.raises(NotImplementedError, match="compile=True cannot be served: beam search"):
        entry(model, ids, mask, max_new_tokens=4, num_beams=2, compile=True)
