#!/usr/bin/env bash
# The test suite on a fresh machine: install into ./.venv (with the dev extra) if needed, make
# sure PostgreSQL answers on 127.0.0.1:5432, then run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
bash scripts/ensure_postgres.sh || echo "warning: PostgreSQL is not available; its tests will fail" >&2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export EVOMERGE_TEST_POSTGRES_URL="${EVOMERGE_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
