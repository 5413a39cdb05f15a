"""flashforge_hf.projections.fused_qkv: one GEMM for q/k/v while the static decode runs, the model as before after."""

import pytest
import torch

from flashforge_hf.projections import _FusedPart, fused_qkv
from tiny_models import load, save_tiny


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "phi3"])
def family_model(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load(folder, "sdpa", torch.float32)


def test_fused_forward_equal_and_model_restored(family_model):
    """Inside the block: every attention layer with separate q/k/v (llama; qwen2 with biases; qwen3 with its q/k
    norms) runs one GEMM per input, the logits match the separate projections', the parameters are views of
    one buffer per layer (no extra memory). After it: the same modules, parameters with storages of their own,
    equal state_dict; phi3 (q/k/v already one qkv_proj) is left alone."""
    family, model = family_model
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits
    layers = model.config.num_hidden_layers
    with fused_qkv(model) as n:
        assert n == (0 if family == "phi3" else layers)
        calls = []
        handle = torch.nn.functional.linear
        with torch.no_grad():
            torch.nn.functional.linear = lambda *a, **k: (calls.append(id(a[1])), handle(*a, **k))[1]
            try:
                got = model(ids).logits
            finally:
                torch.nn.functional.linear = handle
        if n:
            attn = model.model.layers[0].self_attn
            assert isinstance(attn.q_proj, _FusedPart) and isinstance(attn.v_proj, _FusedPart)
            ptrs = [attn.q_proj.weight.untyped_storage().data_ptr(), attn.k_proj.weight.untyped_storage().data_ptr(),
                    attn.v_proj.weight.untyped_storage().data_ptr()]
            assert len(set(ptrs)) == 1, "q/k/v weights are not views of one buffer"
            fused = {id(layer.self_attn.q_proj.shared.weight) for layer in model.model.layers}
            assert sum(c in fused for c in calls) == layers, "not one q/k/v GEMM per layer"
            assert id(attn.k_proj.weight) not in calls, "a separate k projection ran"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    attn = model.model.layers[0].self_attn
    assert all(type(getattr(attn, p, torch.nn.Linear(1, 1))) is torch.nn.Linear for p in ("q_proj", "k_proj", "v_proj"))
    if family != "phi3":
        assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_layers_with_hooks_left_alone(tmp_path):
    """A projection with a forward hook (as tensor parallel and offloading install) keeps its layer unfused."""
    model = load(save_tiny("llama", tmp_path), "sdpa", torch.float32)
    seen = []
    model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with fused_qkv(model) as n:
        assert n == model.config.num_hidden_layers - 1
        assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
    assert len(seen) == 1
