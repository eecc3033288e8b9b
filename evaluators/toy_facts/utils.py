"""Loads the toy_facts data from this folder, whatever the working directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"


def load_facts(fact_set: str, **_: Any):  # type: ignore[no-untyped-def]
    """A DatasetDict with one ``test`` split: the facts of ``data/<fact_set>.jsonl``."""
    return _load(DATA / f"{fact_set}.jsonl")


def load_choices(fact_set: str, **_: Any):  # type: ignore[no-untyped-def]
    """The multiple-choice documents of ``data/mc_<fact_set>.jsonl`` (toy_choice_* tasks)."""
    return _load(DATA / f"mc_{fact_set}.jsonl")


def _load(path: Path):  # type: ignore[no-untyped-def]
    import json

    import datasets

    if not path.is_file():
        raise FileNotFoundError(f"toy_facts: no data file {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
