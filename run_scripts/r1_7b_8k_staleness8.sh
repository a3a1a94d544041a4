#!/usr/bin/env bash
# R1-Distill-Qwen-7B, 8k responses, staleness 8: BAPO and the fixed-clip baselines of the paper's
# preliminary runs (Fig. 2 GRPO under staleness, Fig. 7 asymmetric clips, Figs. 8-9 BAPO vs baseline).
#
#   METHOD=bapo run_scripts/r1_7b_8k_staleness8.sh [-- hydra overrides]
#   METHOD (configs/method/): bapo (paper preset) | grpo ([0.8, 1.2]) | clip_higher ([0.8, 1.28]) | clip_0.8_1.5 | clip_0.5_1.2
#   STRATEGY: fsdp2 (default) | megatron (TP 2, PP 2, VPP 2; layout below)
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
bapo_strategy fsdp2 megatron

LAYOUT=()  # FSDP2: DP = 8, no sequence parallelism, no offload at 8k
if [[ "$STRATEGY" == megatron ]]; then
  LAYOUT=(
    # verl's Qwen2/Qwen2.5-7B Megatron examples (examples/grpo_trainer/run_qwen2-7b_math_megatron.sh: TP 2,
    # PP 2; run_qwen2_5-7b_math_megatron.sh: PP 2, VPP 2): TP 2 splits 28 heads and 4 KV heads evenly, 28 layers
    # = 2 stages x 2 virtual chunks x 7 layers; interleaving cuts the pipeline bubble by VPP. DP = 8 / 4 = 2.
    # No CP at 8k. Under VPP verl rounds each pass's dynamic micro-batch count up to a multiple of
    # microbatch_group_size_per_vp_stage (= PP), so BAPO's probe, micro-batched like the update, passes too.
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2
    actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size=2
    actor_rollout_ref.actor.megatron.context_parallel_size=1
    actor_rollout_ref.actor.megatron.sequence_parallel=True
    actor_rollout_ref.actor.megatron.use_distributed_optimizer=True
    # Megatron does not read model.enable_gradient_checkpointing: recompute every layer, as FSDP does
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1
    # params and grads stay resident (see the plan's rollout phase); Adam states go to the host
    actor_rollout_ref.actor.megatron.optimizer_offload=True
  )
fi

RUN=(
  # staleness 8 = ppo_epochs * train_batch_size / ppo_mini_batch_size = 2 * 256 / 64 (authors' script
  # l.16-18, 30; the paper does not state Fig. 7-9's staleness, we take its 8x)
  actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.ppo_epochs=2
  "${LAYOUT[@]}"
  # token limits per GPU: 2x (prompt + response) for the update, 3x for the no-grad log-prob pass
  # (verl-recipe DAPO scripts' pattern); no sequence parallelism, no offload at 8k
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=27648
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
)
bapo_launch "r1-7b-8k-s8-$METHOD" "${RUN[@]}"
