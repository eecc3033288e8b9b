#!/usr/bin/env bash
# The demo on a fresh machine: install into ./.venv if needed, then run `evomerge demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/evomerge demo "$@"
