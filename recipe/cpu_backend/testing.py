"""A random tiny Qwen2 causal LM for CPU rollout tests and benchmarks (nothing is downloaded).

It uses the project's byte-level tokenizer (`recipe.data.tiny_assets.build_tokenizer`). The trained,
warm-started tiny model for trainer runs is `recipe.data.tiny_assets.build_tiny_assets`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from recipe.data.tiny_assets import build_tokenizer, qwen2_model


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the random Qwen2 model; the defaults give ~95K parameters."""

    vocab_size: int = 259  # == the tokenizer's entries (see recipe.data.tiny_assets.TinyAssetsParams.vocab_size)
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    # HF's default 0.02 makes a random model repeat one token under greedy decoding; tests of the decode
    # path use ~0.2 so greedy outputs vary with the context (an attention bug then changes tokens).
    initializer_range: float = 0.02
    seed: int = 0


def build_tiny_model(out_dir: str, spec: TinyModelSpec = TinyModelSpec()) -> str:
    """Write tokenizer + random fp32 Qwen2ForCausalLM (tied embeddings) to ``out_dir``; return the path."""
    os.makedirs(out_dir, exist_ok=True)
    shape = {k: v for k, v in dataclasses.asdict(spec).items() if k != "seed"}
    qwen2_model(build_tokenizer(out_dir), seed=spec.seed, **shape).save_pretrained(out_dir)
    return out_dir
