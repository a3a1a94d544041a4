#!/usr/bin/env bash
# Start this node's part of a Ray cluster for a multi-node run (verl's documented flow: ray start on every
# node, then `ray job submit` from anywhere that reaches the head's dashboard port).
#
#   run_scripts/multinode/ray_cluster.sh head                 # on the head node
#   run_scripts/multinode/ray_cluster.sh worker HEAD_ADDRESS  # on every other node (HEAD_ADDRESS: ip or host)
#   run_scripts/multinode/ray_cluster.sh status               # after all nodes joined: GPUs must add up
# then, from the head:
#   LAUNCH=ray_job NNODES=4 CKPT=/shared/ckpt LOGS=/shared/logs DATA=/shared/data run_scripts/r1_32b.sh
#
# Every node needs the same checkout and environment at the same path on shared storage (e.g.
# /shared/bapo-verl with its .venv, `pip install -e ".[gpu]"`). Environment (exported into Ray here, so every
# worker process inherits it): NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the interface the nodes reach each
# other on, e.g. ib0 or eth0: site-specific), RAY_PORT [6379], DASHBOARD_PORT [8265], HF_HOME (shared cache).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="${RAY:-ray}"
# every process Ray starts imports the plugin, even where the package is not pip-installed
export VERL_USE_EXTERNAL_MODULES=recipe.bapo.plugin PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -n "${NCCL_SOCKET_IFNAME:-}" ]] || echo "warning: NCCL_SOCKET_IFNAME is not set; NCCL picks an interface itself" >&2
[[ -n "${NCCL_SOCKET_IFNAME:-}" && -z "${GLOO_SOCKET_IFNAME:-}" ]] && export GLOO_SOCKET_IFNAME="$NCCL_SOCKET_IFNAME"
case "${1:-}" in
  head)   exec "$RAY" start --head --port="${RAY_PORT:-6379}" --dashboard-host=0.0.0.0 \
                 --dashboard-port="${DASHBOARD_PORT:-8265}" ${RAY_BLOCK:+--block} ;;
  worker) [[ -n "${2:-}" ]] || { echo "usage: $0 worker HEAD_ADDRESS" >&2; exit 2; }
          exec "$RAY" start --address="$2:${RAY_PORT:-6379}" ${RAY_BLOCK:+--block} ;;
  status) exec "$RAY" status ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
