import os

# The Triton kernels run on CPU tensors under Triton's interpreter; it must be on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


def _plain_generate(model, input_ids, attention_mask=None, **kwargs):
    """Plain ``model.generate``, called as tools call it (keywords), FlashForge's options included."""
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.fixture(params=["flashforge_hf.generate", "model.generate"])
def entry(request):
    """Both ways into the FlashForge path, with flashforge_hf.generate's signature: the function itself, and plain
    ``model.generate`` on a model loaded with attn_implementation="flashforge" (flashforge_hf.generate_hook)."""
    import flashforge_hf

    return flashforge_hf.generate if request.param == "flashforge_hf.generate" else _plain_generate
