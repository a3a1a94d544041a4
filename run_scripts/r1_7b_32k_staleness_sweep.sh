#!/usr/bin/env bash
# Staleness sweep of the paper's Fig. 11 (R1-Distill-Qwen-7B, max sequence length 32k, AIME24/25 avg@16):
# staleness 2x and 4x for grpo (clip [0.8, 1.2]), clip_higher ([0.8, 1.28]) and bapo, six runs.
#
#   run_scripts/r1_7b_32k_staleness_sweep.sh                    # prints the grid (one command per run)
#   GRID=run run_scripts/r1_7b_32k_staleness_sweep.sh           # runs all six, one after the other
#   STALENESS=4 METHOD=bapo run_scripts/r1_7b_32k_staleness_sweep.sh   # one cell
#   DRY_RUN=1 ... checks every cell on a laptop; every other setting: run_scripts/lib/launch.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

MODEL="${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}"   # "R1-Distill": Fig. 11's base bars are Table 1's 7B row
NNODES="${NNODES:-2}"; GPUS="${GPUS:-8}"                    # ours: 16 GPUs for 32k sequences
RESPONSE_LENGTH=31744                                       # 1024 prompt + 31744 = 32768, "max sequence length 32k"
ROLLOUT_TP=2

cell() {  # cell STALENESS METHOD: one run of the grid
  local staleness="$1" mini
  case "$staleness" in
    2) mini=128 ;;   # staleness 2 = 1 epoch * 256 / 128 (ours: the paper gives only the factor)
    4) mini=64 ;;    # staleness 4 = 1 epoch * 256 / 64
    *) bapo_die "STALENESS=$staleness: valid: 2, 4" ;;
  esac
  bapo_method "$2"
  local run=(
    actor_rollout_ref.actor.ppo_mini_batch_size=$mini
    actor_rollout_ref.actor.ppo_epochs=1
    # 32k sequences: Ulysses sp 2, params and optimizer offloaded during rollout, bigger vLLM share
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=2
    actor_rollout_ref.actor.fsdp_config.param_offload=True
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=32768
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=65536
    actor_rollout_ref.actor.entropy_from_logits_with_chunking=True
    actor_rollout_ref.rollout.gpu_memory_utilization=0.8
  )
  bapo_launch "r1-7b-32k-s$staleness-$2" "${run[@]}"
}

if [[ -n "${STALENESS:-}${METHOD:-}" ]]; then
  cell "${STALENESS:?set STALENESS and METHOD together}" "${METHOD:?set STALENESS and METHOD together}"
  exit 0
fi
for staleness in 2 4; do
  for method in grpo clip_higher bapo; do
    if [[ "${GRID:-print}" == run || "${DRY_RUN:-0}" != 0 ]]; then
      cell "$staleness" "$method"
    else
      echo "STALENESS=$staleness METHOD=$method $0${EXTRA[*]:+ -- ${EXTRA[*]}}"
    fi
  done
done
