#!/usr/bin/env bash
# Follow a study submitted as a Ray Job until it ends; exit with the job's exit status.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/tail_study.sh JOB_ID [options]

Print the job's log as it grows (`ray job logs --follow`) until the job ends, then one line
with how it ended. Exit code: 0 if it SUCCEEDED, the study's exit code if it failed (1 when
unknown), 1 if it was stopped. Ctrl-C stops following, not the job.

Options:
  --address URL       Ray Jobs address (default $RAY_API_SERVER_ADDRESS, else
                      http://127.0.0.1:8265)
  --storage URL       with --study: also print `evomerge status` every --every seconds
  --study NAME
  --every SECONDS     (default 600)
  -h, --help          this help
EOF
}

job_id="" address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" storage="" study="" every=600
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --address) address="${2:?--address needs a value}"; shift 2 ;;
    --storage) storage="${2:?--storage needs a value}"; shift 2 ;;
    --study) study="${2:?--study needs a value}"; shift 2 ;;
    --every) every="${2:?--every needs a value}"; shift 2 ;;
    -*) echo "tail_study.sh: unknown option '$1' (see --help)" >&2; exit 1 ;;
    *)
      [[ -z "$job_id" ]] || { echo "tail_study.sh: one job id, got '$job_id' and '$1'" >&2; exit 1; }
      job_id="$1"; shift ;;
  esac
done
[[ -n "$job_id" ]] || { echo "tail_study.sh: give the job id that submit_study.sh printed (see --help)" >&2; exit 1; }
[[ -z "$storage" && -z "$study" ]] || [[ -n "$storage" && -n "$study" ]] ||
  { echo "tail_study.sh: --storage and --study go together" >&2; exit 1; }
[[ "$every" =~ ^[0-9]+$ && "$every" -gt 0 ]] || { echo "tail_study.sh: --every takes whole seconds, got '$every'" >&2; exit 1; }

if ! command -v ray >/dev/null && [[ -x "$(dirname "$0")/../.venv/bin/ray" ]]; then
  PATH="$(cd "$(dirname "$0")/../.venv/bin" && pwd):$PATH"
fi
command -v ray >/dev/null || { echo "tail_study.sh: 'ray' is not installed (pip install evomerge)" >&2; exit 1; }

# The job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (empty if Ray cannot say).
job_state() {
  local out
  out="$(ray job status "$job_id" --address "$address" --log-style record --log-color false 2>&1)" || return 0
  case "$out" in
    *"Job '$job_id' succeeded"*) echo SUCCEEDED ;;
    *"Job '$job_id' failed"*) echo FAILED ;;
    *"Job '$job_id' was stopped"*) echo STOPPED ;;
    *) sed -n "s/.*Status for job '$job_id': \([A-Z]*\).*/\1/p" <<<"$out" | head -1 ;;
  esac
}

if [[ -n "$study" ]]; then
  (while sleep "$every"; do evomerge status --storage "$storage" --study "$study" >&2 || true; done) &
  status_loop=$!
  trap 'kill "$status_loop" 2>/dev/null || true' EXIT
fi

ray job logs "$job_id" --address "$address" --follow --log-style record --log-color false || true
state="$(job_state)"
while [[ "$state" == PENDING || "$state" == RUNNING ]]; do  # the log stream broke off early
  sleep 10
  state="$(job_state)"
done
case "$state" in
  SUCCEEDED) echo "job $job_id SUCCEEDED" >&2; exit 0 ;;
  STOPPED) echo "job $job_id STOPPED" >&2; exit 1 ;;
  FAILED)
    code="$(ray job status "$job_id" --address "$address" --log-style record --log-color false 2>&1 |
      sed -n 's/.*failed with exit code \([0-9]*\).*/\1/p' | head -1)"
    echo "job $job_id FAILED${code:+ with exit code $code}" >&2
    exit "${code:-1}" ;;
  *) echo "tail_study.sh: Ray Jobs at $address cannot say how job $job_id ended" >&2; exit 1 ;;
esac
