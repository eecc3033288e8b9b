"""The study driver end to end: real Ray workers, real lm-eval, SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import ray
import torch

from evomerge.evaluate import build_evaluator
from evomerge.evaluate.model_loading import load_model_for_eval
from evomerge.merge.engine import merge_to_folder
from evomerge.merge.recipe import open_recipe_models, parse_recipe, plan_recipe
from evomerge.optimize import Objective
from evomerge.study import StudyStore
from evomerge.study.config import parse_study_config
from evomerge.study.driver import StudyDriver
from tests.test_study_store import url  # noqa: F401  (the SQLite / PostgreSQL fixture)

EVALUATOR = {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}


@pytest.fixture(scope="module", autouse=True)
def ray_session():  # type: ignore[no-untyped-def]
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100_000_000, log_to_driver=False
    )
    threads = torch.get_num_threads()
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.mark.timeout(300)
def test_study_completes_its_budget_and_the_export_scores_as_recorded(toy_zoo, url, tmp_path):  # noqa: F811
    config = parse_study_config(
        {
            "name": "toy",
            "storage": url,
            "base": str(toy_zoo["base"]),
            "sources": [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
            "space": "task_arithmetic_global",
            "proposer": {"kind": "tpe", "seed": 0},
            "objectives": [{"metric": "toy_facts_a/acc"}, {"metric": "toy_facts_b/acc"}],
            "evaluators": [EVALUATOR],
            "budget": 14,
            "cluster": {"workers": 2},
        },
        "study",
    )
    store = StudyStore(url)
    StudyDriver(store, config).run()
    trials = store.trials("toy")
    assert len(trials) == 14 and {t.state for t in trials} == {"COMPLETE"}
    assert [t.role for t in trials[:5]] == ["source", "source", "uniform", "uniform", "uniform"]
    assert trials[0].metrics["toy_facts_a/acc"] == 1.0  # ft_a alone
    assert len({t.worker for t in trials}) == 2  # both workers got work
    assert store.studies()[0]["status"] == "finished"
    objectives = [Objective(metric="toy_facts_a/acc"), Objective(metric="toy_facts_b/acc")]
    front = store.pareto("toy", objectives)
    assert front
    best = next(t for t in front if t.recipe is not None and t.role != "source")
    recipe = parse_recipe(best.recipe)
    out = merge_to_folder(plan_recipe(recipe, open_recipe_models(recipe)), tmp_path / "merged")
    model, tokenizer = load_model_for_eval(out)
    assert build_evaluator(EVALUATOR, model, tokenizer).evaluate().metrics == best.metrics
