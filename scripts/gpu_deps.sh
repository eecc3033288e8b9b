#!/usr/bin/env bash
# Builds ./.gpu_deps: the Python packages the GPU machine lacks for scripts/gpu_check.py (a
# worker's own path: in-place merges, lm-eval scoring, an export and its verification). Run it
# here, where pip reaches the package registry; the GPU machine has no network. It has PyTorch,
# transformers, safetensors, PEFT, accelerate and matplotlib (and, per its image, pandas and
# pyarrow), not lm-eval, datasets or pydantic.
#
#   bash scripts/gpu_deps.sh                     # .gpu_deps for the GPU machine's Python 3.12
#   bash scripts/gpu_deps.sh --python-version 3.11 --dest /tmp/gpu_deps311   # another Python
#
# Everything is installed with --no-deps from an explicit list (lm-eval's full dependency
# closure is hundreds of MiB): the list is what the worker path imports, found by running it in
# a virtual environment that has only PyTorch, transformers, safetensors, PEFT, accelerate and
# matplotlib. pyarrow, pandas and lxml, which the GPU machine's image has (about 200 MiB
# unpacked), do not fit in what travels to it (64 MiB with the tree): they are stripped to what
# `datasets` and `sacrebleu` load and packed into .gpu_deps/packed.tar.xz, which
# scripts/gpu_check.sh unpacks only when the machine's own are missing or older than datasets
# needs. The folder stays under 50 MiB; the script fails if it does not.
set -euo pipefail
cd "$(dirname "$0")/.."

pyver=3.12
dest=.gpu_deps
python="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    --dest) dest="$2"; shift 2 ;;
    *) echo "usage: $0 [--python-version 3.12] [--dest .gpu_deps]" >&2; exit 2 ;;
  esac
done
max_mib="${GPU_DEPS_MAX_MIB:-50}"

# What the worker path imports and the GPU machine lacks (versions as in this project's .venv).
packages=(
  lm_eval==0.4.13          # evaluator, HFLM, TaskManager
  datasets==5.2.0          # lm_eval.api.task; evaluators/toy_facts/utils.py
  dill==0.4.1              # datasets, lm_eval.caching
  multiprocess==0.70.19    # datasets
  xxhash==4.1.0            # datasets (fingerprints)
  fsspec==2026.9.0         # datasets (pins fsspec<=2026.9.0)
  pydantic==2.14.4         # evomerge configs (WorkerSpec, evaluator configs, recipes)
  pydantic_core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0  # pydantic needs >= 4.16; the GPU machine's may be older
  requests==2.34.2         # lm_eval.utils
  urllib3==2.8.0
  certifi==2026.10.19.post1
  charset-normalizer==3.5.3
  idna==3.21
  sacrebleu==2.6.0         # lm_eval.api.metrics
  portalocker==4.4.2
  tabulate==0.10.0
  colorama==0.4.6
)
# What the GPU machine's image has (pyarrow, pandas: datasets; lxml: sacrebleu) but a bare
# PyTorch environment does not: packed, and unpacked by gpu_check.sh only where missing or older
# than datasets needs.
packed=(
  pyarrow==26.0.1
  pandas==3.1.1
  lxml==6.2.0
)
platforms=(
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_28_x86_64
)

pip_target() {  # pip_target FOLDER PACKAGE...: binary wheels for the GPU machine's Python
  local folder="$1"
  shift
  "$python" -m pip install -q --no-deps --no-compile --only-binary=:all: --upgrade \
    --python-version "$pyver" --implementation cp "${platforms[@]}" --target "$folder" "$@" \
    2>&1 | grep -v '^WARNING: Location' >&2 || true
}

prune() {  # prune FOLDER: byte code, type stubs, tests, what no import needs
  local folder="$1"
  find "$folder" -name __pycache__ -type d -prune -exec rm -rf {} +
  find "$folder" \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.h' \
    -o -name '*.hpp' -o -name '*.cc' -o -name '*.cpp' \) -type f -delete
  find "$folder" -path '*/tests' -type d -prune -exec rm -rf {} +
  rm -rf "${folder:?}/bin"
}

strip_libraries() {  # strip_libraries FOLDER: drop debug symbols (a fifth of pyarrow)
  command -v strip >/dev/null || return 0
  find "$1" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
}

# The packages go to .gpu_deps/site-packages (PYTHONPATH): dill, which datasets uses to
# fingerprint a dataset, pickles a module by value (and fails on pyarrow's) unless its file is
# under sys.prefix or has "site-packages" in its path.
site="$dest/site-packages"
rm -rf "${dest:?}"
mkdir -p "$site"
pip_target "$site" "${packages[@]}"
# lm-eval's ~10k bundled task YAMLs: the check uses evomerge's evaluators/ and never indexes them.
rm -rf "$site/lm_eval/tasks"/*/
prune "$site"
strip_libraries "$site"
# lm-eval's file list names the task YAMLs removed above (2 MiB); pip needs no RECORD here.
: >"$site"/lm_eval-*.dist-info/RECORD
for name in lm_eval datasets pydantic pydantic_core sacrebleu requests; do
  [ -d "$site/$name" ] || { echo "gpu_deps: $name was not installed into $site" >&2; exit 1; }
done

# The packed ones, stripped and compressed: unpacked on the GPU machine only when needed.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
packed_site="$stage/site-packages"
pip_target "$packed_site" "${packed[@]}"
for name in pyarrow pandas lxml; do
  [ -d "$packed_site/$name" ] || { echo "gpu_deps: $name was not installed" >&2; exit 1; }
done
prune "$packed_site"
strip_libraries "$packed_site"
(
  cd "$packed_site/pyarrow"
  # Flight, S3/GCS/Azure file systems, Gandiva, CUDA, ORC: nothing datasets loads links them
  # (pyarrow.lib itself needs libarrow, _compute, _acero, _dataset, _substrait and libparquet).
  rm -f libarrow_flight.so* libarrow_python_flight.so* libarrow_s3.so* libarrow_gcsfs.so* \
    libarrow_azurefs.so* libgandiva.so* libarrow_cuda.so* _pyarrow_cpp_tests*.so \
    _flight*.so _s3fs*.so _gcsfs*.so _azurefs*.so _substrait*.so gandiva*.so _cuda*.so _orc*.so \
    _dataset_orc*.so
  rm -rf include src
  # The wheel ships some libraries three times (no symlinks in wheels): keep the SONAME copy
  # (libX.so.2600), link libX.so and libX.so.2600.1.0 to it.
  for lib in lib*.so.[0-9]*; do
    case "$lib" in *.so.*.*) continue ;; esac
    for copy in "${lib%%.so.*}.so" "$lib".*; do
      if [ -f "$copy" ] && [ ! -L "$copy" ] && cmp -s "$copy" "$lib"; then
        ln -sf "$lib" "$copy"
      fi
    done
  done
)
XZ_OPT="-9 -T0" tar -C "$stage" -cJf "$dest/packed.tar.xz" site-packages
printf '%s\n' "${packed[@]}" >"$dest/packed.txt"

mib() { echo "$(($1 / 1024 / 1024)).$(($1 * 10 / 1024 / 1024 % 10)) MiB"; }
deps_bytes=$(du -sb "$dest" | cut -f1)
packed_bytes=$(du -sb "$dest/packed.tar.xz" | cut -f1)
echo "gpu_deps: $dest is $(mib "$deps_bytes") (packed.tar.xz $(mib "$packed_bytes")) for Python $pyver"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  echo "gpu_deps: the working tree that travels is $(mib "$tree_bytes") (tracked + untracked, not ignored); with $dest $(mib $((tree_bytes + deps_bytes))) of the 64 MiB"
fi
if [ "$deps_bytes" -gt $((max_mib * 1024 * 1024)) ]; then
  echo "gpu_deps: $dest is over ${max_mib} MiB" >&2
  exit 1
fi
