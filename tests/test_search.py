"""The in-process search loop on the toy zoo: real merges, real lm-eval, seeded outcomes."""

from __future__ import annotations

import math

import pytest

from evomerge.checkpoint import ModelFolder
from evomerge.errors import ConfigError, EvaluationError
from evomerge.inprocess import InProcessSearch
from evomerge.optimize import Objective, build_proposer, dominates, parse_proposer_config
from evomerge.space import load_space

FACTS_AB = [{"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}]
MEAN_AB = [
    Objective(metric="toy_facts_a/acc", weight=0.5),
    Objective(metric="toy_facts_b/acc", weight=0.5),
]


def _search(zoo, space_name: str, objectives=MEAN_AB, evaluators=FACTS_AB):  # type: ignore[no-untyped-def]
    space = load_space(space_name).bind(ModelFolder(zoo["base"]), ["ft_a", "ft_b"])
    return InProcessSearch(space, zoo["base"], [zoo["ft_a"], zoo["ft_b"]], objectives, evaluators)


def _mean(trial) -> float:  # type: ignore[no-untyped-def]
    return (trial.metrics["toy_facts_a/acc"] + trial.metrics["toy_facts_b/acc"]) / 2


def test_cma_per_layer_search_beats_every_uniform_merge(toy_zoo):
    search = _search(toy_zoo, "task_arithmetic_per_layer")
    x0 = search.space.uniform_genomes()[1].tolist()  # the uniform 0.8 merge
    proposer = build_proposer(
        parse_proposer_config({"kind": "cma", "seed": 1, "sigma0": 0.2, "x0": x0}),
        search.space.dimension,
        MEAN_AB,
    )
    result = search.run(proposer, budget=400)
    assert len(result.trials) <= 400
    roles = [t.role for t in result.trials]
    assert roles[:5] == ["source", "source", "uniform", "uniform", "uniform"]
    sources = {t.label: t.metrics for t in result.trials[:2]}
    assert sources["ft_a"]["toy_facts_a/acc"] == 1.0 and sources["ft_b"]["toy_facts_b/acc"] == 1.0
    best_uniform = max(_mean(t) for t in result.trials if t.role == "uniform")
    best = result.best(role="proposal")
    assert _mean(best) >= 0.95
    assert _mean(best) >= best_uniform + 0.05, (_mean(best), best_uniform)
    # Every objective is recorded, and the best trial's recipe is an ordinary, exportable recipe.
    assert best.values == [best.metrics["toy_facts_a/acc"], best.metrics["toy_facts_b/acc"]]
    assert best.recipe is not None and best.recipe.method == "task_arithmetic"
    assert result.best() is best or _mean(result.best()) <= _mean(best)


def test_nsga2_finds_a_front_of_trade_offs(toy_zoo):
    search = _search(toy_zoo, "task_arithmetic_global")
    proposer = build_proposer(
        parse_proposer_config({"kind": "nsga2", "seed": 0, "population_size": 12}),
        search.space.dimension,
        MEAN_AB,
    )
    result = search.run(proposer, budget=60)
    front = result.pareto()
    assert len(front) >= 3
    for a in front:
        for b in front:
            if a is not b:
                assert not dominates(a.values, b.values, MEAN_AB)
    assert len({tuple(t.values) for t in front}) == len(front)


def test_failed_candidates_are_recorded_and_the_search_goes_on(toy_zoo, tmp_path):
    module = tmp_path / "flaky.py"
    module.write_text(
        "calls = []\n"
        "def score(model, tokenizer):\n"
        "    calls.append(1)\n"
        "    if len(calls) in (5, 7):  # call 1 discovers the metric names\n"
        "        raise RuntimeError('out of memory (simulated)')\n"
        "    return {'norm': float(sum(p.detach().float().norm() for p in model.parameters()))}\n"
    )
    evaluators = [{"kind": "python", "function": f"{module}:score", "name": "flaky"}]
    objectives = [Objective(metric="flaky/norm", direction="minimize")]
    search = _search(toy_zoo, "task_arithmetic_global", objectives, evaluators)
    proposer = build_proposer(
        parse_proposer_config({"kind": "tpe", "seed": 0}), search.space.dimension, objectives
    )
    seen = []
    result = search.run(proposer, budget=12, on_trial=seen.append)
    assert seen == result.trials and len(result.trials) == 12
    failed = [t for t in result.trials if t.status == "failed"]
    assert [t.number for t in failed] == [3, 5]
    assert all("out of memory (simulated)" in (t.error or "") for t in failed)
    assert proposer.n_failed == 1 and proposer.n_told == 12 - 5 - 1  # trial 3 was a baseline
    assert all(math.isfinite(t.values[0]) for t in result.complete)


def test_objective_metric_must_exist(toy_zoo):
    with pytest.raises(EvaluationError, match=r"toy_facts_z/acc.*toy_facts_a/acc"):
        _search(toy_zoo, "task_arithmetic_global", [Objective(metric="toy_facts_z/acc")])


def test_budget_must_be_positive(toy_zoo):
    search = _search(toy_zoo, "task_arithmetic_global")
    proposer = build_proposer(
        parse_proposer_config({"kind": "random"}), search.space.dimension, MEAN_AB
    )
    with pytest.raises(ConfigError, match="at least 1"):
        search.run(proposer, budget=0)
    result = search.run(proposer, budget=3)  # fewer than the baselines: they are cut short
    assert [t.role for t in result.trials] == ["source", "source", "uniform"]
