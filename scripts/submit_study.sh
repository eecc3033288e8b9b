#!/usr/bin/env bash
# Submit `evomerge search STUDY.yaml` (or, with --resume, `evomerge resume STUDY.yaml`) to a Ray
# cluster as a Ray Job.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/submit_study.sh STUDY.yaml [options]

Submit `evomerge search STUDY.yaml` as a Ray Job and return at once; print the job id and
how to follow it. With --resume, submit `evomerge resume STUDY.yaml` instead: it continues
the stopped or crashed study that YAML started (its storage and name come from the YAML).

The job runs on the head with the YAML's absolute path, so the paths in it (relative to the
YAML's folder) must exist on the head, and the models on every worker, at the same places
(a shared or identical file system). Nothing is uploaded.

Options:
  --address URL     Ray Jobs address (default $RAY_API_SERVER_ADDRESS, else
                    http://127.0.0.1:8265)
  --storage URL     database URL or SQLite file, overriding the YAML's (it shows in the
                    job's command line: keep passwords in the YAML instead)
  --job-id ID       the job's submission id (default evomerge-STUDYFILE-DATE-TIME)
  --resume          continue the study instead of starting it
  -h, --help        this help

Check the study first with `evomerge check STUDY.yaml` (scripts/overnight.sh does both).
EOF
}

study="" address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" storage="" job_id="" verb=search
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --address) address="${2:?--address needs a value}"; shift 2 ;;
    --storage) storage="${2:?--storage needs a value}"; shift 2 ;;
    --job-id) job_id="${2:?--job-id needs a value}"; shift 2 ;;
    --resume) verb=resume; shift ;;
    -*) echo "submit_study.sh: unknown option '$1' (see --help)" >&2; exit 1 ;;
    *)
      [[ -z "$study" ]] || { echo "submit_study.sh: one study YAML, got '$study' and '$1'" >&2; exit 1; }
      study="$1"; shift ;;
  esac
done
[[ -n "$study" ]] || { echo "submit_study.sh: give the study YAML (see --help)" >&2; exit 1; }
[[ -f "$study" ]] || { echo "submit_study.sh: $study: no such file" >&2; exit 1; }

if ! command -v ray >/dev/null && [[ -x "$(dirname "$0")/../.venv/bin/ray" ]]; then
  PATH="$(cd "$(dirname "$0")/../.venv/bin" && pwd):$PATH"
fi
command -v ray >/dev/null || { echo "submit_study.sh: 'ray' is not installed (pip install evomerge)" >&2; exit 1; }

# The driver resolves the YAML's relative paths against its folder, so an absolute YAML path
# is all the job needs, whatever folder Ray starts it in.
study="$(cd "$(dirname "$study")" && pwd)/$(basename "$study")"
if [[ -z "$job_id" ]]; then
  stem="$(basename "$study")"
  stem="${stem%.*}"
  job_id="evomerge-${stem//[^A-Za-z0-9_-]/-}-$(date +%Y%m%d-%H%M%S)"
fi
command=(evomerge "$verb" "$study")
[[ -n "$storage" ]] && command+=(--storage "$storage")

if ! ray job submit --address "$address" --submission-id "$job_id" --no-wait \
  --log-style record --log-color false -- "${command[@]}" >/dev/null; then
  echo "submit_study.sh: Ray Jobs at $address refused the job (is scripts/cluster_head.sh running, and the token here?)" >&2
  exit 1
fi
echo "$job_id"
cat >&2 <<EOF
submitted job $job_id: ${command[*]}
  follow it:   scripts/tail_study.sh $job_id --address $address
  its state:   ray job status $job_id --address $address
  stop it:     ray job stop $job_id --address $address   (then this script with --resume continues it)
EOF
