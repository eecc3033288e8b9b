"""Faults a cluster really has, against real Ray workers, a real PostgreSQL server and a real
filesystem: a worker killed mid-merge or mid-evaluation, the database restarted under a
running study or gone for longer than the driver waits, an export killed or out of disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from evomerge.cluster.worker import CandidateTask
from evomerge.study import StudyStore
from evomerge.study.config import parse_study_config
from evomerge.study.driver import StudyDriver
from evomerge.study.read import select_trial
from tests.study_helpers import (
    TOY_EVALUATOR,
    TOY_OBJECTIVES,
    export_rows,
    fill,
    one_line_error,
    run,
    start_cli,
    write_study_yaml,
)

POSTGRES = os.environ.get(
    "EVOMERGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _cluster() -> list[str]:
    """``pg_ctlcluster`` arguments for the local server on port 5432, or skip."""
    if shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        pytest.skip("needs pg_ctlcluster and root to restart the local PostgreSQL")
    if "127.0.0.1:5432" not in POSTGRES and "localhost:5432" not in POSTGRES:
        pytest.skip("the test PostgreSQL is not the local server")
    listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True)
    for line in listed.stdout.splitlines():
        version, name, port, *_ = line.split()
        if port == "5432":
            return ["pg_ctlcluster", "--skip-systemctl-redirect", version, name]
    pytest.skip("no local PostgreSQL cluster on port 5432")


def _server(action: str, cluster: list[str]) -> None:
    extra = ["-m", "fast"] if action == "stop" else []
    subprocess.run([*cluster, action, *extra], check=True, capture_output=True, timeout=60)


@pytest.fixture
def pg_url() -> Iterator[str]:
    schema = f"evomerge_fault_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(POSTGRES, pool_pre_ping=True)
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _finished(url: str) -> int:
    """Trials finished so far (0 while the study or the server is not there)."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM evomerge_trials WHERE state IN ('COMPLETE', 'FAILED')"
                )
            ).scalar_one()
    except sqlalchemy.exc.SQLAlchemyError:
        return 0
    finally:
        engine.dispose()


def _wait_until_finished(url: str, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while _finished(url) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {count} finished trials within 180 s"
        time.sleep(0.1)


def _assert_exact_budget(store: StudyStore, budget: int) -> None:
    trials = store.trials("toy")
    assert [t.number for t in trials] == list(range(budget))
    assert {t.state for t in trials} == {"COMPLETE"}
    ids = [t.proposal_id for t in trials if t.role == "proposal"]
    assert sorted(ids) == list(range(len(ids)))
    seqs = sorted(t.told.seq for t in trials if t.told is not None)
    assert seqs == list(range(len(ids)))  # every proposal told once: the proposer continued


@pytest.mark.timeout(420)
def test_postgres_restarted_mid_study_the_driver_retries_and_finishes(toy_zoo, tmp_path, pg_url):
    cluster = _cluster()
    path = write_study_yaml(tmp_path, toy_zoo, budget=20, storage=pg_url, snapshot_every=3)
    search = start_cli("search", str(path))
    _wait_until_finished(pg_url, 4, search)
    _server("stop", cluster)
    try:
        time.sleep(4)  # longer than one retry: the backoff has to keep going
        assert search.poll() is None  # still waiting for the database
    finally:
        _server("start", cluster)
    _, err = search.communicate(timeout=300)
    assert search.returncode == 0, err
    assert "lost the database" in err and "retrying for up to 120 s" in err
    _assert_exact_budget(StudyStore(pg_url), 20)


@pytest.mark.timeout(420)
def test_postgres_down_past_the_retries_stops_with_a_resume_line(toy_zoo, tmp_path, pg_url):
    cluster = _cluster()
    path = write_study_yaml(tmp_path, toy_zoo, budget=16, storage=pg_url)
    search = start_cli("search", str(path), EVOMERGE_DB_RETRY_SECONDS="2")
    _wait_until_finished(pg_url, 4, search)
    before = {t.number: t.metrics for t in StudyStore(pg_url).trials("toy")}
    _server("stop", cluster)
    try:
        _, err = search.communicate(timeout=120)
    finally:
        _server("start", cluster)
    assert search.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("evomerge: error: database"), err
    assert "unreachable for 2 s" in last and f"continue with: evomerge resume {path}" in last

    resume = start_cli("resume", str(path))  # as the line says
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    store = StudyStore(pg_url)
    _assert_exact_budget(store, 16)
    for number, metrics in before.items():  # nothing recorded before the outage changed
        if metrics:
            assert store.trials("toy")[number].metrics == metrics


ALIVE = """
def alive(model, tokenizer, limit=None):
    return {"alive": 1.0}
"""


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "failpoint",
    [
        "mid_merge=100",  # each worker process dies in its 3rd merge, the model half merged
        "mid_evaluation=5",  # ... in its 3rd trial, after lm-eval scored it, before the next
    ],
)
def test_a_worker_killed_mid_merge_or_mid_evaluation_loses_nothing(
    toy_zoo,
    tmp_path,
    monkeypatch,
    worker,
    failpoint,
):
    (tmp_path / "alive.py").write_text(ALIVE)
    config = parse_study_config(
        {
            "name": "toy",
            "storage": str(tmp_path / "s.db"),
            "base": str(toy_zoo["base"]),
            "sources": [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
            "space": "task_arithmetic_global",
            "proposer": {"kind": "random", "seed": 0},
            "objectives": TOY_OBJECTIVES,
            "evaluators": [
                TOY_EVALUATOR,
                {"kind": "python", "function": f"{tmp_path / 'alive.py'}:alive"},
            ],
            "budget": 6,  # each first worker dies in its 3rd trial; replacements finish
            "baselines": False,
            # A re-run may land on a worker at its own fatal pass and die again: room for that.
            "cluster": {"workers": 2, "max_attempts": 6},
        },
        tmp_path / "study.yaml",
    )
    monkeypatch.setenv("EVOMERGE_FAILPOINTS", failpoint)  # read by the Ray workers it starts
    store = StudyStore(tmp_path / "s.db")
    summary = StudyDriver(store, config).run()
    assert summary.status == "finished"
    trials = store.trials("toy")
    assert [t.number for t in trials] == list(range(6))
    assert {t.state for t in trials} == {"COMPLETE"}
    attempts = [t.attempts for t in trials]
    assert max(attempts) >= 2  # some were killed, and ran again on a replacement worker
    for trial in trials:  # a half-merged or half-scored model never leaked into a score
        clean = worker.run(CandidateTask(key=0, recipe=trial.recipe or {})).metrics
        assert {**clean, "alive/alive": 1.0} == trial.metrics, trial.number


# -- export: killed, or the disk fills ---------------------------------------------------------


def _export_cli(db: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    where = ["--storage", str(db), "--study", "toy", "--trial", "best", "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "export", *where, "--verify", "--quiet"],
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.timeout(300)
def test_an_export_killed_before_its_rename_leaves_nothing_that_looks_complete(
    toy_zoo,
    scored,
    tmp_path,
):
    db = tmp_path / "s.db"
    store = fill(str(db), toy_zoo, scored)
    exports = tmp_path / "exports"
    exports.mkdir()
    killed = _export_cli(db, exports / "m", EVOMERGE_FAILPOINTS="export_before_rename=1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # every file written, verified
    assert _visible(exports) == []  # no `m`: only a hidden folder whose name says "export-"
    leftovers = [p.name for p in exports.iterdir()]
    assert leftovers and all(".evomerge-export-" in name for name in leftovers)
    assert export_rows(store) == []

    again = _export_cli(db, exports / "m")
    assert again.returncode == 0, again.stderr
    assert [p.name for p in exports.iterdir()] == ["m"]  # the abandoned folder was cleaned up
    assert {"README.md", "config.json", "evomerge_recipe.yaml"} <= set(_visible(exports / "m"))
    assert [(n, v) for n, _, v in export_rows(store)] == [
        (select_trial(store, "toy", "best").number, True)
    ]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: far smaller than the toy model's weights (a real ENOSPC)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.timeout(300)
def test_an_export_on_a_full_disk_is_one_line_and_leaves_nothing(
    toy_zoo,
    scored,
    tmp_path,
    small_disk,
    capsys,
):
    store = fill(str(tmp_path / "s.db"), toy_zoo, scored)
    out = small_disk / "m"
    args = ["export", "--storage", tmp_path / "s.db", "--study", "toy", "--trial", "best"]
    code, _, err = run([*args, "--out", out, "--quiet"], capsys)
    assert code == 1
    line = one_line_error(err)
    assert "No space left on device" in line and str(small_disk) in line, line
    assert list(small_disk.iterdir()) == []  # not even a hidden half-written folder
    assert export_rows(store) == []

    code, _, err = run([*args, "--out", tmp_path / "roomy" / "m", "--quiet"], capsys)
    assert code == 0, err  # the same export, where there is room
