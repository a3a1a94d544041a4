#!/usr/bin/env bash
# R1-Distill-Qwen-32B, BAPO vs GRPO, at 32k on 4 nodes or 64k on 8 nodes: a stand-in for the paper's
# BP-Math-32B main result (Table 1, 64k responses "to align with the SFT setting"; BP-Math weights are
# not public, and the paper reports no BAPO number for R1-Distill-Qwen-32B itself).
#
#   LENGTH=32k METHOD=bapo run_scripts/r1_32b.sh [-- hydra overrides]      # 4 x 8 GPUs
#   LENGTH=64k METHOD=grpo LAUNCH=ray_job run_scripts/r1_32b.sh            # 8 x 8 GPUs, as a Ray job
#   DRY_RUN=1 ... checks the config on a laptop; every other setting: run_scripts/lib/launch.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

MODEL="${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-32B}"  # paper Sec. 5.1 backbone
METHOD="${METHOD:-bapo}"
GPUS="${GPUS:-8}"
case "${LENGTH:-32k}" in
  # 1024 + 31744 = 32768 (the sweep's "32k"); sp 4 and TP 4: 40 heads and 8 KV heads split evenly
  32k) NNODES="${NNODES:-4}"; RESPONSE_LENGTH=31744; SP=4; ROLLOUT_TP=4 ;;
  # 1024 + 65536 (paper Sec. 5.1: 64k responses); sp 8 and TP 8
  64k) NNODES="${NNODES:-8}"; RESPONSE_LENGTH=65536; SP=8; ROLLOUT_TP=8 ;;
  *) bapo_die "LENGTH=$LENGTH: valid: 32k, 64k" ;;
esac
bapo_method "$METHOD"

RUN=(
  # staleness 8 = 2 * 256 / 64, as in the 7B runs (the paper does not state the main runs' staleness)
  actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.ppo_epochs=2
  # DP = GPUs / sp = 8 at both sizes: 64 * 16 / 8 = 128 sequences per rank and update
  actor_rollout_ref.actor.ulysses_sequence_parallel_size=$SP
  actor_rollout_ref.actor.fsdp_config.param_offload=True
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
  # 16k tokens per GPU (x sp >= one full sequence); logits are the largest term, chunk the entropy
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=32768
  actor_rollout_ref.actor.entropy_from_logits_with_chunking=True
  actor_rollout_ref.rollout.gpu_memory_utilization=0.8
  actor_rollout_ref.rollout.max_model_len=$((1024 + RESPONSE_LENGTH))
  # 32B weights: bigger buckets for the actor -> vLLM weight sync (verl's 32B example)
  actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=4096
)
bapo_launch "r1-32b-${LENGTH:-32k}-$METHOD" "${RUN[@]}"
