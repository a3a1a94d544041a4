# Shared launcher of the paper-run scripts (sourced, not run). A script sets its own settings as a bash
# array of Hydra overrides and calls `bapo_launch NAME "${RUN[@]}"`; this file adds the settings every run
# shares (below, in bapo_common), the method's loss (bapo_method), the user's extra overrides (after `--`),
# and hands that ONE list to whichever of these runs it:
#
#   (default)          python -m recipe.bapo.main_bapo ARGS, then merge the last checkpoint and run
#                      run_scripts/eval_aime.sh on it (avg@16); EVAL=0 skips the evaluation
#   LAUNCH=ray_job     ray job submit (RAY_ADDRESS, default http://127.0.0.1:8265) -- python -m recipe.bapo.main_bapo ARGS
#                      on a running Ray cluster (run_scripts/multinode/ray_cluster.sh); RAY_NO_WAIT=1 returns at once
#   DRY_RUN=1          python -m recipe.dry_run ARGS: compose, verl's checks, cluster checks, plan; no GPU, no Ray;
#                      writes the composed config to $LOGS/<run name>/config.yaml (every setting of the run)
#   DRY_RUN=print      print ARGS, one per line, an empty line after each run (what the tests read)
#
# Environment (defaults in brackets):
#   MODEL      policy: hub id or absolute local dir [the script's]
#   DATA       folder with the parquet files of run_scripts/prepare_data.sh [<repo>/data]
#   TRAIN_FILE [$DATA/skywork_or1_math_train.parquet]   VAL_FILES [$DATA/aime2024.parquet $DATA/aime2025.parquet]
#   CKPT       checkpoint root; each run writes $CKPT/<run name> [<repo>/runs/checkpoints]
#   LOGS       metrics and evaluation root; each run writes $LOGS/<run name> [<repo>/runs/logs]
#              (both must be on storage every node sees when NNODES > 1)
#   NNODES, GPUS   nodes and GPUs per node [the script's]
#   RUN_ID     names this attempt's metrics file, metrics-$RUN_ID.jsonl (verl's file logger truncates) [UTC time]
#   PROJECT    trainer.project_name (wandb) [bapo-paper];  WANDB_API_KEY set: wandb is added to trainer.logger
#   STRICT_AB=1  baselines without verl's dual clip (clip_ratio_c=1e9), like BAPO's paper preset [verl's 3.0]
#   METHOD     the method, an option of configs/method/ (scripts that offer several) [the script's]
#   STRATEGY   actor engine: fsdp2 or megatron (scripts that offer it) [fsdp2]; megatron runs are named
#              <run name>-megatron (their checkpoints do not load into FSDP and back)
#   STEPS [250], SAVE_FREQ [10], TEST_FREQ [10];  EVAL=0: no final evaluation;  EVAL_ONLY=1: only that
#   PYTHON [<repo>/.venv/bin/python, else python3]
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, HF_HOME, WANDB_API_KEY   passed to every node by LAUNCH=ray_job
#              (in the job's runtime env, which the Ray dashboard shows)
# A script sets MODEL, NNODES, GPUS (defaults), RESPONSE_LENGTH and ROLLOUT_TP (and may set PROMPT_LENGTH,
# default 1024) before calling bapo_launch, and calls bapo_strategy with the engines it offers.

BAPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$BAPO_ROOT/.venv/bin/python" ]]; then PYTHON="$BAPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$BAPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# bapo_parse_args "$@": the script's arguments are `[-h] [-- hydra overrides...]`; sets EXTRA.
bapo_parse_args() {
  EXTRA=()
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
  fi
  if [[ $# -gt 0 ]]; then
    [[ "$1" == "--" ]] || bapo_die "unexpected argument '$1': settings go in the environment, Hydra overrides after --"
    shift
    EXTRA=("$@")
  fi
}

bapo_die() { echo "error: $*" >&2; exit 2; }

# bapo_strategy ENGINES...: check STRATEGY against the engines this script has a layout for; sets STRATEGY and
# STRATEGY_ARGS. Megatron is verl's top-level `model_engine` group (it swaps the actor and ref configs); FSDP2 is
# a key of the default `dp` engine. Methods differ only in the loss under either engine.
bapo_strategy() {
  STRATEGY="${STRATEGY:-fsdp2}"
  [[ " $* " == *" $STRATEGY "* ]] || bapo_die "STRATEGY=$STRATEGY: valid for $(basename "$0"): $*"
  case "$STRATEGY" in
    fsdp2) STRATEGY_ARGS=(actor_rollout_ref.actor.strategy=fsdp2 actor_rollout_ref.ref.strategy=fsdp2) ;;
    megatron) STRATEGY_ARGS=(model_engine=megatron) ;;
  esac
}

# bapo_abs PATH: the absolute form of PATH (checkpoints, logs and data are read by processes on every node).
bapo_abs() { [[ "$1" == /* ]] && echo "$1" || echo "$PWD/$1"; }

# bapo_method METHOD: the method (policy loss + advantage estimator) as overrides in METHOD_ARGS: `method=METHOD`,
# an option of configs/method/ (the one table of methods, shared with recipe.sweep). Baselines differ from BAPO
# only there. STRICT_AB=1 also turns off verl's dual clip (actor.clip_ratio_c, read by the baselines' vanilla
# loss only; BAPO's presets have their own, policy_loss.dual_clip_c).
bapo_method() {
  local valid
  valid="$(cd "$BAPO_ROOT/configs/method" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"
  case "$1" in  # the launcher's names before configs/method/
    bapo_authors) bapo_die "METHOD=bapo_authors is now METHOD=bapo_authors_code" ;;
    clip) bapo_die "METHOD=clip is now METHOD=grpo" ;;
  esac
  [[ "$1" != */* && -f "$BAPO_ROOT/configs/method/$1.yaml" ]] || bapo_die "METHOD=$1: valid (configs/method/): ${valid% }"
  METHOD_ARGS=("method=$1")
  [[ "${STRICT_AB:-0}" == 1 ]] && METHOD_ARGS+=(actor_rollout_ref.actor.clip_ratio_c=1e9)
  return 0
}

# bapo_common NAME: settings every paper run shares, in COMMON_ARGS.
bapo_common() {
  local name="$1" data ckpt logs loggers
  data="$(bapo_abs "${DATA:-$BAPO_ROOT/data}")"
  ckpt="$(bapo_abs "${CKPT:-$BAPO_ROOT/runs/checkpoints}")"
  logs="$(bapo_abs "${LOGS:-$BAPO_ROOT/runs/logs}")"
  local train="${TRAIN_FILE:-$data/skywork_or1_math_train.parquet}" val=() v
  for v in ${VAL_FILES:-$data/aime2024.parquet $data/aime2025.parquet}; do val+=("$(bapo_abs "$v")"); done
  BAPO_VAL_FILES="${val[*]}"
  loggers="console,file${WANDB_API_KEY:+,wandb}"
  local IFS=,
  COMMON_ARGS=(
    actor_rollout_ref.model.path="$MODEL"
    data.train_files="$(bapo_abs "$train")"
    data.val_files="[${val[*]}]"
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$GPUS"
    # batch geometry: 256 prompts x 16 responses, prompts <= 1024 tokens (authors' script l.14, 16, 94; the
    # paper reports none); staleness comes from each script's mini-batch and epochs
    data.max_prompt_length="${PROMPT_LENGTH:-1024}"
    data.train_batch_size=256
    actor_rollout_ref.rollout.n=16
    data.max_response_length="$RESPONSE_LENGTH"
    # 250 steps (ours: the paper's curves show 150-250)
    trainer.total_training_steps="${STEPS:-250}"
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
    "${STRATEGY_ARGS[@]}"
    # sampling: temperature 0.6 (paper Sec. 5.1); evaluation: avg@16 at T 0.6, top-p 0.95 (R1 protocol; paper: avg@16)
    actor_rollout_ref.rollout.temperature=0.6
    actor_rollout_ref.rollout.val_kwargs.n=16
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    actor_rollout_ref.rollout.val_kwargs.temperature=0.6
    actor_rollout_ref.rollout.val_kwargs.top_p=0.95
    # optimiser: lr 2e-6 (paper Sec. 5.1); weight decay 0.1 and warmup 10% (authors' script l.73-74)
    actor_rollout_ref.actor.optim.lr=2e-6
    actor_rollout_ref.actor.optim.weight_decay=0.1
    actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1
    # no KL and no entropy bonus (authors' script l.79-83; the paper states none)
    actor_rollout_ref.actor.use_kl_loss=False
    algorithm.use_kl_in_reward=False
    actor_rollout_ref.actor.entropy_coeff=0
    # long chain-of-thought: token-budgeted micro-batches everywhere (limits are set per script)
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
    # checkpoints on shared storage, resumed automatically from the latest one
    trainer.project_name="${PROJECT:-bapo-paper}"
    trainer.experiment_name="$name"
    trainer.default_local_dir="$ckpt/$name"
    trainer.save_freq="${SAVE_FREQ:-10}"
    trainer.resume_mode=auto
    trainer.max_actor_ckpt_to_keep=2
    trainer.val_before_train=True
    trainer.test_freq="${TEST_FREQ:-10}"
    trainer.logger="[$loggers]"
    # a new metrics file per attempt: verl's file logger opens it with "wb"
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="$logs/$name/metrics-${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}.jsonl"
  )
  BAPO_LOGS="$logs/$name"
}

# bapo_launch NAME SCRIPT_OVERRIDES...: build the run's argument list once and hand it on (see the top).
bapo_launch() {
  local name="$1"; shift
  [[ -n "${METHOD_ARGS+x}" ]] || bapo_die "bapo_launch: call bapo_method first"
  [[ -n "${STRATEGY_ARGS+x}" ]] || bapo_strategy fsdp2
  [[ "$STRATEGY" == fsdp2 ]] || name="$name-$STRATEGY"
  : "${MODEL:?}" "${NNODES:?}" "${GPUS:?}" "${RESPONSE_LENGTH:?}" "${ROLLOUT_TP:?}"
  bapo_common "$name"
  if [[ "${EVAL_ONLY:-0}" == 1 ]]; then bapo_eval "$name"; return; fi
  local args=("${COMMON_ARGS[@]}" "${METHOD_ARGS[@]}" "$@" "${EXTRA[@]}") a
  for a in "${args[@]}"; do [[ "$a" != *$'\n'* && -n "$a" ]] || bapo_die "empty or multi-line override: '$a'"; done
  case "${DRY_RUN:-0}" in
    print) printf '%s\n' "${args[@]}"; echo; return ;;
    1) echo "== dry run: $name" >&2; "$PYTHON" -m recipe.dry_run --save-config "$BAPO_LOGS/config.yaml" "${args[@]}"; return ;;
    0) ;;
    *) bapo_die "DRY_RUN=$DRY_RUN: valid: 1, print (or unset)" ;;
  esac
  case "${LAUNCH:-local}" in
    local) "$PYTHON" -m recipe.bapo.main_bapo "${args[@]}" ;;
    ray_job) bapo_ray_job "${args[@]}"; [[ "${RAY_NO_WAIT:-0}" == 1 ]] && { bapo_eval_hint "$name"; return; } ;;
    *) bapo_die "LAUNCH=$LAUNCH: valid: local, ray_job" ;;
  esac
  [[ "${EVAL:-1}" == 1 ]] && bapo_eval "$name"
  return 0
}

# bapo_ray_job ARGS...: submit main_bapo with ARGS to the Ray cluster at RAY_ADDRESS. The job's runtime env
# makes every process on every node import the plugin even where the package is not pip-installed.
bapo_ray_job() {
  local env="\"VERL_USE_EXTERNAL_MODULES\": \"recipe.bapo.plugin\", \"PYTHONPATH\": \"$BAPO_ROOT\"" var
  for var in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME WANDB_API_KEY HF_HOME; do
    [[ -n "${!var:-}" ]] && env+=", \"$var\": \"${!var}\""
  done
  local wait=()
  [[ "${RAY_NO_WAIT:-0}" == 1 ]] && wait=(--no-wait)
  command -v ray >/dev/null || bapo_die "LAUNCH=ray_job: no 'ray' command on PATH (activate the project's environment)"
  ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env-json "{\"env_vars\": {$env}}" \
    "${wait[@]}" -- "$PYTHON" -m recipe.bapo.main_bapo "$@"
}

# bapo_merged_model NAME: merge the run's latest checkpoint (FSDP or Megatron) into a Hugging Face folder; prints its path.
bapo_merged_model() {
  local dir ckpt step actor
  ckpt="$(bapo_abs "${CKPT:-$BAPO_ROOT/runs/checkpoints}")/$1"
  [[ -f "$ckpt/latest_checkpointed_iteration.txt" ]] || bapo_die "no checkpoint in $ckpt (trainer.save_freq > 0?)"
  step="$(cat "$ckpt/latest_checkpointed_iteration.txt")"
  actor="$ckpt/global_step_$step/actor"; dir="$actor/huggingface_merged"
  [[ -f "$dir/config.json" ]] || "$PYTHON" -m verl.model_merger merge --backend "${STRATEGY/fsdp2/fsdp}" --local_dir "$actor" --target_dir "$dir" >&2
  echo "$dir"
}

# bapo_eval NAME: avg@16 on AIME 2024/2025 of the run's last checkpoint, at the run's response length, on this
# node's GPUs (on a Ray head node, ray.init joins the running cluster; RAY_ADDRESS is the job API, not for it).
bapo_eval() {
  local model
  model="$(bapo_merged_model "$1")"
  DATA="$BAPO_VAL_FILES" OUT="$BAPO_LOGS/eval-avg16" MAX_RESPONSE_LENGTH="$RESPONSE_LENGTH" N_GPUS="$GPUS" DEVICE=gpu \
    env -u RAY_ADDRESS "$BAPO_ROOT/run_scripts/eval_aime.sh" "$model" 16 -- \
    "actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP" "data.max_prompt_length=${PROMPT_LENGTH:-1024}"
}

bapo_eval_hint() {
  echo "after the job: EVAL_ONLY=1 $0 (merges the last checkpoint of $1 and runs run_scripts/eval_aime.sh)" >&2
}
