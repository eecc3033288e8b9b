"""Shared fixtures: tiny model families built once per test session, fully offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from evomerge.zoo import build_random_family


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft_0, ft_1, ft_2: float32 Llama, 4 layers, untied embeddings."""
    return build_random_family(tmp_path_factory.mktemp("family"), sources=3, seed=0)


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft_0, ft_1: float32 Llama, 3 layers, tied input/output embeddings."""
    return build_random_family(
        tmp_path_factory.mktemp("tied"), sources=2, seed=1, layers=3, tie_embeddings=True
    )


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft_0, ft_1: bfloat16 Llama, 2 layers."""
    return build_random_family(
        tmp_path_factory.mktemp("bf16"), sources=2, seed=2, layers=2, dtype=torch.bfloat16
    )


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default trained toy zoo (base, ft_a, ft_b), built once per test run (~20 s)."""
    from evomerge.toy_zoo import build_toy_zoo

    return build_toy_zoo(tmp_path_factory.mktemp("toy") / "zoo")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the fault tests last: they stop the shared PostgreSQL server and kill workers and
    exports, and in two full runs the Ctrl-C test that followed them saw its `search` finish
    with exit 0 after SIGINT (it passes alone and in its own file). A KeyboardInterrupt
    swallowed on the way would do that; the driver now remembers the signal and stops at the
    next result anyway. Nothing runs after them now."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_study_faults.py"))
