#!/usr/bin/env bash
# The authors' released example script (github.com/WooooDyy/BAPO, recipe/bapo/run_bapo_example.sh, for an
# older verl) on verl 0.9.1: their loss (preset bapo_authors_code) and their settings where they differ from
# the paper's (lr 1e-6, temperature 1.0, 1000 steps, micro-batch 4/GPU, offload, validation n=1 at T 1.0 on
# AIME25). Their MODEL_PATH is empty; ours defaults to R1-Distill-Qwen-7B.
#
#   run_scripts/authors_example.sh [-- hydra overrides]
#   DRY_RUN=1 ... checks the config on a laptop; every other setting: run_scripts/lib/launch.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

MODEL="${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}"
NNODES="${NNODES:-1}"; GPUS="${GPUS:-8}"                    # their l.115-116
RESPONSE_LENGTH=8192                                        # their l.15
ROLLOUT_TP=1                                                # their l.50
VAL_FILES="${VAL_FILES:-$(bapo_abs "${DATA:-$BAPO_ROOT/data}")/aime2025.parquet}"   # their l.98-101: AIME25
STEPS="${STEPS:-1000}"                                      # their l.119
bapo_method bapo_authors_code

RUN=(
  actor_rollout_ref.actor.ppo_mini_batch_size=64            # their l.17; staleness 8 = 2 * 256 / 64 (l.30)
  actor_rollout_ref.actor.ppo_epochs=2                      # their l.18
  actor_rollout_ref.actor.optim.lr=1e-6                     # their l.72
  actor_rollout_ref.rollout.temperature=1.0                 # their l.41
  actor_rollout_ref.rollout.val_kwargs.n=1                  # their l.38: validation n=1 at T 1.0
  actor_rollout_ref.rollout.val_kwargs.temperature=1.0
  actor_rollout_ref.rollout.val_kwargs.top_p=1.0
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4    # their l.19 (unused under dynamic bsz, l.48)
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432   # ours (their script leaves verl's default)
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=27648
  actor_rollout_ref.actor.fsdp_config.param_offload=True    # their l.49
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
  actor_rollout_ref.rollout.gpu_memory_utilization=0.8      # their l.92
)
bapo_launch "authors-example" "${RUN[@]}"
