"""flashforge_hf.projections.fused_projections: one GEMM for q/k/v and one for gate/up while the static decode
runs, the model as before after."""

import pytest
import torch

from flashforge_hf.projections import _FusedPart, fused_projections
from tiny_models import load, save_tiny


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "phi3"])
def family_model(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load(folder, "sdpa", torch.float32)


def test_fused_forward_equal_and_model_restored(family_model):
    """Inside the block: every attention layer with separate q/k/v (llama; qwen2 with biases; qwen3 with its q/k
    norms) and every MLP with separate gate/up runs one GEMM per group and input, the logits match the separate
    projections', the parameters are views of one buffer per group (no extra memory). After it: the same
    modules, parameters with storages of their own, equal state_dict; phi3 (qkv_proj and gate_up_proj already
    fused) is left alone."""
    family, model = family_model
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits
    layers = model.config.num_hidden_layers
    with fused_projections(model) as n:
        assert n == dict.fromkeys(("qkv", "gate_up"), 0 if family == "phi3" else layers)
        calls = []
        handle = torch.nn.functional.linear
        with torch.no_grad():
            torch.nn.functional.linear = lambda *a, **k: (calls.append(id(a[1])), handle(*a, **k))[1]
            try:
                got = model(ids).logits
            finally:
                torch.nn.functional.linear = handle
        if family != "phi3":
            attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
            assert isinstance(attn.q_proj, _FusedPart) and isinstance(attn.v_proj, _FusedPart)
            ptrs = [attn.q_proj.weight.untyped_storage().data_ptr(), attn.k_proj.weight.untyped_storage().data_ptr(),
                    attn.v_proj.weight.untyped_storage().data_ptr()]
            assert len(set(ptrs)) == 1, "q/k/v weights are not views of one buffer"
            assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
            for part in ("self_attn.q_proj", "mlp.gate_proj"):
                fused = {id(layer.get_submodule(part).shared.weight) for layer in model.model.layers}
                assert sum(c in fused for c in calls) == layers, f"not one {part} group GEMM per layer"
            assert not {id(attn.k_proj.weight), id(mlp.up_proj.weight)} & set(calls), "a separate projection ran"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert all(type(getattr(m, p, torch.nn.Linear(1, 1))) is torch.nn.Linear
               for m, p in [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (mlp, "gate_proj"), (mlp, "up_proj")])
    if family != "phi3":
        assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
        assert mlp.gate_proj.weight.untyped_storage().data_ptr() != mlp.up_proj.weight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_layers_with_hooks_left_alone(tmp_path):
    """A projection with a forward hook (as tensor parallel and offloading install) keeps its group unfused."""
    model = load(save_tiny("llama", tmp_path), "sdpa", torch.float32)
    seen = []
    model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: None)
    with fused_projections(model) as n:
        layers = model.config.num_hidden_layers
        assert n == {"qkv": layers - 1, "gate_up": layers - 1}
        assert type(model.model.layers[0].mlp.gate_proj) is torch.nn.Linear
        assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
    assert len(seen) == 1
