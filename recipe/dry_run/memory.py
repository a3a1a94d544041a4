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


# ---------------------------------------------------------------------------------------- Megatron actor
# Per GPU on the busiest pipeline stage. Sources: verl wraps the model with grad_reduce_in_fp32=True
# (verl/utils/megatron_utils.py:104); megatron-core's distributed optimizer shards the fp32 main params and Adam
# states over the data-parallel group with context parallelism (megatron/core/distributed/
# distributed_data_parallel.py:79-80, intra_dp_cp_group); 1F1B keeps PP micro-batches in flight on the first
# stage, interleaving (VPP) 1 + (PP-1)/(PP*VPP) times that (Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models", Sec. 4.2.3).

def megatron_params_per_gpu(num_params: int, vocab: int, hidden: int, tied: bool, tp: int, pp: int) -> float:
    """(P - E) / (TP*PP) + E_stage / TP, E = V*H (tied) or 2*V*H: an end stage holds one V*H table (PP > 1,
    Megatron keeps a tied copy on the last stage too) or all of E (PP 1)."""
    embeddings = vocab * hidden * (1 if tied else 2)
    on_end_stage = embeddings if pp == 1 else vocab * hidden
    return (num_params - embeddings) / (tp * pp) + on_end_stage / tp


def megatron_model_state_parts(params_per_gpu: float, dp_cp: int, distributed_optimizer: bool) -> tuple[float, float]:
    """(params + grads, optimizer): 2 B bf16 param + 4 B fp32 grad per local parameter, and 12 B (fp32 main
    param, Adam m, v) sharded over DP*CP by the distributed optimizer (not sharded without it)."""
    return (BF16 + 4) * params_per_gpu, 12 * params_per_gpu / (dp_cp if distributed_optimizer else 1)


def megatron_layers_in_flight(layers: int, pp: int, vpp: int) -> float:
    """L * (1 + (PP-1)/(PP*VPP)) with interleaving, else L: layers' worth of activations the first stage holds."""
    return layers * (1 + (pp - 1) / (pp * vpp)) if vpp > 1 else float(layers)


def megatron_activations(tokens: int, hidden: int, intermediate: int, layers: int, tp: int, pp: int, vpp: int,
                         recompute: str, recompute_num_layers: int = 1) -> float:
    """T = tokens per GPU (CP already split them), everything divided by TP (sequence parallel on).
    full: one checkpoint (the layer input) per recompute_num_layers layers in flight plus that many layers'
    working set; selective/none: every layer in flight keeps its working set (with flash attention the core
    attention that `selective` recomputes stores no s^2 scores, so this estimate does not separate the two)."""
    in_flight = megatron_layers_in_flight(layers, pp, vpp)
    if recompute == "full":
        checkpoints = math.ceil(in_flight / recompute_num_layers) * layer_checkpoint(tokens, hidden)
        return (checkpoints + recompute_num_layers * layer_working_set(tokens, hidden, intermediate)) / tp
    return in_flight * layer_working_set(tokens, hidden, intermediate) / tp


def megatron_logits(tokens: int, vocab: int, tp: int) -> float:
    """T * V/TP * (2 + 4 + 4) B on the last stage: vocab-parallel logits."""
    return logits(tokens, vocab) / tp
