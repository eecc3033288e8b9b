"""Shared fixtures: tiny model families built once per test session, fully offline; the study
tests' databases (SQLite and PostgreSQL), Ray session, in-process worker and scored genomes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import torch

from evomerge.random_family import build_random_family

POSTGRES = os.environ.get(
    "EVOMERGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


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


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):  # type: ignore[no-untyped-def]
    """A fresh database: an SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
        return
    yield from _fresh_postgres_schema("evomerge_test")


@pytest.fixture
def postgres_url():  # type: ignore[no-untyped-def]
    """A fresh PostgreSQL schema, dropped afterwards."""
    yield from _fresh_postgres_schema("evomerge_check")


def _fresh_postgres_schema(prefix: str):  # type: ignore[no-untyped-def]
    """Yield the URL of a new schema in the test database; drop it afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(POSTGRES)
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(scope="module")
def ray_session():  # type: ignore[no-untyped-def]
    """A local Ray for the whole module that asks for it (``pytestmark = usefixtures``)."""
    import ray

    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100_000_000, log_to_driver=False
    )
    threads = torch.get_num_threads()
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worker(toy_zoo):  # type: ignore[no-untyped-def]
    """A real merge worker over the toy zoo, run in this process (no Ray)."""
    from evomerge.cluster.worker import MergeWorker, WorkerSpec
    from tests.study_helpers import TOY_EVALUATOR

    threads = torch.get_num_threads()
    spec = WorkerSpec(
        base=str(toy_zoo["base"]),
        sources=[str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
        evaluators=[TOY_EVALUATOR],
        torch_threads=1,
    )
    yield MergeWorker(spec, "in-process")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scored(toy_zoo: dict[str, Path]) -> list[dict[str, Any]]:
    """Each genome's recipe and its metrics on all documents and on SCORE_LIMIT, computed in
    place."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate import build_evaluator
    from evomerge.merge.engine import InPlaceMerger
    from evomerge.merge.recipe import plan_recipe
    from evomerge.space import space_from_setting
    from tests.study_helpers import GENOMES, SCORE_LIMIT, TOY_EVALUATOR, study_config

    config = study_config(toy_zoo, "unused.db")
    folders = [ModelFolder(config.base, label="base"), *(ModelFolder(s) for s in config.sources)]
    space = space_from_setting(config.space).bind(folders[0], [f.label for f in folders[1:]])
    merger = InPlaceMerger(folders)
    model = AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32).eval()
    evaluator = build_evaluator(TOY_EVALUATOR, model, AutoTokenizer.from_pretrained(config.base))
    rows = []
    for genome in GENOMES:
        recipe = space.decode(np.array(genome), config.base, config.sources)
        merger.merge_into(plan_recipe(recipe, folders), model)
        rows.append(
            {
                "recipe": recipe.model_dump(exclude_defaults=True),
                "full": evaluator.evaluate().metrics,
                "limit": evaluator.evaluate(SCORE_LIMIT).metrics,
            }
        )
    evaluator.close()
    return rows


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the fault tests last: they stop the shared PostgreSQL server and kill workers and
    exports, and in two full runs the Ctrl-C test that followed them saw its `search` finish
    with exit 0 after SIGINT (it passes alone and in its own file). A KeyboardInterrupt
    swallowed on the way would do that; the driver now remembers the signal and stops at the
    next result anyway. Nothing runs after them now."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_study_faults.py"))
