"""CUDA-graph decoding (flashforge_hf.graphs) on CUDA: graph replay against the same static steps run eagerly
(same kernels, same plans: identical output), across plan buckets; captures stay bounded (TRITON_INTERPRET=0)."""

import os

import pytest
import torch
from transformers import LogitsProcessorList

import flashforge_hf
from flashforge_hf import dispatch
from flashforge_hf import graphs, planner
from flashforge_hf.comparison import attention
from test_graphs import ForceEos
from tiny_models import load, save_tiny, shared_prefix_batch, tree_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="run with TRITON_INTERPRET=0"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama_graph"), hidden_size=1024, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=128)
    return load(folder, "flashforge", torch.bfloat16).cuda()


def _decode(model, ids, mask, graph: bool, seed=None, processors=(), logits=True, compile=False, **kw):
    cache, inputs = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=kw["max_new_tokens"],
                                                 num_copies=kw.get("num_return_sequences", 1), min_shared_tokens=4)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(**inputs, **{flashforge_hf.cache_kwarg(model): cache}, custom_generate=graphs.decode,
                         cuda_graph=graph, compile=compile, return_dict_in_generate=True, output_logits=logits,
                         logits_processor=LogitsProcessorList(list(processors)), **kw)
    return out, dict(graphs.last_stats)


def _split_every_16(num_rows, num_kv_heads, end, q_len, device, device_model=None):
    """A suffix plan that splits every 16 columns: every bucket of the bucket tests gets a plan of its own."""
    return (16, -(-end // 16)) if end > 16 else (planner.ONE_SPLIT, 1)


def _generate(model, ids, mask, cuda_graph, seed=None, **kw):
    """flashforge_hf.generate with logits: CUDA graphs (None, the default) or transformers' loop (False)."""
    if seed is not None:
        torch.manual_seed(seed)
    graphs.last_stats.clear()
    out = flashforge_hf.generate(model, ids, mask, min_shared_tokens=4, cuda_graph=cuda_graph, progress=False,
                                 return_dict_in_generate=True, output_logits=True, **kw)
    return out, dict(graphs.last_stats)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits) and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def _bucket_cases(monkeypatch, sample: bool, splits: str):
    """(ids, mask, generate kwargs) of the bucket tests: buckets from 16 columns up, the planner's plans or
    splits every 16 columns; a tree batch and a shared-prefix batch, 120 steps, greedy or seeded sampling."""
    monkeypatch.setattr(dispatch, "MIN_BUCKET", 16)
    if splits == "every_16":
        monkeypatch.setattr(planner, "plan_suffix_splits", _split_every_16)
        monkeypatch.setattr(dispatch, "plan_suffix_splits", _split_every_16)
    for ids, mask in (tree_batch(seed=1), shared_prefix_batch(batch=6, prefix=300)):
        kw = dict(max_new_tokens=120, do_sample=sample, min_new_tokens=120)
        if sample:
            kw.update(num_return_sequences=2, top_k=40, temperature=0.9)
        yield ids.cuda(), mask.cuda(), kw


@pytest.mark.parametrize("splits", ["planner", "every_16"])
@pytest.mark.parametrize("compile", [False, True], ids=["plain", "compiled"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_graph_replay_equals_eager_static_steps(model, monkeypatch, sample, compile, splits):
    """120 steps over buckets of 16, 32, 64, 128 columns (and the capacity): tokens and logits bitwise equal
    (compiled: graph replay of the compiled step against the same compiled step run eagerly). The planner does not
    split these suffixes (few rows, short suffixes), so one graph serves every bucket; with splits every 16
    columns each bucket's plan differs and is captured anew."""
    for ids, mask, kw in _bucket_cases(monkeypatch, sample, splits):
        eager, eager_stats = _decode(model, ids, mask, False, seed=3, compile=compile, **kw)
        graph, stats = _decode(model, ids, mask, True, seed=3, compile=compile, **kw)
        assert eager_stats["captures"] == 0 and stats["graphs"] and stats["compiled"] == compile
        if splits == "planner":
            assert stats["captures"] == 1, stats
        else:
            assert 3 <= stats["captures"] <= 6, stats
        _assert_same(eager, graph)


def test_graph_eos_rows_and_stop(model):
    """Rows finishing at different steps (their suffix attention skipped), the loop stopping once all have."""
    ids, mask = tree_batch(seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    at = [30, 2, 17, 0, 45, 9, 3, 28]
    eos = model.generation_config.eos_token_id
    outs = [_decode(model, ids, mask, graph, processors=[ForceEos(at, eos, {})], max_new_tokens=80,
                    do_sample=False, logits=False)[0] for graph in (False, True)]  # no logits: finished rows skipped
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[1].sequences.shape[1] == ids.shape[1] + max(at) + 1


def test_captures_bounded_and_equal_to_eager_transformers_loop(model):
    """600 steps of one row: buckets 256, 512 and the capacity, each with its own suffix splits (1, 2, 3): 3
    captures; transformers' own loop on the same cache (flashforge_hf.generate with cuda_graph=False: the
    bucket's plan at every step, q/k/v fused) gives the same tokens and logits, bit for bit."""
    ids, mask = shared_prefix_batch(batch=1, prefix=40)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=600, min_new_tokens=600, do_sample=False)
    graph, stats = _generate(model, ids, mask, None, **kw)
    assert stats["graphs"] and stats["captures"] == 3 and stats["graph_pool_bytes"] >= 0
    eager, eager_stats = _generate(model, ids, mask, False, **kw)
    assert eager_stats == {}  # transformers' loop ran
    _assert_same(eager, graph)


@pytest.mark.parametrize("splits", ["planner", "every_16"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_eager_transformers_loop_equals_graphs(model, monkeypatch, sample, splits):
    """flashforge_hf.generate with cuda_graph=False against the default (CUDA graphs), 120 steps over buckets of
    16 to 128 columns and the capacity, greedy and seeded sampling, with the planner's plans and with splits every
    16 columns (a plan per bucket): tokens and logits bit for bit."""
    for ids, mask, kw in _bucket_cases(monkeypatch, sample, splits):
        graph, stats = _generate(model, ids, mask, None, seed=3, **kw)
        eager, eager_stats = _generate(model, ids, mask, False, seed=3, **kw)
        assert stats["graphs"] and eager_stats == {}
        _assert_same(eager, graph)


def test_generate_uses_graphs_by_default_on_cuda(model):
    ids, mask = tree_batch(seed=5)
    ids, mask = ids.cuda(), mask.cuda()
    graphs.last_stats.clear()
    out = flashforge_hf.generate(model, ids, mask, max_new_tokens=8, do_sample=False, min_shared_tokens=4)
    assert graphs.last_stats.get("graphs") is True and out.shape[1] == ids.shape[1] + 8
    graphs.last_stats.clear()
    flashforge_hf.generate(model, ids, mask, max_new_tokens=8, do_sample=False, min_shared_tokens=4, cuda_graph=False)
    assert graphs.last_stats == {}  # transformers' eager loop


def _forced_logits(model, ids, mask, forced, compile):
    """Logits [rows, steps, V] of our static steps replayed from CUDA graphs, fed the tokens ``forced``."""
    cache, _ = flashforge_hf.prefill_shared(model, ids, mask, max_new_tokens=forced.shape[1], min_shared_tokens=4)
    runner = graphs.GraphDecoder(model, cache, mask.sum(-1) - 1, use_graph=True, compile=compile)
    out, tokens = [], ids[:, -1]
    try:
        for j in range(forced.shape[1]):
            out.append(runner.step(tokens).clone())
            tokens = forced[:, j]
    finally:
        runner.close()
    return torch.stack(out, 1)


def test_compiled_rounds_as_the_eager_model(model, monkeypatch):
    """compile=True compiles with graphs.INDUCTOR_CONFIG (fused kernels round each intermediate to bf16 where the
    eager ops store it): over 12 teacher-forced steps its logits lie closer to the uncompiled step's than those of
    inductor's default compilation (float32 kept between fused ops)."""
    ids, mask = tree_batch(seed=6)
    ids, mask = ids.cuda(), mask.cuda()
    g = torch.Generator().manual_seed(0)
    forced = torch.randint(3, model.config.vocab_size, (ids.shape[0], 12), generator=g).cuda()
    dist = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    plain = _forced_logits(model, ids, mask, forced, compile=False)
    torch._dynamo.reset()
    ours = dist(_forced_logits(model, ids, mask, forced, compile=True), plain)
    torch._dynamo.reset()
    monkeypatch.setattr(graphs, "INDUCTOR_CONFIG", {})
    inductor_default = dist(_forced_logits(model, ids, mask, forced, compile=True), plain)
    torch._dynamo.reset()
    assert ours < 0.7 * inductor_default, (ours, inductor_default)


def test_compiled_close_to_plain(model, tmp_path):
    """compile=True (fused non-attention work) against the plain graph step: the first step's logits within bf16
    rounding; on an fp32 model, greedy tokens equal to stock SDPA's over 40 steps."""
    ids, mask = tree_batch(seed=5)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=4, do_sample=False)
    plain, _ = _decode(model, ids, mask, True, **kw)
    fused, stats = _decode(model, ids, mask, True, compile=True, **kw)
    assert stats["compiled"]
    a, b = plain.logits[0].float(), fused.logits[0].float()
    assert float((a - b).norm() / a.norm()) < 2e-2
    fp32 = load(save_tiny("llama", tmp_path / "fp32", hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=64), "flashforge").cuda()
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    with torch.no_grad(), attention(fp32, "sdpa"):
        stock = fp32.generate(input_ids=ids, attention_mask=mask, **kw)
    ours = flashforge_hf.generate(fp32, ids, mask, min_shared_tokens=4, compile=True, **kw)
    assert torch.equal(stock, ours)
