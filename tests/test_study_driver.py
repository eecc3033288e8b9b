"""The study driver end to end: real Ray workers, real lm-eval, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.evaluate import build_evaluator
from evomerge.optimize import Objective
from evomerge.study import StudyStore
from evomerge.study.config import parse_study_config
from evomerge.study.driver import StudyDriver
from evomerge.study.export import export_trial

pytestmark = pytest.mark.usefixtures("ray_session")  # one Ray for the whole module

EVALUATOR = {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}


@pytest.mark.timeout(300)
def test_study_completes_its_budget_and_the_export_scores_as_recorded(toy_zoo, url, tmp_path):
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
    assert all(t.load_seconds and t.load_seconds > 0 for t in trials)  # the worker's start-up
    assert all(t.merge_seconds and t.eval_seconds for t in trials)
    assert store.studies()[0]["status"] == "finished"
    objectives = [Objective(metric="toy_facts_a/acc"), Objective(metric="toy_facts_b/acc")]
    front = store.pareto("toy", objectives)
    assert front
    best = next(t for t in front if t.role != "source")
    result = export_trial(store, "toy", f"pareto:{front.index(best) + 1}", tmp_path / "merged")
    assert result.number == best.number and not result.verified
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    assert build_evaluator(EVALUATOR, model, tokenizer).evaluate().metrics == best.metrics


DIE_ONCE = '''
import os


def die_once(model, tokenizer, armed, limit=None):
    """The first call after the test arms it kills its worker process mid-trial."""
    try:
        os.rename(armed, armed + ".fired")
    except FileNotFoundError:
        return {"alive": 1.0}
    os._exit(1)
'''


def _config(toy_zoo, storage, tmp_path, **changes):  # type: ignore[no-untyped-def]
    (tmp_path / "die.py").write_text(DIE_ONCE)
    data = {
        "name": "toy",
        "storage": storage,
        "base": str(toy_zoo["base"]),
        "sources": [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
        "space": "task_arithmetic_global",
        "proposer": {"kind": "random", "seed": 0},
        "objectives": [{"metric": "toy_facts_a/acc"}, {"metric": "toy_facts_b/acc"}],
        "evaluators": [
            EVALUATOR,
            {
                "kind": "python",
                "function": f"{tmp_path / 'die.py'}:die_once",
                "options": {"armed": str(tmp_path / "armed")},
            },
        ],
        "budget": 10,
        "cluster": {"workers": 2},
    }
    data.update(changes)
    return parse_study_config(data, "study")


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_trial_is_replaced_and_the_trial_run_again(toy_zoo, tmp_path):
    db = str(tmp_path / "s.db")
    config = _config(toy_zoo, db, tmp_path, baselines=False)
    (tmp_path / "armed").touch()
    store = StudyStore(db)
    StudyDriver(store, config).run()
    assert (tmp_path / "armed.fired").exists()  # a worker did die
    trials = store.trials("toy")
    assert len(trials) == 10 and {t.state for t in trials} == {"COMPLETE"}
    assert sorted(t.attempts for t in trials) == [1] * 9 + [2]  # the killed trial ran again once


@pytest.mark.timeout(300)
def test_an_hours_budget_stops_the_study_and_counts_time_over_runs(toy_zoo, tmp_path):
    db = str(tmp_path / "s.db")
    config = _config(toy_zoo, db, tmp_path, budget={"hours": 8 / 3600}, baselines=False)
    store = StudyStore(db)
    summary = StudyDriver(store, config).run()
    assert summary.status == "finished" and "hours" in summary.reason
    elapsed = store.studies()[0]["elapsed_seconds"]
    assert 8 <= elapsed < 60  # worker start-up counts against the hours too
    ran = len(store.trials("toy"))
    again = StudyDriver.for_stored(store, "toy").run()  # the time is used up already
    assert again.ran == 0 and len(store.trials("toy")) == ran


def _swallowed_ctrl_c() -> None:
    """A Ctrl-C that lands in code catching it (as wsgiref's and some libraries' handlers do)."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
    except KeyboardInterrupt:
        pass


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "stop",
    [
        lambda: os.kill(os.getpid(), signal.SIGTERM),
        _swallowed_ctrl_c,  # a plain Ctrl-C: tests/test_study_launch.py, on the command
    ],
    ids=["sigterm", "ctrl_c_swallowed"],
)
def test_a_stop_signal_stops_the_study_and_the_handlers_from_before_come_back(
    toy_zoo, tmp_path, stop
):
    """`ray job stop`, `kill` and schedulers send SIGTERM: the study must stop cleanly
    (recorded results kept, trials in flight requeued, status `stopped`), not just exit."""
    db = str(tmp_path / "s.db")
    config = _config(toy_zoo, db, tmp_path, baselines=False)
    store = StudyStore(db)
    results = []

    def on_result(result):  # type: ignore[no-untyped-def]
        results.append(result)
        if len(results) == 3:
            stop()

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    summary = StudyDriver(store, config).run(on_result=on_result)
    assert summary.status == "stopped"
    assert {s: signal.getsignal(s) for s in before} == before
    assert store.study("toy")["status"] == "stopped"
    states = [t.state for t in store.trials("toy")]
    assert "RUNNING" not in states and 3 <= states.count("COMPLETE") < 10
    # Resuming it to the budget: tests/test_cluster_scripts.py, after a real `ray job stop`.


def _same_named(toy_zoo, tmp_path):  # type: ignore[no-untyped-def]
    """ft_a and ft_b copied into folders both called `final`: runs/math/final, runs/code/final."""
    math_, code = tmp_path / "runs" / "math" / "final", tmp_path / "runs" / "code" / "final"
    shutil.copytree(toy_zoo["ft_a"], math_)
    shutil.copytree(toy_zoo["ft_b"], code)
    return math_, code


@pytest.mark.timeout(300)
def test_sources_in_same_named_folders_each_get_genes_and_the_study_completes(toy_zoo, tmp_path):
    math_, code = _same_named(toy_zoo, tmp_path)
    db = str(tmp_path / "s.db")
    config = _config(
        toy_zoo,
        db,
        tmp_path,
        sources=[str(math_), str(code)],
        evaluators=[EVALUATOR],
        budget=8,
        cluster={"workers": 1},
    )
    store = StudyStore(db)
    driver = StudyDriver(store, config)
    assert driver.space.sources == ["math/final", "code/final"]
    assert {g.source for g in driver.space.genes} == {"math/final", "code/final"}
    recipe = driver.space.decode([0.25, 0.75], config.base, config.sources)
    assert [s.label for s in recipe.sources] == ["math/final", "code/final"]
    assert all("weight" in s.parameters for s in recipe.sources)
    driver.run()
    trials = store.trials("toy")
    assert len(trials) == 8 and {t.state for t in trials} == {"COMPLETE"}, [t.error for t in trials]
    assert [t.label for t in trials[:2]] == ["math/final", "code/final"]
    assert trials[0].metrics["toy_facts_a/acc"] == 1.0  # math/final is ft_a alone


def test_two_paths_of_one_source_folder_are_refused_at_the_start(toy_zoo, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(toy_zoo["ft_a"])
    db = str(tmp_path / "s.db")
    config = _config(toy_zoo, db, tmp_path, sources=[str(toy_zoo["ft_a"]), str(alias)])
    with pytest.raises(ConfigError) as info:
        StudyDriver(StudyStore(db), config)
    assert str(toy_zoo["ft_a"]) in str(info.value) and str(alias) in str(info.value)
    assert not StudyStore(db).studies()
