"""Tiny random models of each supported family, saved to a folder and loaded back as users would."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config
from transformers.generation.streamers import BaseStreamer

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# Head counts cover GQA ratios 1, 2, 3 (non-power of two) and 4, and MQA; head dims 16 to 64.
CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **COMMON),
    "mistral": lambda: MistralConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, **COMMON),
    "qwen2": lambda: Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, **COMMON),
    "qwen3": lambda: Qwen3Config(hidden_size=96, num_attention_heads=9, num_key_value_heads=3, head_dim=64, **COMMON),
    "phi3": lambda: Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, **COMMON),
}


def save_tiny(family: str, folder, seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return str(folder)


def load(folder, attn: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=dtype).eval()


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        mask[i, L - len(r):] = 1
    return ids, mask


def rand_tokens(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=gen)


def tree_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-level tree with ragged suffixes and left padding: a system prompt shared by most rows, two documents
    each shared by a subset, questions of different lengths, a row that repeats another, a row that is a
    prefix of another, and an unrelated row."""
    g = torch.Generator().manual_seed(seed)
    system, doc_a, doc_b = rand_tokens(24, g), rand_tokens(40, g), rand_tokens(33, g)
    q = [rand_tokens(n, g) for n in (5, 1, 12, 7, 3)]
    rows = [
        torch.cat([system, doc_a, q[0]]),
        torch.cat([system, doc_a, q[1]]),
        torch.cat([system, doc_a, q[2]]),
        torch.cat([system, doc_b, q[3]]),
        torch.cat([system, doc_b, q[4]]),
        torch.cat([system, doc_b, q[4]]),  # identical to the previous row
        torch.cat([system, doc_b]),  # a prefix of the rows above
        rand_tokens(9, g),  # shares nothing
    ]
    return left_pad(rows)


def shared_prefix_batch(seed: int = 1, batch: int = 4, prefix: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = rand_tokens(prefix, g)
    return left_pad([torch.cat([p, rand_tokens(3 + 2 * i, g)]) for i in range(batch)])


class Tape(BaseStreamer):
    """A streamer that records what generate streams: each ``put`` tensor,
    then "end"."""

    def __init__(self):
        self.parts = []

    def put(self, value):
        self.parts.append(value.clone())

    def end(self):
        self.parts.append("end")
