#!/usr/bin/env bash
# Draws the README's three plots from the demo's study into scripts/readme_images/.
# Run the demo first (bash scripts/demo.sh). Usage: readme_images.sh [DEMO_WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-demo_output}"
storage="$workdir/evomerge_studies.db"
out="scripts/readme_images"
if [ ! -f "$storage" ]; then
  echo "no demo study at $storage: run 'bash scripts/demo.sh' first" >&2
  exit 1
fi
mkdir -p "$out"
evomerge=".venv/bin/evomerge"
common=(--storage "$storage" --study demo)
"$evomerge" pareto "${common[@]}" --plot "$out/pareto.png" >/dev/null
"$evomerge" plot history "${common[@]}" --out "$out/history.png"
"$evomerge" plot recipe "${common[@]}" --trial best --out "$out/recipe.png"
# The figures are opaque: as RGB, compressed harder, they are the same pictures in fewer bytes.
.venv/bin/python - "$out"/pareto.png "$out"/history.png "$out"/recipe.png <<'PY'
import sys

from PIL import Image

for path in sys.argv[1:]:
    with Image.open(path) as image:
        flat = image.convert("RGB")
    flat.save(path, format="PNG", optimize=True)
PY
ls -l "$out"/*.png
