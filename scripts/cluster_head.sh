#!/usr/bin/env bash
# Start the Ray head of an evomerge cluster on this machine (`ray start --head`).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/cluster_head.sh [options] [-- more `ray start` options]

Start the Ray head of an evomerge cluster on this machine, then print its address, how
GPU machines join it (scripts/cluster_worker.sh) and how to submit a study.

Options:
  --port PORT             the cluster's port, which workers join (default 6379)
  --node-ip IP            this machine's address on the cluster's private network
                          (default: Ray picks one)
  --dashboard-port PORT   Ray Jobs / dashboard port (default 8265)
  --dashboard-host HOST   where the dashboard listens (default 127.0.0.1: it runs jobs,
                          so keep it off the network and reach it through an SSH tunnel)
  --num-gpus N            GPUs this machine offers (default: Ray counts them)
  --num-cpus N            CPUs this machine offers (default: Ray counts them)
  --temp-dir DIR          Ray's session and log folder (default /tmp/ray)
  --block                 stay in the foreground; Ctrl-C or SIGTERM stops the head
  -h, --help              this help

Token authentication (Ray 2.60): the first start writes a token to ~/.ray/auth_token
(or uses $RAY_AUTH_TOKEN_PATH / $RAY_AUTH_TOKEN). Every worker machine and every
machine that submits jobs needs the same token. Stop the head with `ray stop` (it stops
every Ray process of this machine).
EOF
}

port=6379 node_ip="" dashboard_port=8265 dashboard_host=127.0.0.1
num_gpus="" num_cpus="" temp_dir="" block=0 extra=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --node-ip) node_ip="${2:?--node-ip needs a value}"; shift 2 ;;
    --dashboard-port) dashboard_port="${2:?--dashboard-port needs a value}"; shift 2 ;;
    --dashboard-host) dashboard_host="${2:?--dashboard-host needs a value}"; shift 2 ;;
    --num-gpus) num_gpus="${2:?--num-gpus needs a value}"; shift 2 ;;
    --num-cpus) num_cpus="${2:?--num-cpus needs a value}"; shift 2 ;;
    --temp-dir) temp_dir="${2:?--temp-dir needs a value}"; shift 2 ;;
    --block) block=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "cluster_head.sh: unknown option '$1' (see --help)" >&2; exit 1 ;;
  esac
done

# Use the repository's .venv when Ray is not on PATH; put Ray's folder first on PATH so that
# the jobs this head runs find `evomerge` beside it.
if ! command -v ray >/dev/null && [[ -x "$(dirname "$0")/../.venv/bin/ray" ]]; then
  PATH="$(cd "$(dirname "$0")/../.venv/bin" && pwd):$PATH"
fi
ray_bin="$(command -v ray)" || { echo "cluster_head.sh: 'ray' is not installed (pip install evomerge)" >&2; exit 1; }
PATH="$(dirname "$ray_bin"):$PATH"
export PATH
command -v evomerge >/dev/null || echo "cluster_head.sh: warning: no 'evomerge' beside $ray_bin; jobs will not find it" >&2
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

args=(start --head --port="$port" --dashboard-host="$dashboard_host" --dashboard-port="$dashboard_port"
  --disable-usage-stats)
[[ -n "$node_ip" ]] && args+=(--node-ip-address="$node_ip")
[[ -n "$num_gpus" ]] && args+=(--num-gpus="$num_gpus")
[[ -n "$num_cpus" ]] && args+=(--num-cpus="$num_cpus")
[[ -n "$temp_dir" ]] && args+=(--temp-dir="$temp_dir")
args+=("${extra[@]}")

shown_ip="${node_ip:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
shown_ip="${shown_ip:-127.0.0.1}"
next_steps() {
  cat <<EOF
evomerge cluster head: ${shown_ip}:${port} (Ray Jobs: http://${dashboard_host}:${dashboard_port})
  join from each GPU machine:   scripts/cluster_worker.sh ${shown_ip}:${port}
                                (with this machine's ~/.ray/auth_token copied there first)
  check a study:                evomerge check STUDY.yaml --address ${shown_ip}:${port}
  submit a study:               scripts/submit_study.sh STUDY.yaml --address http://127.0.0.1:${dashboard_port}
  or all at once, overnight:    scripts/overnight.sh STUDY.yaml --address http://127.0.0.1:${dashboard_port} --cluster ${shown_ip}:${port}
EOF
}

if ((block)); then
  next_steps
  exec ray "${args[@]}" --block
fi
ray "${args[@]}"
next_steps
