#!/usr/bin/env bash
# Partial rollout (paper Sec. 5.3, Fig. 12): each response gets at most BUDGET new tokens per policy version;
# an unfinished response is parked and resumed under later policies. BAPO vs GRPO at budgets 2k and 4k.
# The paper names neither the model nor the lengths of these runs: R1-Distill-Qwen-7B at 8k (ours).
# Uses the partial-rollout preset (configs/rollout/partial.yaml, verl trainer mode colocate_budget from
# recipe/partial/).
#
#   BUDGET=2048 METHOD=bapo run_scripts/partial_rollout_7b.sh [-- hydra overrides]   # BUDGET: 2048 | 4096
#   DRY_RUN=1 ... checks the config on a laptop; every other setting: run_scripts/lib/launch.sh
# No staleness cap, as in the paper. A `wait` cap finishes long responses instead of re-prefilling them every
# version (README, partial-rollout benchmark): -- trainer.v1.sampler.max_off_policy_strategy=wait
#   trainer.v1.sampler.max_off_policy_threshold=5
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

MODEL="${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}"
NNODES="${NNODES:-1}"; GPUS="${GPUS:-8}"
METHOD="${METHOD:-bapo}"
BUDGET="${BUDGET:-2048}"
[[ "$BUDGET" == 2048 || "$BUDGET" == 4096 ]] || bapo_die "BUDGET=$BUDGET: the paper's budgets are 2048 and 4096"
RESPONSE_LENGTH=8192
ROLLOUT_TP=1
bapo_method "$METHOD"

RUN=(
  +rollout=partial                                           # the preset (recipe/partial/, configs/rollout/partial.yaml)
  trainer.v1.trainer_mode=colocate_budget
  trainer.v1.colocate_budget.token_budget=$BUDGET            # paper Sec. 5.3: 2k / 4k per iteration
  # one update per rollout batch (ours): the off-policyness comes from the partial rollout alone
  actor_rollout_ref.actor.ppo_mini_batch_size=256
  actor_rollout_ref.actor.ppo_epochs=1
  actor_rollout_ref.rollout.calculate_log_probs=True          # per-token behaviour log-probs of each segment
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=27648
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
)
bapo_launch "r1-7b-8k-partial$BUDGET-$METHOD" "${RUN[@]}"
