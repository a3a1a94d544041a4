"""Model architecture facts for the dry run, without weights or a tokenizer.

Where they come from, in order:
1. `actor_rollout_ref.model.path` is a local directory: its `config.json`;
2. a hub id with a shipped file `configs/models/<org>--<name>.json` (architecture facts only, so the
   dry run works offline; the run itself downloads the real model);
3. a hub id without a shipped file: `config.json` alone from the hub (`huggingface_hub.hf_hub_download`),
   only when `HF_HUB_OFFLINE` is not set. Tests never reach this branch.

The parameter count is taken from the real module shapes: transformers builds the model on the meta
device (no memory, no weights) and the shapes are summed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(frozen=True)
class ModelFacts:
    """What the checks and the plan need to know about the policy model."""

    source: str  # where the facts came from (file path or "hub:<id>")
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_params: int
    largest_layer_params: int  # one decoder layer (what FSDP gathers at a time)
    hf_config: object  # transformers.PretrainedConfig, for verl's FlopsCounter


def is_local_path(path: str) -> bool:
    """True for paths that can only mean a local directory (absolute, ~, ./, ../) or that exist here."""
    return path.startswith(("/", "~", "./", "../")) or Path(path).exists()


def shipped_config(model_id: str) -> Path:
    """configs/models/<org>--<name>.json for a hub id `org/name` (may not exist)."""
    return SHIPPED_DIR / (model_id.strip("/").replace("/", "--") + ".json")


def _config_file(model_path: str) -> Path:
    if is_local_path(model_path):
        path = Path(model_path).expanduser() / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"actor_rollout_ref.model.path={model_path}: no config.json in that directory")
        return path
    shipped = shipped_config(model_path)
    if shipped.is_file():
        return shipped
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise FileNotFoundError(
            f"actor_rollout_ref.model.path={model_path}: no shipped architecture file {shipped} and HF_HUB_OFFLINE is "
            "set; point the model path at a local directory with config.json or add that file"
        )
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_path, "config.json"))


def load_model_facts(model_path: str, override_config: dict | None = None) -> ModelFacts:
    """Architecture facts of `model_path` (see the module docstring for the lookup order)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _config_file(model_path)
    raw = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    raw.update({k: v for k, v in (override_config or {}).items() if k != "attn_implementation"})
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_params = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    root = SHIPPED_DIR.parents[1]
    return ModelFacts(
        source=str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
        model_type=model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        num_params=num_params,
        largest_layer_params=largest,
        hf_config=config,
    )
