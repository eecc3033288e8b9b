#!/usr/bin/env python
"""Train the toy zoo into a folder: the same as ``evomerge zoo``, without installing evomerge.

    .venv/bin/python scripts/build_toy_zoo.py --out toy_zoo [--seed 0] [--sources 2]

Every flag is passed on to ``evomerge zoo`` (``--help`` lists them). A folder that already holds
the same zoo is reused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["zoo", *sys.argv[1:]]))
