"""Per-GPU memory formulas of the dry-run plan, in bytes (estimates, see plan.py for how they are printed).

Pure arithmetic on the standard library only, so benchmarks/gpu_check.py can load this file by path on a
GPU machine without verl, hydra or omegaconf and set each term next to a measured peak.
Symbols: P parameters, T tokens per GPU, H hidden size, I intermediate size, L layers, V vocabulary.
"""

from __future__ import annotations

import math

GIB = 1024**3
BF16 = 2
VLLM_OVERHEAD = 2 * GIB  # vLLM's own buffers besides weights and KV cache (I)


def fsdp_model_states(num_params: int, fsdp_group: int) -> float:
    """16 B * P / group: fp32 params, grads, Adam m and v, sharded over the FSDP group."""
    return 16 * num_params / fsdp_group


def megatron_model_states(num_params: int, model_parallel: int, gpus: int) -> float:
    """8 B * P / (TP*PP) + 8 B * P / GPUs: params and grads split by TP*PP, the distributed optimizer by all GPUs (I)."""
    return 8 * num_params / model_parallel + 8 * num_params / gpus


def gathered_layers(largest_layer_params: int) -> int:
    """2 layers * 2 B * params of the largest layer: FSDP holds the current and the prefetched layer unsharded."""
    return 2 * BF16 * largest_layer_params


def layer_checkpoint(tokens: int, hidden: int) -> int:
    """T * H * 2 B: the bf16 input a checkpointed layer keeps for its recomputation."""
    return tokens * hidden * BF16


def layer_working_set(tokens: int, hidden: int, intermediate: int) -> int:
    """T * (6H + 3I) * 2 B: what one layer's forward keeps for its backward (norms, q/k/v/o, attention out; MLP
    gate/up/act)."""
    return tokens * (6 * hidden + 3 * intermediate) * BF16


def activations(tokens: int, hidden: int, intermediate: int, layers: int, checkpointing: bool) -> int:
    """Checkpointing: L checkpoints plus one layer recomputed at a time; without it every layer's working set."""
    work = layer_working_set(tokens, hidden, intermediate)
    return layers * layer_checkpoint(tokens, hidden) + work if checkpointing else layers * work


def logits(tokens: int, vocab: int) -> int:
    """T * V * (2 + 4 + 4) B: bf16 logits, fp32 log-softmax and its gradient."""
    return tokens * vocab * (BF16 + 4 + 4)


def vllm_weights(num_params: int, tp: int) -> float:
    """2 B * P / TP."""
    return BF16 * num_params / tp


def kv_per_token(layers: int, kv_heads: int, head_dim: int, tp: int) -> int:
    """2 (K and V) * L * ceil(kv/TP) * head_dim * 2 B per token on one GPU."""
    return 2 * layers * math.ceil(kv_heads / tp) * head_dim * BF16


def kv_room(gpu_memory_utilization: float, gpu_bytes: float, weights: float) -> float:
    """gpu_memory_utilization * GPU - weights - 2 GiB (never below 0)."""
    return max(0.0, gpu_memory_utilization * gpu_bytes - weights - VLLM_OVERHEAD)
