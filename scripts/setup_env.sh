#!/usr/bin/env bash
# Creates ./.venv and installs evomerge into it (CPU torch first, so nothing pulls a CUDA build).
# Re-running is cheap: it reinstalls only when pyproject.toml changed. Usage: setup_env.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
torch_spec="${EVOMERGE_TORCH:-torch==2.13.0}"   # GPU users: EVOMERGE_TORCH=torch (their CUDA build)

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.evomerge-installed${extra:+-$extra}"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing evomerge into .venv (first run takes a few minutes)..." >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  # --no-compile, then compileall on every core: pip byte-compiles on one core (about 100 s of
  # the 150 s install on 2 cores; 60 s in parallel).
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q --no-compile "$torch_spec" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
  target="."; [ -n "$extra" ] && target=".[$extra]"
  # With the package at the top of the repo (no src/), setuptools installs it editable through
  # an import hook (so tests/, scripts/ ... stay unimportable) and then always warns, a screen
  # long, that a folder named evomerge in the working directory may shadow it: here that folder
  # is the package itself. Ignore that one Python warning in the build backend; others still show.
  PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install -q --no-compile -e "$target" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  .venv/bin/python -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true  # a file that fails is only slower
  .venv/bin/python -c "import evomerge, torch, transformers" || { echo "install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
