#!/usr/bin/env bash
# R1-Distill-Qwen-7B, 8k responses, staleness 8: BAPO and the fixed-clip baselines of the paper's
# preliminary runs (Fig. 2 GRPO under staleness, Fig. 7 asymmetric clips, Figs. 8-9 BAPO vs baseline).
#
#   METHOD=bapo run_scripts/r1_7b_8k_staleness8.sh [-- hydra overrides]
#   METHOD: bapo (paper preset) | grpo ([0.8, 1.2]) | clip_higher ([0.8, 1.28]) | clip_0.8_1.5 | clip_0.5_1.2
#   DRY_RUN=1 ... checks the config on a laptop; every other setting: run_scripts/lib/launch.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

MODEL="${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}"   # paper Sec. 5.1 backbone
NNODES="${NNODES:-1}"; GPUS="${GPUS:-8}"                    # ours: one 8-GPU node
METHOD="${METHOD:-bapo}"
RESPONSE_LENGTH=8192                                        # paper Sec. 5.1: 8k for the preliminary runs
ROLLOUT_TP=1                                                # 7B fits one GPU in bf16
bapo_method "$METHOD"

RUN=(
  # staleness 8 = ppo_epochs * train_batch_size / ppo_mini_batch_size = 2 * 256 / 64 (authors' script
  # l.16-18, 30; the paper does not state Fig. 7-9's staleness, we take its 8x)
  actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.ppo_epochs=2
  # token limits per GPU: 2x (prompt + response) for the update, 3x for the no-grad log-prob pass
  # (verl-recipe DAPO scripts' pattern); no sequence parallelism, no offload at 8k
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=27648
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
)
bapo_launch "r1-7b-8k-s8-$METHOD" "${RUN[@]}"
