#!/usr/bin/env bash
# Join this (GPU) machine to an evomerge cluster's Ray head (`ray start --address`).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/cluster_worker.sh HEAD_IP[:PORT] [options] [-- more `ray start` options]

Join this machine to the Ray head started by scripts/cluster_head.sh (PORT defaults to
6379). The study's models must be readable here at the same paths as on the head.

Options:
  --node-ip IP      this machine's address on the cluster's private network
  --num-gpus N      GPUs this machine offers (default: Ray counts them)
  --num-cpus N      CPUs this machine offers (default: Ray counts them)
  --block           stay in the foreground; Ctrl-C or SIGTERM takes the machine out
  -h, --help        this help

Token authentication (Ray 2.60): copy the head's ~/.ray/auth_token to ~/.ray/auth_token
here first (or set RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN). Leave with `ray stop`.
EOF
}

head_address="" node_ip="" num_gpus="" num_cpus="" block=0 extra=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --node-ip) node_ip="${2:?--node-ip needs a value}"; shift 2 ;;
    --num-gpus) num_gpus="${2:?--num-gpus needs a value}"; shift 2 ;;
    --num-cpus) num_cpus="${2:?--num-cpus needs a value}"; shift 2 ;;
    --block) block=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "cluster_worker.sh: unknown option '$1' (see --help)" >&2; exit 1 ;;
    *)
      [[ -z "$head_address" ]] || { echo "cluster_worker.sh: one head address, got '$head_address' and '$1'" >&2; exit 1; }
      head_address="$1"; shift ;;
  esac
done
[[ -n "$head_address" ]] || { echo "cluster_worker.sh: give the head's address: HEAD_IP[:PORT] (see --help)" >&2; exit 1; }
[[ "$head_address" == *:* ]] || head_address="$head_address:6379"

if ! command -v ray >/dev/null && [[ -x "$(dirname "$0")/../.venv/bin/ray" ]]; then
  PATH="$(cd "$(dirname "$0")/../.venv/bin" && pwd):$PATH"
fi
ray_bin="$(command -v ray)" || { echo "cluster_worker.sh: 'ray' is not installed (pip install evomerge)" >&2; exit 1; }
PATH="$(dirname "$ray_bin"):$PATH"
export PATH
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

if [[ -z "$num_gpus" ]]; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  echo "cluster_worker.sh: nvidia-smi lists ${gpus:-0} GPU(s) here; Ray counts them itself" >&2
fi
host="${head_address%:*}" port="${head_address##*:}"
if ! timeout 5 bash -c ": >/dev/tcp/$host/$port" 2>/dev/null; then
  echo "cluster_worker.sh: the head at $head_address does not answer; is scripts/cluster_head.sh running there, and the port open?" >&2
  exit 1
fi

args=(start --address="$head_address" --disable-usage-stats)
[[ -n "$node_ip" ]] && args+=(--node-ip-address="$node_ip")
[[ -n "$num_gpus" ]] && args+=(--num-gpus="$num_gpus")
[[ -n "$num_cpus" ]] && args+=(--num-cpus="$num_cpus")
((block)) && args+=(--block)
args+=("${extra[@]}")
exec ray "${args[@]}"
