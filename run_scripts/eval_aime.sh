#!/usr/bin/env bash
# AIME evaluation through verl's rollout: avg@k, pass@k, maj@k and std@k per benchmark and per problem,
# written as results.json and results.md (see recipe/evaluation.py).
#
#   run_scripts/eval_aime.sh MODEL_PATH [k]          # k defaults to 16 (the paper's avg@16)
#
# Environment (defaults in brackets):
#   DATA                 parquet files, one benchmark per data_source [data/aime2024.parquet data/aime2025.parquet]
#                        (made by run_scripts/prepare_data.sh)
#   OUT                  output folder [runs/eval/<model dir name>-k<k>]
#   DEVICE               gpu (vLLM, configs/bapo_trainer.yaml) or cpu (vLLM's CPU build, configs/cpu_tiny.yaml)
#                        [gpu if nvidia-smi lists a GPU, else cpu]
#   TEMPERATURE, TOP_P   sampling [0.6, 0.95] (the paper's)
#   MAX_RESPONSE_LENGTH  [32768 on gpu, the config's on cpu]; match the run script of the model
#   N_GPUS               GPUs per node on gpu [8]
# Extra Hydra overrides can follow after `--`, e.g. -- actor_rollout_ref.rollout.tensor_model_parallel_size=2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
MODEL="$1"; shift
K=16
if [[ $# -gt 0 && "$1" != "--" ]]; then K="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${DEVICE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi
read -r -a DATA_FILES <<< "${DATA:-data/aime2024.parquet data/aime2025.parquet}"
OUT="${OUT:-runs/eval/$(basename "$MODEL")-k$K}"
ARGS=(run --model "$MODEL" --k "$K" --data "${DATA_FILES[@]}" --out "$OUT"
      --temperature "${TEMPERATURE:-0.6}" --top-p "${TOP_P:-0.95}")
case "$DEVICE" in
  gpu) ARGS+=(--max-response-length "${MAX_RESPONSE_LENGTH:-32768}" -- "trainer.n_gpus_per_node=${N_GPUS:-8}"
              actor_rollout_ref.rollout.name=vllm actor_rollout_ref.actor.use_dynamic_bsz=True
              actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True) ;;
  cpu) ARGS+=(--cpu ${MAX_RESPONSE_LENGTH:+--max-response-length "$MAX_RESPONSE_LENGTH"} --) ;;
  *) echo "DEVICE=$DEVICE: must be gpu or cpu" >&2; exit 2 ;;
esac
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m recipe.evaluation "${ARGS[@]}" "$@"
