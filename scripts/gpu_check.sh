#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): on one GPU, a ~1.1 B-parameter Llama family built on the
# GPU, 20 DARE-TIES candidates through a worker's own path (in-place build on cuda, lm-eval
# scoring), one candidate exported on cuda and on cpu (bit-identical, verified), peak GPU memory
# against the `check` estimate, build time against the HBM floor, evaluation throughput. About
# 3-4 minutes on an H100; stopped at 330 s. Run from the repo root.
#
# Through the device tool (the GPU machine has PyTorch, transformers, safetensors and PEFT, but
# not lm-eval, datasets or pydantic, and no network):
#   1. here, once:  bash scripts/gpu_deps.sh      # fills .gpu_deps/ (ignored by git, < 50 MiB)
#   2. run(command="bash scripts/gpu_check.sh", carry=[".gpu_deps"], timeout_s=420)
#   3. $OUT comes back with gpu_check.json (every number), gpu_check.md (a ready "## GPU check"
#      section for BENCHMARKS.md) and gpu_check.log. Exit status 1: a check failed (see the .md).
# Elsewhere: OUT=folder bash scripts/gpu_check.sh [gpu_check.py options]; PYTHON picks the
# interpreter, GPU_DEPS the packages folder. On a CPU, to try the script itself:
#   bash scripts/gpu_check.sh --device cpu --tiny --candidates 3
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

out="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$out"
python="${PYTHON:-python3}"
deps="${GPU_DEPS:-$PWD/.gpu_deps}"  # another folder: GPU_DEPS (gpu_deps.sh --dest)
export PYTHONPATH="$PWD:$deps/site-packages${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GPU_CHECK_COMMAND="bash scripts/gpu_check.sh${*:+ $*}"

check() {
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $GPU_CHECK_COMMAND"
  echo "== nvidia-smi"
  nvidia-smi || echo "(no nvidia-smi here)"
  echo "== python"
  "$python" -c 'import sys, torch, transformers; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("transformers", transformers.__version__)' \
    || return 2
  if [ ! -d "$deps" ]; then
    echo "no .gpu_deps here: run 'bash scripts/gpu_deps.sh' first and carry .gpu_deps" >&2
    return 2
  fi
  # pyarrow, pandas, lxml: this machine's own when they import and suit datasets, else packed.
  if ! "$python" - <<'EOF'
from importlib.metadata import distribution

from packaging.requirements import Requirement

try:
    import lxml.etree
    import pandas
    import pyarrow
except ImportError as exc:
    raise SystemExit(f"not all here ({exc})") from None
for text in distribution("datasets").requires or []:
    need = Requirement(text)
    if need.name == "pyarrow" and not need.specifier.contains(pyarrow.__version__):
        raise SystemExit(f"pyarrow {pyarrow.__version__} here; datasets needs {need.specifier}")
print(f"pyarrow {pyarrow.__version__}, pandas {pandas.__version__}, lxml: this machine's")
EOF
  then
    packed="${TMPDIR:-/tmp}/evomerge-gpu-packed"
    rm -rf "$packed" && mkdir -p "$packed" || return 2
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
      "$deps/packed.tar.xz" "$packed" || return 2
    export PYTHONPATH="$packed/site-packages:$PYTHONPATH"
    echo "so unpacked from .gpu_deps/packed.tar.xz: $(tr '\n' ' ' <"$deps/packed.txt")"
  fi
  echo "== imports"
  "$python" -c 'import datasets, lm_eval, lm_eval.evaluator, pydantic, evomerge.cluster.worker, evomerge.memory, evomerge.evaluate.suite; print("lm_eval", lm_eval.__version__, "datasets", datasets.__version__, "pydantic", pydantic.VERSION)' \
    || return 2
  echo "== gpu_check.py"
  timeout -k 20 330 "$python" scripts/gpu_check.py --device cuda --out "$out" "$@"
}

check "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
