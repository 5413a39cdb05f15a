"""Bad input and unsupported features: a clear error before any work, never a silently wrong result."""

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig, Gemma2Config, GptOssConfig

import flashforge_hf
from flashforge_hf.attention import register
from flashforge_hf.generation import check_model
from tiny_models import load, save_tiny, shared_prefix_batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    return load(folder, "sdpa"), load(folder, "flashforge")


@pytest.fixture
def no_forward(pair):
    """Fails the test if the model runs a forward pass: errors must come before any work."""
    _, ff = pair
    h = ff.register_forward_pre_hook(lambda *a: pytest.fail("the model ran before the input was rejected"))
    yield
    h.remove()


def test_bad_inputs(pair, no_forward, entry):
    _, ff = pair
    ids, mask = shared_prefix_batch()
    cases = [
        (ids[:0], mask[:0], "Empty batch"),
        (ids, torch.cat([mask[:1] * 0, mask[1:]]), "all padding"),
        (ids, mask.flip(-1), "Padding must be on the left"),
        (ids, None, "no attention_mask"),
        (ids, mask[:, 1:], "shape"),
        (ids.float(), mask, "integer token ids"),
        (ids, mask * 2, "only 0 and 1"),
        (ids[0], mask[0], "2-D"),
        (ids.to("meta"), mask, "move them"),
    ]
    for i, m, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            entry(ff, i, m, max_new_tokens=2)
        with pytest.raises((ValueError, TypeError), match=msg):
            flashforge_hf.prefill_shared(ff, i, m)


def test_unsupported_dtype(tmp_path):
    ff = load(save_tiny("llama", tmp_path), "flashforge", dtype=torch.float64)
    ids, mask = shared_prefix_batch()
    with pytest.raises(TypeError, match="float64"):
        flashforge_hf.prefill_shared(ff, ids, mask)


def test_model_not_loaded_with_flashforge(pair):
    sdpa, _ = pair
    ids, mask = shared_prefix_batch()
    with pytest.raises(ValueError, match="attn_implementation='flashforge'"):
        flashforge_hf.generate(sdpa, ids, mask, max_new_tokens=2)


def test_prefix_sharing_cache_with_another_attention_raises(pair):
    sdpa, ff = pair
    ids, mask = shared_prefix_batch()
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="another attention implementation"):
        sdpa.generate(**inputs, **{flashforge_hf.cache_kwarg(sdpa): cache}, max_new_tokens=2)
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=2)
    ff.config._attn_implementation = "sdpa"  # switched after the cache was built
    try:
        with pytest.raises(ValueError, match="needs attn_implementation='flashforge'"):
            ff.generate(**inputs, **{flashforge_hf.cache_kwarg(ff): cache}, max_new_tokens=2)
    finally:
        ff.config._attn_implementation = "flashforge"


def test_cache_reused_with_another_model(pair, tmp_path):
    _, ff = pair
    other = load(save_tiny("llama", tmp_path, seed=1), "flashforge")
    ids, mask = shared_prefix_batch()
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="another model"):
        other.generate(**inputs, **{flashforge_hf.cache_kwarg(other): cache}, max_new_tokens=2)
    wider = load(save_tiny("qwen3", tmp_path / "q"), "flashforge")
    cache, inputs = flashforge_hf.prefill_shared(ff, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="another model"):
        wider.generate(**inputs, **{flashforge_hf.cache_kwarg(wider): cache}, max_new_tokens=2)


def test_sliding_window_served_only_inside_the_window(tmp_path, entry):
    """Inside the window both entries serve it; past it flashforge_hf.generate refuses (plain model.generate then
    runs stock: tests/test_generate_hook.py)."""
    ff = load(save_tiny("mistral", tmp_path, sliding_window=64), "flashforge")
    ids, mask = shared_prefix_batch(prefix=40)
    assert ids.shape[1] + 8 <= 64
    entry(ff, ids, mask, max_new_tokens=8)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        flashforge_hf.generate(ff, ids, mask, max_new_tokens=40)


@pytest.mark.parametrize(
    "config, feature",
    [
        (Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16), "soft-capping"),
        (FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, alibi=True), "ALiBi"),
        (GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, num_local_experts=2, num_experts_per_tok=1), "sinks"),
    ],
)
def test_refused_features_name_the_feature_and_the_alternative(config, feature):
    model = AutoModelForCausalLM.from_config(config)
    model.config._attn_implementation = "flashforge"
    with pytest.raises(NotImplementedError, match=f"(?s){feature}.*attn_implementation="):
        check_model(model)


@pytest.mark.parametrize("setting, what", [(dict(pp_size=2), "pipeline parallelism"), (dict(fsdp_size=2), "FSDP"),
                                           (dict(enable_sequence_parallel=True), "sequence parallelism")])
def test_other_parallelisms_are_refused_naming_the_alternative(pair, setting, what):
    """transformers' DistributedConfig modes other than tensor parallel (and device_map) are refused before any
    work, naming tp_plan='auto' (device_map over several GPUs runs: tests/gpu/test_multi_gpu.py)."""
    from types import SimpleNamespace

    _, ff = pair
    ff.config.distributed_config = SimpleNamespace(**setting)
    try:
        with pytest.raises(NotImplementedError, match=f"(?s){what}.*tp_plan='auto'"):
            flashforge_hf.generate(ff, *shared_prefix_batch(), max_new_tokens=2)
    finally:
        del ff.config.distributed_config


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    model.config._attn_implementation = "flashforge"
    with pytest.raises(NotImplementedError, match="not supported by flashforge"):
        check_model(model)


def test_registration_is_idempotent_and_only_renames_flashforge(tmp_path):
    from transformers import AttentionInterface
    from transformers.utils import generic

    register()
    register()
    pred = generic.is_flash_attention_requested
    assert not hasattr(pred.__wrapped__, "__wrapped__")  # wrapped once, not twice
    assert pred(requested_attention_implementation="flash_attention_2")
    assert not pred(requested_attention_implementation="flashforge")
    assert "flashforge" in AttentionInterface().valid_keys()
    load(save_tiny("llama", tmp_path), "flashforge")  # from_pretrained accepts the name after re-registration
