"""Resume and promotion in the study driver, with a real worker run in process (no Ray).

The driver is driven by hand here (``begin``, ``next_task``, ``on_result``) so a "crash" can
happen at an exact point: the driver object is dropped with trials in flight, as SIGKILL would
leave it, and a new driver resumes from the database alone. The Ray path (a real SIGKILL of a
real driver process) is in tests/test_study_launch.py.
"""

from __future__ import annotations

import pytest

from evomerge.cluster.worker import CandidateTask
from evomerge.errors import ConfigError
from evomerge.optimize import Objective, scalarize
from evomerge.study import StudyStore
from evomerge.study.config import parse_study_config
from evomerge.study.driver import StudyDriver
from tests.study_helpers import TOY_EVALUATOR, TOY_OBJECTIVES, drive


def _config(toy_zoo, storage, **changes):  # type: ignore[no-untyped-def]
    data = {
        "name": "toy",
        "storage": storage,
        "base": str(toy_zoo["base"]),
        "sources": [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
        "space": "task_arithmetic_global",
        "proposer": {"kind": "cma", "seed": 3, "popsize": 4},
        "objectives": TOY_OBJECTIVES,
        "evaluators": [TOY_EVALUATOR],
        "budget": 16,
    }
    data.update(changes)
    return parse_study_config(data, "study")


def _crash(driver: StudyDriver) -> None:
    """Drop ``driver`` as SIGKILL would: its lease now names a process of this host that is
    gone (which frees it at once; a live driver's lease would refuse the resume)."""
    import socket
    import subprocess

    from sqlalchemy import update

    from evomerge.study.schema import StudyRow

    gone = subprocess.Popen(["true"])
    gone.wait()
    with driver.store.session() as session:
        session.execute(
            update(StudyRow)
            .where(StudyRow.name == driver.name)
            .values(owner=f"{socket.gethostname()}:{gone.pid}:crashed")
        )


@pytest.mark.parametrize(
    ("kind", "snapshot_every", "ahead"),
    [("cma", 3, 0), ("tpe", 3, 0), ("nsga2", 3, 0), ("cma", 1000, 0), ("cma", 3, 2)],
)
def test_resume_after_a_crash_finishes_exactly_the_budget(
    toy_zoo, worker, tmp_path, kind, snapshot_every, ahead
):
    # Every 3 results: the crash comes after a snapshot and after results told since it.
    # Every 1000: no snapshot at all, everything is replayed from a fresh proposer.
    # ahead: CMA-ES asks ahead at its generation boundaries (3 tasks in flight, popsize 4), so
    # results arrive after their generation's update, and the replay must drop them alike.
    storage = str(tmp_path / "s.db")
    proposer = {"kind": kind, "seed": 3} | ({"popsize": 4} if kind == "cma" else {})
    if ahead:
        proposer["ask_ahead"] = ahead
    config = _config(toy_zoo, storage, proposer=proposer, snapshot_every=snapshot_every)
    store = StudyStore(storage)
    first = StudyDriver(store, config)
    first.begin()
    left = drive(first, worker, stop_after=9)
    lost = [first.jobs[t.key].number for t in left]
    assert len(lost) == 3
    before = {t.number: t for t in store.trials("toy")}
    snapshot = store.latest_snapshot("toy")
    told = first.proposer.n_told + first.proposer.n_failed
    if snapshot_every == 3:
        assert snapshot is not None and 0 < snapshot[1] < told  # results to replay after it
    else:
        assert snapshot is None
    at_crash = (first.proposer.next_id, first.proposer.pending, first.proposer.n_told)
    _crash(first)  # nothing else is written

    second = StudyDriver.for_stored(StudyStore(storage), "toy")
    assert second.finished == 9
    # The proposer continues where it was, not from its snapshot or from scratch.
    assert (second.proposer.next_id, second.proposer.pending, second.proposer.n_told) == at_crash
    assert [t.number for t in list(second.queue)[:3]] == sorted(lost)
    assert all(t.recipe == before[t.number].recipe for t in list(second.queue)[:3])
    assert {t.state for t in store.trials("toy", ["QUEUED"])} == {"QUEUED"}
    second.begin()
    drive(second, worker)

    trials = store.trials("toy")
    assert [t.number for t in trials] == list(range(16))
    assert {t.state for t in trials} == {"COMPLETE"}
    ids = [t.proposal_id for t in trials if t.role == "proposal"]
    assert sorted(ids) == list(range(len(ids)))  # every proposal once, none lost
    assert second.proposer.n_told + second.proposer.n_failed == len(ids)
    assert second.proposer.pending == []
    for number in lost:  # re-run with the recipe they were given before the crash
        assert trials[number].recipe == before[number].recipe


def test_resume_refuses_a_stored_genome_the_proposer_does_not_propose(toy_zoo, worker, tmp_path):
    import json

    from sqlalchemy import update

    from evomerge.study.schema import TrialRow
    from evomerge.study.store import StorageError

    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    first = StudyDriver(store, _config(toy_zoo, storage))
    first.begin()
    left = drive(first, worker, stop_after=9)
    last = max(first.jobs[t.key].number for t in left)
    assert first.jobs[left[-1].key].proposal_id >= first.proposer.n_told  # asked after a tell
    _crash(first)
    with store.session() as session:  # as if the proposer had become nondeterministic
        session.execute(
            update(TrialRow).where(TrialRow.number == last).values(genome=json.dumps([0.1, 0.1]))
        )
    with pytest.raises(StorageError, match=f"another genome .* \\(trial {last}\\)"):
        StudyDriver.for_stored(store, "toy")
    # The config is checked too: a proposer restored under other settings is refused.
    config = store.study_config("toy")
    config["proposer"]["seed"] = 4
    from evomerge.study.schema import StudyRow

    with store.session() as session:
        session.execute(update(StudyRow).values(config=json.dumps(config)))
    # (Refused by the snapshot's own check if there is one, else by the replay.)
    with pytest.raises((ConfigError, StorageError), match=r"saved with config|another genome"):
        StudyDriver.for_stored(store, "toy")


def test_a_resumed_study_with_nothing_left_does_nothing(toy_zoo, worker, tmp_path):
    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    first = StudyDriver(store, _config(toy_zoo, storage, budget=6))
    first.begin()
    drive(first, worker)
    _crash(first)
    second = StudyDriver.for_stored(store, "toy")
    assert second.finished == 6 and not second.queue and second.next_task() is None


def test_the_best_of_each_batch_is_promoted_to_full_fidelity(toy_zoo, worker, tmp_path):
    storage = str(tmp_path / "s.db")
    config = _config(
        toy_zoo,
        storage,
        proposer={"kind": "random", "seed": 1},
        fidelity={"limit": 6, "promote": 0.5, "batch": 4},
        budget=15,  # 5 baselines + 10 proposals: batches of 4, 4 and a last one of 2
    )
    store = StudyStore(storage)
    driver = StudyDriver(store, config)
    driver.begin()
    drive(driver, worker, workers=1, stop_after=13)  # two batches done, promotions queued
    assert list(driver.promotions) or driver.jobs
    _crash(driver)
    resumed = StudyDriver.for_stored(store, "toy")
    resumed.begin()
    drive(resumed, worker, workers=1)

    objectives = [Objective(**o) for o in TOY_OBJECTIVES]
    trials = store.trials("toy")
    assert len(trials) == 15
    assert all(t.fidelity == "full" for t in trials if t.role != "proposal")
    proposals = [t for t in trials if t.role == "proposal"]
    promoted = {t.number for t in proposals if t.fidelity == "full"}
    assert len(promoted) == 2 + 2 + 1
    cheap = _cheap_scores(store, objectives)
    for batch in (proposals[:4], proposals[4:8], proposals[8:]):
        ranked = sorted(batch, key=lambda t: (-cheap[t.number], t.number))
        chosen = {t.number for t in ranked[: (len(batch) + 1) // 2]}
        assert chosen <= promoted and not ({t.number for t in batch} - chosen) & promoted
    # The full-fidelity scores are those of all documents: the worker's full evaluation.
    number = min(promoted)
    task = CandidateTask(key=0, recipe=trials[number].recipe or {})
    assert worker.run(task).metrics == trials[number].metrics


def _cheap_scores(store: StudyStore, objectives: list[Objective]) -> dict[int, float]:
    from sqlalchemy import select

    from evomerge.study.schema import MetricRow, TrialRow

    with store.session() as session:
        rows = session.execute(
            select(TrialRow.number, MetricRow.name, MetricRow.value)
            .join(MetricRow, MetricRow.trial_id == TrialRow.id)
            .where(MetricRow.fidelity == "limit=6")
        ).all()
    metrics: dict[int, dict[str, float]] = {}
    for number, name, value in rows:
        metrics.setdefault(number, {})[name] = value
    return {n: scalarize(objectives, [m[o.metric] for o in objectives]) for n, m in metrics.items()}


def test_resume_on_postgresql(toy_zoo, worker, url):
    config = _config(toy_zoo, url, budget=10)
    store = StudyStore(url)
    first = StudyDriver(store, config)
    first.begin()
    drive(first, worker, stop_after=6)
    _crash(first)
    second = StudyDriver.for_stored(StudyStore(url), "toy")
    second.begin()
    drive(second, worker)
    trials = store.trials("toy")
    assert [t.number for t in trials] == list(range(10))
    assert {t.state for t in trials} == {"COMPLETE"}
