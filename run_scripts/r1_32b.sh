#!/usr/bin/env bash
# R1-Distill-Qwen-32B, BAPO vs GRPO, at 32k on 4 nodes or 64k on 8 nodes: a stand-in for the paper's
# BP-Math-32B main result (Table 1, 64k responses "to align with the SFT setting"; BP-Math weights are
# not public, and the paper reports no BAPO number for R1-Distill-Qwen-32B itself).
#
#   LENGTH=32k METHOD=bapo run_scripts/r1_32b.sh [-- hydra overrides]      # 4 x 8 GPUs
#   LENGTH=64k METHOD=grpo LAUNCH=ray_job run_scripts/r1_32b.sh            # 8 x 8 GPUs, as a Ray job
#   STRATEGY=megatron LENGTH=32k METHOD=bapo run_scripts/r1_32b.sh         # Megatron actor (layout below)
#   DRY_RUN=1 ... checks the config on a laptop; every other setting: run_scripts/lib/launch.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

MODEL="${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-32B}"  # paper Sec. 5.1 backbone
METHOD="${METHOD:-bapo}"
GPUS="${GPUS:-8}"
case "${LENGTH:-32k}" in
  # 1024 + 31744 = 32768 (the sweep's "32k"); sp 4 and TP 4: 40 heads and 8 KV heads split evenly;
  # Megatron: CP 2
  32k) NNODES="${NNODES:-4}"; RESPONSE_LENGTH=31744; SP=4; ROLLOUT_TP=4; CP=2; TOKENS_PER_GPU=16384 ;;
  # 1024 + 65536 (paper Sec. 5.1: 64k responses); sp 8 and TP 8; Megatron: CP 4, and 16896 tokens per GPU
  # so that CP * 16896 >= 66560 (one full sequence per micro-batch)
  64k) NNODES="${NNODES:-8}"; RESPONSE_LENGTH=65536; SP=8; ROLLOUT_TP=8; CP=4; TOKENS_PER_GPU=16896 ;;
  *) bapo_die "LENGTH=$LENGTH: valid: 32k, 64k" ;;
esac
bapo_method "$METHOD"
bapo_strategy fsdp2 megatron

case "$STRATEGY" in
  # DP = GPUs / sp = 8 at both sizes: 64 * 16 / 8 = 128 sequences per rank and update
  fsdp2) LAYOUT=(
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=$SP
    actor_rollout_ref.actor.fsdp_config.param_offload=True
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384
  ) ;;
  # TP 8 inside a node's NVLink domain (verl's 32B Megatron example, examples/tuning/32b/*megatron*: TP 8;
  # 40 heads and 8 KV heads split evenly), PP 1 (the 32B states fit without it, see the dry run's plan, and
  # PP would add pipeline bubbles), CP splits each long sequence (CP > 1 needs packed sequences,
  # model.use_remove_padding=True, verl's default). DP = GPUs / (TP*PP*CP) = 2 at both sizes.
  megatron) LAYOUT=(
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=8
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1
    actor_rollout_ref.actor.megatron.context_parallel_size=$CP
    actor_rollout_ref.actor.megatron.sequence_parallel=True
    # Adam states sharded over DP x CP (verl's default, stated so the plan's arithmetic has a source)
    actor_rollout_ref.actor.megatron.use_distributed_optimizer=True
    actor_rollout_ref.actor.megatron.param_offload=True
    actor_rollout_ref.actor.megatron.optimizer_offload=True
    # Megatron does not read model.enable_gradient_checkpointing: recompute every layer, as the FSDP runs do
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1
    # CP * tokens per GPU >= one full sequence (verl packs CP * this limit per micro-batch)
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$TOKENS_PER_GPU
  ) ;;
esac

RUN=(
  # staleness 8 = 2 * 256 / 64, as in the 7B runs (the paper does not state the main runs' staleness)
  actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.ppo_epochs=2
  "${LAYOUT[@]}"
  # logits are the largest term of the update: chunk the entropy
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=32768
  actor_rollout_ref.actor.entropy_from_logits_with_chunking=True
  actor_rollout_ref.rollout.gpu_memory_utilization=0.8
  actor_rollout_ref.rollout.max_model_len=$((1024 + RESPONSE_LENGTH))
  # 32B weights: bigger buckets for the actor -> vLLM weight sync (verl's 32B example)
  actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=4096
)
bapo_launch "r1-32b-${LENGTH:-32k}-$METHOD" "${RUN[@]}"
