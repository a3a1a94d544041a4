#!/usr/bin/env bash
# OctoThinker-Llama3.2-3B, BAPO vs GRPO (paper Appendix A, Table 2, Fig. 13): rho0 0.45, c_low 0.8-0.9,
# c_high 1.2-2.0. The appendix gives no steps, length, batch or staleness; ours are marked.
#
#   METHOD=bapo run_scripts/octothinker_3b.sh [-- hydra overrides]     # METHOD: bapo | grpo
#   DRY_RUN=1 ... checks the config on a laptop; every other setting: run_scripts/lib/launch.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

MODEL="${MODEL:-OctoThinker/OctoThinker-3B-Long-Zero}"      # paper App. A: OctoThinker-Llama3.2-3B-Long-Zero
NNODES="${NNODES:-1}"; GPUS="${GPUS:-8}"
METHOD="${METHOD:-bapo}"
RESPONSE_LENGTH=8192                                        # ours: as the 7B preliminary runs
ROLLOUT_TP=1
bapo_method "$METHOD"

RUN=(
  actor_rollout_ref.actor.ppo_mini_batch_size=64            # staleness 8 = 2 * 256 / 64 (ours, as the 7B runs)
  actor_rollout_ref.actor.ppo_epochs=2
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=27648
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
)
if [[ "$METHOD" == bapo ]]; then
  RUN+=(
    actor_rollout_ref.actor.policy_loss.rho_target=0.45      # paper App. A
    actor_rollout_ref.actor.policy_loss.c_low_start=0.8      # paper App. A: lower bound 0.8-0.9
    actor_rollout_ref.actor.policy_loss.c_low_max=0.9
    actor_rollout_ref.actor.policy_loss.c_high_start=1.2     # paper App. A: upper bound 1.2-2.0
    actor_rollout_ref.actor.policy_loss.c_high_max=2.0
  )                                                          # steps 0.02 / 0.05: Sec. 5.1's (App. A gives none)
elif [[ "$METHOD" != grpo ]]; then
  bapo_die "METHOD=$METHOD: valid: bapo, grpo"
fi
bapo_launch "octothinker-3b-$METHOD" "${RUN[@]}"
