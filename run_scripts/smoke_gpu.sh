#!/usr/bin/env bash
# One-GPU smoke run of a fresh cluster install: the tiny local model and data (recipe/data/tiny_assets/,
# built on first use, ~1 min) through vLLM + FSDP2 for a few steps, BAPO then GRPO, then the avg@16 evaluation
# path. Minutes, not hours; run it before a real run. Needs an NVIDIA GPU and vLLM (pip install -e ".[gpu]").
#
#   run_scripts/smoke_gpu.sh [-- hydra overrides]        # METHOD=bapo or METHOD=grpo runs one of the two
#   DRY_RUN=1 run_scripts/smoke_gpu.sh                   # checks the config on a laptop (no GPU needed)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
bapo_parse_args "$@"

if [[ "${DRY_RUN:-0}" == 0 ]]; then
  { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; } \
    || bapo_die "smoke_gpu.sh needs an NVIDIA GPU: nvidia-smi lists none (DRY_RUN=1 checks the config without one)"
  "$PYTHON" -c "import vllm" 2>/dev/null \
    || bapo_die "smoke_gpu.sh needs vLLM: '$PYTHON -c \"import vllm\"' fails; install the GPU stack: pip install -e \".[gpu]\""
  # verl's default attention (model.override_config.attn_implementation) and remove-padding path use it
  "$PYTHON" -c "import flash_attn" 2>/dev/null \
    || bapo_die "smoke_gpu.sh needs flash-attn (verl's default attention and use_remove_padding): '$PYTHON -c \"import flash_attn\"' fails"
fi
read -r TINY_MODEL TINY_TRAIN TINY_TEST < <("$PYTHON" -c "
from recipe.data.tiny_assets import build_tiny_assets
a = build_tiny_assets(verbose=False)
print(a.model_dir, a.train_file, a.test_file)")

MODEL="$TINY_MODEL"; TRAIN_FILE="$TINY_TRAIN"; VAL_FILES="$TINY_TEST"
NNODES=1; GPUS=1
PROMPT_LENGTH=112                                            # tiny prompts are 102 tokens
RESPONSE_LENGTH=32                                           # the tiny task's answers are ~16 tokens
ROLLOUT_TP=1
STEPS="${STEPS:-4}"; SAVE_FREQ="${SAVE_FREQ:-4}"; TEST_FREQ="${TEST_FREQ:-4}"
RUN_ID="${RUN_ID:-smoke-$(date -u +%Y%m%dT%H%M%SZ)}"

RUN=(
  data.train_batch_size=16
  actor_rollout_ref.rollout.n=4
  actor_rollout_ref.actor.ppo_mini_batch_size=4              # staleness 4 = 16 / 4
  actor_rollout_ref.actor.ppo_epochs=1
  actor_rollout_ref.actor.optim.lr=1e-4                      # the CPU demo's rate for this model
  actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1024
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=1024
  actor_rollout_ref.rollout.gpu_memory_utilization=0.3
  actor_rollout_ref.rollout.val_kwargs.n=4
)
for method in ${METHOD:-bapo grpo}; do
  bapo_method "$method"
  bapo_launch "smoke-gpu-$method" "${RUN[@]}"
done
