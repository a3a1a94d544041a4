"""The tiny model: a byte-level Qwen2 tokenizer with the ChatML specials, and a randomly initialised Qwen2
causal LM for it. See the package docstring."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .task import derive_seed

if TYPE_CHECKING:
    from .cache import TinyAssetsParams

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
START_TOKEN = "<|im_start|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(save_dir: str | os.PathLike | None = None, model_max_length: int = 512):
    """Byte-level Qwen2Tokenizer: 256 byte tokens (no merges) + ChatML specials and chat template."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(
        vocab={s: i for i, s in enumerate(symbols)},
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    tok.add_special_tokens({"additional_special_tokens": [START_TOKEN]})
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = model_max_length
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def _token_ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list before."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def chat_prompt_ids(tok, content: str) -> list[int]:
    """Token ids of one user message + generation prompt, exactly as verl's agent loop builds them."""
    messages = [{"role": "user", "content": content}]
    return _token_ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def qwen2_model(tok, *, seed: int, vocab_size: int, hidden_size: int, intermediate_size: int,
                num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                max_position_embeddings: int, initializer_range: float = 0.02):
    """A randomly initialised fp32 Qwen2ForCausalLM (tied embeddings, sdpa) for the byte-level tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if len(tok) != vocab_size:  # see TinyAssetsParams.vocab_size
        raise ValueError(f"vocab_size={vocab_size} must equal the tokenizer size {len(tok)}")
    eos_id, pad_id = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    return model


def build_model(params: TinyAssetsParams, tok):
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")
    return qwen2_model(tok, seed=derive_seed(params.seed, "init"), **{k: getattr(params, k) for k in shape})
