#!/usr/bin/env bash
# Check everything a study needs (`evomerge check`), and only then submit it as a Ray Job.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/overnight.sh STUDY.yaml [options]

Run `evomerge check` on the study against the cluster that will run it: the YAML, the
models, space, proposer and evaluators, the database, the study name, the cluster's CPUs
and GPUs, CUDA and disk space. If any check fails, submit nothing and exit 1. Otherwise
submit it with scripts/submit_study.sh and print how to follow it in the morning.
With --resume, check and submit the continuation of a stopped or crashed study instead.

Options:
  --address URL        Ray Jobs address (default $RAY_API_SERVER_ADDRESS, else
                       http://127.0.0.1:8265)
  --cluster HOST:PORT  the cluster to check (default: the --address host, port 6379)
  --storage URL        database URL or SQLite file, overriding the YAML's
  --job-id ID          the job's submission id
  --resume             continue the study the YAML started (`evomerge resume STUDY.yaml`)
  -h, --help           this help
EOF
}

study="" address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" cluster="" storage="" job_id="" resume=""
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --address) address="${2:?--address needs a value}"; shift 2 ;;
    --cluster) cluster="${2:?--cluster needs a value}"; shift 2 ;;
    --storage) storage="${2:?--storage needs a value}"; shift 2 ;;
    --job-id) job_id="${2:?--job-id needs a value}"; shift 2 ;;
    --resume) resume=--resume; shift ;;
    -*) echo "overnight.sh: unknown option '$1' (see --help)" >&2; exit 1 ;;
    *)
      [[ -z "$study" ]] || { echo "overnight.sh: one study YAML, got '$study' and '$1'" >&2; exit 1; }
      study="$1"; shift ;;
  esac
done
[[ -n "$study" ]] || { echo "overnight.sh: give the study YAML (see --help)" >&2; exit 1; }
if [[ -z "$cluster" ]]; then
  host="${address#*://}"
  cluster="${host%%[:/]*}:6379"
fi

if ! command -v evomerge >/dev/null && [[ -x "$(dirname "$0")/../.venv/bin/evomerge" ]]; then
  PATH="$(cd "$(dirname "$0")/../.venv/bin" && pwd):$PATH"
fi
command -v evomerge >/dev/null || { echo "overnight.sh: 'evomerge' is not installed" >&2; exit 1; }

check=(evomerge check "$study" --address "$cluster")
submit=("$(dirname "$0")/submit_study.sh" "$study" --address "$address")
if [[ -n "$storage" ]]; then
  check+=(--storage "$storage")
  submit+=(--storage "$storage")
fi
[[ -n "$job_id" ]] && submit+=(--job-id "$job_id")
if [[ -n "$resume" ]]; then
  check+=(--resume)
  submit+=(--resume)
fi

echo "overnight.sh: checking $study against the cluster at $cluster" >&2
if ! "${check[@]}"; then
  echo "overnight.sh: not submitted: fix the checks marked FAIL above, then run this again" >&2
  exit 1
fi
job_id="$("${submit[@]}")"
echo "$job_id"
cat >&2 <<EOF

Good night. In the morning:
  scripts/tail_study.sh $job_id --address $address       # the log; exits with how the job ended
  evomerge status --storage STORAGE --study NAME          # progress, best, failures (the YAML's storage and name)
  evomerge pareto --storage STORAGE --study NAME          # the front; then 'evomerge export'
EOF
