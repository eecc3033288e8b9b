"""One fidelity per comparison: promotions, what the front and `best` compare, the hours reserve.

The driver runs in this process against a real SQLite database and a real merge worker (no
Ray); expected values are worked out by hand or recomputed from the stored scores.
"""

from __future__ import annotations

import time
from collections import deque

import pytest

from evomerge.optimize import Objective, scalarize
from evomerge.optimize.objectives import crowding_distance, nondominated_order
from evomerge.study import StudyStore
from evomerge.study.driver import StudyDriver
from evomerge.study.read import select_trial
from evomerge.study.status import study_status
from tests.study_helpers import TOY_OBJECTIVES, drive, study_config

ACC_AND_LOSS = [
    Objective(metric="a/acc", direction="maximize"),
    Objective(metric="b/loss", direction="minimize"),
]
# (acc, loss) with the loss on a scale 100 times larger: a weighted sum is decided by the loss.
POINTS = [[0.9, 50.0], [0.5, 10.0], [0.95, 60.0], [0.3, 5.0], [0.85, 55.0]]


def test_nondominated_order_by_hand():
    # Rank 0: 0, 1, 2, 3 (4 is dominated by 0). Within it, 2 and 3 are the extremes of both
    # objectives (infinite crowding); 0 and 1 get (0.95-0.5)/0.65 + (60-10)/55 = 1.6014 and
    # (0.9-0.3)/0.65 + (50-5)/55 = 1.7413: 1 before 0. Rank 1: 4.
    assert nondominated_order(POINTS, ACC_AND_LOSS) == [2, 3, 1, 0, 4]
    signed = [[a, -loss] for a, loss in POINTS[:4]]
    import numpy as np

    distance = crowding_distance(np.array(signed))
    assert distance[2] == distance[3] == float("inf")
    assert distance[0] == pytest.approx(0.45 / 0.65 + 50 / 55)
    assert distance[1] == pytest.approx(0.6 / 0.65 + 45 / 55)
    # The weighted sum would pick the two lowest losses (3, then 1) and never the best acc.
    by_sum = sorted(range(5), key=lambda i: -scalarize(ACC_AND_LOSS, POINTS[i]))
    assert by_sum[:2] == [3, 1]


def _config(toy_zoo, storage, **changes):  # type: ignore[no-untyped-def]
    """The toy study with cheap scores on 6 documents, 40% of every 5 promoted."""
    fidelity = {"limit": 6, "promote": 0.4, "batch": 5}
    return study_config(toy_zoo, storage, **{"fidelity": fidelity, "budget": 10, **changes})


def test_a_pareto_proposer_promotes_by_nondominated_rank(toy_zoo, tmp_path):
    objectives = [
        {"metric": "a/acc", "direction": "maximize"},
        {"metric": "b/loss", "direction": "minimize"},
    ]
    store = StudyStore(tmp_path / "s.db")
    for kind, expected in (("nsga2", [12, 13]), ("cma", [13, 11])):
        config = _config(
            toy_zoo,
            str(tmp_path / "s.db"),
            name=kind,
            proposer={"kind": kind, "seed": 0},
            objectives=objectives,
        )
        driver = StudyDriver(store, config)
        assert driver.proposer.multi_objective == (kind == "nsga2")  # cma: one scalar
        driver.batch = [(values, 10 + i) for i, values in enumerate(POINTS)]
        driver._promote_batch()
        # nsga2: the extremes of each objective (rank 0, infinite crowding); a single-objective
        # proposer promotes by the weighted sum, which the loss's scale decides.
        assert list(driver.promotions) == expected


def test_only_full_scores_are_compared_and_promotions_use_the_cheap_ones(toy_zoo, worker, tmp_path):
    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    cma = {"kind": "cma", "seed": 0, "popsize": 5}  # one scalar: promoted by weighted sum
    driver = StudyDriver(store, _config(toy_zoo, storage, budget=15, proposer=cma))
    driver.begin()
    drive(driver, worker, workers=1)
    trials = store.trials("toy")
    objectives = [Objective(**o) for o in TOY_OBJECTIVES]
    proposals = [t for t in trials if t.role == "proposal"]
    assert len(proposals) == 10
    promoted = [t for t in proposals if t.metrics]
    cheap_only = [t for t in proposals if not t.metrics]
    assert len(promoted) == 2 + 2 and len(cheap_only) == 6  # 40% of two batches of 5
    for batch in (proposals[:5], proposals[5:]):  # promoted by what the proposer was told
        told = {t.number: scalarize(objectives, t.told.values) for t in batch}
        ranked = sorted(told, key=lambda n: (-told[n], n))
        assert {t.number for t in batch if t.metrics} == set(ranked[:2])
    full = [t for t in trials if t.values(objectives) is not None]
    best = max(full, key=lambda t: (scalarize(objectives, t.values(objectives)), -t.number))
    assert driver.best == pytest.approx(scalarize(objectives, best.values(objectives)))
    assert select_trial(store, "toy", "best").number == best.number
    assert {t.fidelity for t in store.pareto("toy", objectives)} == {"full"}
    assert set(driver.front) == {t.number for t in store.pareto("toy", objectives)}
    status = study_status(store, "toy")
    assert status["best_weighted"]["trial"] == best.number
    assert status["best_weighted"]["fidelity"] == "full"
    assert status["fidelities"]["cheap_only"] == 6
    assert status["fidelities"]["counts"] == {"full": 5 + 4, "limit=6": 10}
    # A worker records how it scored.
    assert {t.scored_with for t in trials} == {"float32 on cpu"}


def test_promote_zero_is_refused_and_promote_has_a_default(toy_zoo, tmp_path):
    from evomerge.errors import ConfigError

    refused = r"fidelity\.promote: must be more than 0, got 0: .*front"
    with pytest.raises(ConfigError, match=refused):
        _config(toy_zoo, str(tmp_path / "s.db"), fidelity={"limit": 6, "promote": 0})
    assert _config(toy_zoo, "x.db", fidelity={"limit": 6}).fidelity.promote == 0.25


def test_an_hours_budget_keeps_time_for_the_queued_promotions(toy_zoo, tmp_path):
    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    config = _config(toy_zoo, storage, budget={"hours": 1.0}, fidelity={"limit": 6, "promote": 0.5})
    driver = StudyDriver(store, config)
    driver.begin()
    recipe = driver.queue[0].recipe
    for number in (20, 21):
        store.add_trial("toy", number, role="proposal", label=f"p{number}", recipe=recipe)
    driver.full_seconds = [100.0]  # a full score takes 100 s; 2 workers
    driver.batch = [([0.4, 0.4], 20), ([0.9, 0.9], 21)]  # promote 0.5: one promotion to come
    driver.started = time.monotonic()
    driver.elapsed_before = 3600 - 60  # 60 s left: more than one promotion over 2 workers
    assert driver.next_task() is not None and not driver.closing  # a baseline: time enough
    driver.elapsed_before = 3600 - 40  # 40 s left < one promotion's 100 s over 2 workers
    task = driver.next_task()
    assert driver.closing and task is not None and task.key in driver.jobs
    assert driver.jobs[task.key].promotion and driver.jobs[task.key].number == 21
    assert task.limit is None  # a full score
    assert driver.next_task() is None  # no new proposal, no queued baseline
    assert driver.queue  # the baselines left wait for a resume with more time
    assert deque() == driver.promotions
