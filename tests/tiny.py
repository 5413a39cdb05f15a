"""A tiny random Llama saved with a real (word-level) tokenizer and a chat template, for CLI and example tests.

The folder looks like any Hugging Face model folder, so every command that takes ``--model PATH`` can load it.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "the a an and or of to in on at for with is are was were be it this that he she they we you i his her their "
    "how many much what which who when where why does do did has have had there here after before each every more "
    "less than then so answer q a total left day days week weeks year years money dollars cost costs buy buys sold "
    "sell give gives get gets take takes make makes per half twice times plus minus equals number numbers "
    "question document tool tools call user assistant system json name arguments weather time search file true false"
    # transformers' stop-string matching (generate(stop_strings=...)) decodes every token after the word "abcdef"
    " abcdef"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A word-level fast tokenizer (words, digits and punctuation of the texts used in the tests; everything
    else is [UNK]) with BOS added to plain text and a chat template."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + list(string.digits) + list(string.punctuation))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_chat_model(folder, max_position_embeddings: int = 4096, seed: int = 0) -> str:
    """Save a tiny random Llama (2 layers, 4 query / 2 KV heads, head dim 16) and its tokenizer to ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(Path(folder))
