"""Plain helpers and constants shared by the study tests (their shared fixtures are in
conftest.py): the toy study and its exports, `evomerge search` / `resume` started as a user
starts them, and the hand-worked study that `evomerge status` is checked against."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from evomerge.cli import main
from evomerge.study import StudyStore
from evomerge.study.config import StudyConfig, parse_study_config
from evomerge.study.schema import ExportRow

# -- the toy study: the toy zoo scored on its two fact tasks -----------------------------------

TOY_EVALUATOR = {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}
TOY_METRICS = ("toy_facts_a/acc", "toy_facts_b/acc")
TOY_OBJECTIVES = [{"metric": "toy_facts_a/acc"}, {"metric": "toy_facts_b/acc"}]

# The genomes that the `scored` fixture scores, and the trials that `fill` adds after them.
GENOMES = [[0.1, 0.1], [0.5, 0.5], [0.9, 0.2], [0.2, 0.9], [0.6, 0.45]]
SCORE_LIMIT = 20
FAILED_TRIAL, RUNNING_TRIAL = len(GENOMES), len(GENOMES) + 1


def study_config(zoo: dict[str, Path], storage: str, **extra: Any) -> StudyConfig:
    return parse_study_config(
        {
            "name": "toy",
            "storage": storage,
            "base": str(zoo["base"]),
            "sources": [str(zoo["ft_a"]), str(zoo["ft_b"])],
            "space": "task_arithmetic_global",
            "proposer": {"kind": "random", "seed": 0},
            "objectives": [{"metric": m} for m in TOY_METRICS],
            "evaluators": [TOY_EVALUATOR],
            "budget": 5,
            **extra,
        },
        "study",
    )


def fill(
    storage: str, zoo: dict[str, Path], rows: list[dict[str, Any]], **extra: Any
) -> StudyStore:
    """Study 'toy': one COMPLETE trial per genome, then a FAILED and a RUNNING one."""
    store = StudyStore(storage)
    config = study_config(zoo, storage, **extra)
    store.create_study("toy", config.model_dump(mode="json"), 5)
    for number, row in enumerate(rows):
        store.add_trial(
            "toy", number, role="proposal", label=f"proposal {number}", recipe=row["recipe"]
        )
        store.finish_trial("toy", number, state="COMPLETE", metrics=row["full"], worker="w0")
    store.add_trial("toy", FAILED_TRIAL, role="proposal", label="bad", recipe=rows[0]["recipe"])
    store.finish_trial("toy", FAILED_TRIAL, state="FAILED", error="RuntimeError: NaN in layers.0")
    store.add_trial("toy", RUNNING_TRIAL, role="proposal", label="busy", recipe=rows[0]["recipe"])
    return store


def run(args: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: "), err
    return lines[0]


def export_rows(store: StudyStore) -> list[tuple[int, str, bool]]:
    with store.session() as session:
        rows = session.scalars(select(ExportRow).order_by(ExportRow.id)).all()
        return [(r.trial_number, r.path, r.verified) for r in rows]


def drive(
    driver: Any, worker: Any, *, workers: int = 3, stop_after: int | None = None
) -> list[Any]:
    """Keep up to ``workers`` tasks in flight, finishing the oldest first, until nothing is
    left or ``stop_after`` trials finished in all; returns the tasks still in flight."""
    in_flight: deque[Any] = deque()
    while True:
        while len(in_flight) < workers:
            task = driver.next_task()
            if task is None:
                break
            in_flight.append(task)
        if not in_flight or (stop_after is not None and driver.finished >= stop_after):
            return list(in_flight)
        driver.on_result(worker.run(in_flight.popleft()))


# -- `evomerge search` and `evomerge resume` as a user runs them --------------------------------

NAP = """
import time


def nap(model, tokenizer, seconds=0.25, limit=None):
    time.sleep(seconds)
    return {"slept": seconds}
"""


def write_study_yaml(folder: Path, zoo: dict, **changes: object) -> Path:
    (folder / "nap.py").write_text(NAP)
    data = {
        "name": "toy",
        "base": str(zoo["base"]),
        "sources": [str(zoo["ft_a"]), str(zoo["ft_b"])],
        "space": "task_arithmetic_global",
        "proposer": {"kind": "cma", "seed": 0, "popsize": 6},
        "objectives": [{"metric": "toy_facts_a/acc"}, {"metric": "toy_facts_b/acc"}],
        "evaluators": [
            {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]},
            {"kind": "python", "function": "nap.py:nap"},
        ],
        "budget": 24,
        "cluster": {"workers": 2},
    }
    data.update(changes)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ignore_sigint() -> None:
    """In the child: SIGINT ignored, as a shell script's background commands inherit it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_cli(*args: str, **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra_env)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", *args, "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint,  # SIGINT must stop it all the same (it did not, once)
    )


# -- the hand-worked study of `evomerge status`, `pareto` and `dashboard` -----------------------

REPORT_OBJECTIVES = [
    {"metric": "a/acc", "direction": "maximize", "weight": 1.0},
    {"metric": "b/loss", "direction": "minimize", "weight": 0.5},
]
DIED_TWICE = "WorkerDied: worker died 2 times running this candidate (last: OOM)"
DIED_ONCE = "WorkerDied: worker died once running this candidate (last: gone)"
TIMED_OUT = "TrialTimeout: timed out after 60 s"
NAN = "evomerge.errors.EvaluationError: objective values [nan]"
REPORT_TRIALS = [  # number, role, label, worker, (a/acc, b/loss), limit, merge s, eval s, error
    (0, "source", "ft_a", "w0", (0.9, 0.8), None, 1.0, 10.0, None),
    (1, "source", "ft_b", "w1", (0.2, 0.1), None, 3.0, 20.0, None),
    (2, "uniform", "uniform", "w0", (0.5, 0.5), None, 2.0, 12.0, None),
    (3, "proposal", "proposal 0", "w1", (0.95, 0.2), 10, 1.0, 4.0, None),
    (4, "proposal", "proposal 1", "w0", None, None, None, None, DIED_TWICE),
    (5, "proposal", "proposal 2", "w1", None, None, 2.0, None, TIMED_OUT),
    (6, "proposal", "proposal 3", "w1", None, None, None, None, DIED_ONCE),
    (7, "proposal", "proposal 4", "w0", (0.6, 0.6), 10, 2.0, 5.0, None),
    (8, "proposal", "proposal 5", "w0", None, None, 1.0, 3.0, NAN),
]


def make_report_study(database: str) -> StudyStore:
    """Study "s": max a/acc, min b/loss (weights 1, 0.5); budget 20 trials or 2 hours.

    The trials of REPORT_TRIALS finished in order; trial 3 is promoted from limit=10 (0.95,
    0.2) to full fidelity (0.7, 0.3); trial 9 is RUNNING and trial 10 QUEUED.
    """
    store = StudyStore(database)
    config = {"objectives": REPORT_OBJECTIVES, "budget": {"trials": 20, "hours": 2.0}}
    store.create_study("s", config, budget=20)
    store.set_status("s", "running")
    for number, role, label, worker, values, limit, merge, evaluate, error in REPORT_TRIALS:
        store.add_trial("s", number, role=role, label=label)
        store.finish_trial(
            "s",
            number,
            state="FAILED" if error else "COMPLETE",
            metrics=dict(zip(("a/acc", "b/loss"), values)) if values else None,
            limit=limit,
            worker=worker,
            attempts=2 if error == DIED_TWICE else 1,
            error=error,
            merge_seconds=merge,
            eval_seconds=evaluate,
        )
    store.add_metrics("s", 3, {"a/acc": 0.7, "b/loss": 0.3}, limit=None)
    store.add_trial("s", 9, role="proposal", label="proposal 6")
    store.add_trial("s", 10, role="proposal", label="proposal 7", state="QUEUED")
    return store
