"""The study database on SQLite and on PostgreSQL: real databases, no mocks."""

from __future__ import annotations

import pytest
import sqlalchemy

from evomerge.errors import ConfigError
from evomerge.optimize import Objective
from evomerge.study import StorageError, StudyStore, mask_url
from evomerge.study.schema import SCHEMA_VERSION

OBJECTIVES = [Objective(metric="a/acc"), Objective(metric="b/acc")]


def test_studies_trials_metrics_round_trip(url):
    store = StudyStore(url)
    store.create_study("one", {"budget": 5, "space": "x"}, budget=5)
    store.create_study("two", {"budget": 3}, budget=3)
    assert store.study_config("one") == {"budget": 5, "space": "x"}
    store.add_trial("one", 0, role="source", label="ft_a")
    store.add_trial(
        "one", 1, role="proposal", label="p0", genome=[0.25, 0.5], recipe={"m": 1}, proposal_id=0
    )
    store.finish_trial(
        "one",
        0,
        state="COMPLETE",
        metrics={"a/acc": 1.0, "b/acc": 0.1},
        worker="w0",
        merge_seconds=0.01,
        eval_seconds=0.2,
    )
    store.finish_trial("one", 1, state="FAILED", error="RuntimeError: NaN in layers.0")
    trials = store.trials("one")
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].metrics == {"a/acc": 1.0, "b/acc": 0.1} and trials[0].fidelity == "full"
    assert trials[1].genome == [0.25, 0.5] and trials[1].recipe == {"m": 1}
    assert trials[1].state == "FAILED" and "NaN" in (trials[1].error or "")
    assert store.trials("two") == []
    summary = {s["name"]: s for s in store.studies()}
    assert (
        summary["one"]["trials"] == {"COMPLETE": 1, "FAILED": 1} and summary["two"]["budget"] == 3
    )


def test_pareto_compares_full_fidelity_scores_only(url):
    store = StudyStore(url)
    store.create_study("s", {}, budget=10)
    points = {0: (1.0, 0.1), 1: (0.1, 1.0), 2: (0.5, 0.5), 3: (0.4, 0.4)}
    for number, (a, b) in points.items():
        store.add_trial("s", number, role="proposal", label=f"p{number}")
        store.finish_trial("s", number, state="COMPLETE", metrics={"a/acc": a, "b/acc": b})
    # A lucky cheap score (12 documents) that would dominate everything is not compared...
    store.add_trial("s", 4, role="proposal", label="p4")
    store.finish_trial("s", 4, state="COMPLETE", metrics={"a/acc": 1.0, "b/acc": 1.0}, limit=12)
    assert {t.number for t in store.pareto("s", OBJECTIVES)} == {0, 1, 2}
    cheap = store.trials("s")[4]
    assert (cheap.fidelity, cheap.metrics, cheap.values(OBJECTIVES)) == ("limit=12", {}, None)
    assert cheap.values(OBJECTIVES, "limit=12") == [1.0, 1.0]
    # ...until it is scored on all documents; then its full score counts, the cheap one stays.
    store.add_metrics("s", 4, {"a/acc": 0.45, "b/acc": 0.45}, limit=None)
    assert {t.number for t in store.pareto("s", OBJECTIVES)} == {0, 1, 2}
    store.add_metrics("s", 4, {"a/acc": 0.6, "b/acc": 0.6}, limit=None)  # a re-score replaces
    assert {t.number for t in store.pareto("s", OBJECTIVES)} == {0, 1, 4}
    trial = store.trials("s")[4]
    assert trial.fidelity == "full" and trial.metrics == {"a/acc": 0.6, "b/acc": 0.6}
    assert trial.scores["limit=12"] == {"a/acc": 1.0, "b/acc": 1.0}
    # Held-out scores are their own fidelity, never the highest one.
    store.add_metrics("s", 4, {"a/acc": 0.5, "b/acc": 0.55}, limit=None, split="holdout")
    trial = store.trials("s")[4]
    assert trial.fidelity == "full" and trial.holdout == {"a/acc": 0.5, "b/acc": 0.55}
    assert trial.values(OBJECTIVES, "holdout") == [0.5, 0.55]


@pytest.mark.parametrize(
    ("version", "missing"), [(2, ["scored_with", "timings"]), (3, ["timings"])]
)
def test_an_older_schema_is_upgraded_in_place(url, version, missing):
    store = StudyStore(url)
    store.create_study("s", {}, budget=1)
    store.add_trial("s", 0, role="proposal", label="p0")
    store.finish_trial("s", 0, state="COMPLETE", metrics={"a/acc": 0.5, "b/acc": 0.5})
    with store.engine.begin() as connection:  # what that schema had: fewer columns
        for column in missing:
            connection.execute(sqlalchemy.text(f"ALTER TABLE evomerge_trials DROP COLUMN {column}"))
        connection.execute(
            sqlalchemy.text(
                f"UPDATE evomerge_meta SET value = '{version}' WHERE key = 'schema_version'"
            )
        )
    store.engine.dispose()
    upgraded = StudyStore(url)
    assert upgraded.trials("s")[0].metrics == {"a/acc": 0.5, "b/acc": 0.5}
    assert upgraded.trials("s")[0].scored_with is None and upgraded.trials("s")[0].timings == {}
    upgraded.add_trial("s", 1, role="proposal", label="p1")
    timings = {"merge_math": 0.25, "copy": 0.5, "batch_sizes": {"lm_eval": 8}}
    upgraded.finish_trial("s", 1, state="COMPLETE", scored_with="bfloat16 on cpu", timings=timings)
    assert upgraded.trials("s")[1].scored_with == "bfloat16 on cpu"
    assert upgraded.trials("s")[1].timings == timings
    with upgraded.engine.connect() as connection:
        version = connection.execute(
            sqlalchemy.text("SELECT value FROM evomerge_meta WHERE key = 'schema_version'")
        ).scalar_one()
    assert version == str(SCHEMA_VERSION)


def test_requeue_and_snapshots(url):
    store = StudyStore(url)
    store.create_study("s", {}, budget=4)
    for number in range(3):
        store.add_trial("s", number, role="proposal", label=f"p{number}")
    store.finish_trial("s", 0, state="COMPLETE", metrics={"a/acc": 1.0, "b/acc": 0.0})
    assert store.requeue_running("s") == [1, 2]
    assert {t.state for t in store.trials("s")[1:]} == {"QUEUED"}
    assert store.latest_snapshot("s") is None
    for told in range(5):
        store.save_snapshot("s", bytes([told]) * 1000, told=told)
    assert store.latest_snapshot("s") == (bytes([4]) * 1000, 4)
    with StudyStore(url).engine.connect() as connection:
        kept = connection.execute(sqlalchemy.text("SELECT count(*) FROM evomerge_snapshots"))
        assert kept.scalar() == 2  # older snapshots are pruned


def test_clear_errors(url, tmp_path):
    store = StudyStore(url)
    store.create_study("s", {}, budget=1)
    with pytest.raises(ConfigError, match="already exists"):
        store.create_study("s", {}, budget=1)
    with pytest.raises(ConfigError, match=r"no study 'missing'.*it has: s"):
        store.trials("missing")
    with pytest.raises(ConfigError, match="no trial 7"):
        store.finish_trial("s", 7, state="COMPLETE")


def test_no_collision_with_optuna_tables_in_one_database(url):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = StudyStore(url)
    store.create_study("shared", {}, budget=1)
    study = optuna.create_study(storage=url, study_name="shared")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    store.add_trial("shared", 0, role="source", label="x")
    names = set(sqlalchemy.inspect(store.engine).get_table_names())
    assert {"studies", "trials"} <= names  # Optuna's tables
    assert {n for n in names if n.startswith("evomerge_")} == {
        "evomerge_meta",
        "evomerge_studies",
        "evomerge_trials",
        "evomerge_metrics",
        "evomerge_snapshots",
        "evomerge_exports",
        "evomerge_inspections",
        "evomerge_documents",
    }
    assert len(study.trials) == 1 and len(store.trials("shared")) == 1


def test_newer_schema_is_refused(url):
    store = StudyStore(url)
    with store.engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE evomerge_meta SET value = :v WHERE key = 'schema_version'"),
            {"v": str(SCHEMA_VERSION + 1)},
        )
    with pytest.raises(StorageError, match="newer evomerge"):
        StudyStore(url)


def test_one_driver_holds_a_study_at_a_time(url):
    import socket
    import subprocess
    from datetime import timedelta

    from evomerge.study.schema import StudyRow, utcnow
    from evomerge.study.store import StudyBusy

    store = StudyStore(url)
    store.create_study("toy", {}, budget=3)
    store.create_study("other", {}, budget=3)
    store.acquire("toy", "hostA:1:a")
    with pytest.raises(StudyBusy, match=r"hostA:1:a, alive 0 s ago"):
        store.acquire("toy", "hostB:2:b")
    store.acquire("other", "hostB:2:b")  # another study in the same database: no conflict
    store.acquire("toy", "hostA:1:a")  # the holder may re-acquire
    assert store.heartbeat("toy", "hostA:1:a") and not store.heartbeat("toy", "hostB:2:b")

    def age_lease(seconds: float) -> None:
        with store.session() as session:
            session.execute(
                sqlalchemy.update(StudyRow)
                .where(StudyRow.name == "toy")
                .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
            )

    age_lease(59)
    with pytest.raises(StudyBusy):
        store.acquire("toy", "hostB:2:b")
    age_lease(61)  # no heartbeat for longer than the lease: the holder is presumed dead
    store.acquire("toy", "hostB:2:b")
    assert not store.heartbeat("toy", "hostA:1:a")  # the old holder learns it lost the lease
    store.release("toy", "hostA:1:a")  # and cannot release the new holder's lease
    assert store.study("toy")["owner"] == "hostB:2:b"
    store.release("toy", "hostB:2:b")
    assert store.study("toy")["owner"] is None

    gone = subprocess.Popen(["true"])
    gone.wait()
    store.acquire("toy", f"{socket.gethostname()}:{gone.pid}:x")  # a process of this host...
    store.acquire("toy", "hostC:3:c")  # ...that is gone frees its lease at once


def test_an_earlier_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "old.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:  # what a schema-1 build left: no newer tables or columns
        connection.execute(sqlalchemy.text("CREATE TABLE evomerge_meta (key TEXT, value TEXT)"))
        connection.execute(
            sqlalchemy.text("INSERT INTO evomerge_meta VALUES ('schema_version', '1')")
        )
        connection.execute(sqlalchemy.text("CREATE TABLE evomerge_studies (id INTEGER)"))
    with pytest.raises(
        StorageError, match=rf"schema 1; this one needs {SCHEMA_VERSION}.*new database"
    ):
        StudyStore(path)
    with engine.begin() as connection:
        meta = connection.execute(sqlalchemy.text("SELECT * FROM evomerge_meta")).all()
    assert meta == [("schema_version", "1")]
    assert set(sqlalchemy.inspect(engine).get_table_names()) == {
        "evomerge_meta",
        "evomerge_studies",
    }


def test_unreachable_database_and_masked_password(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        StudyStore(tmp_path / "missing" / "study.db")
    url = "postgresql+psycopg://user:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(StorageError) as caught:
        StudyStore(url)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    assert mask_url(url) == "postgresql+psycopg://user:***@127.0.0.1:1/nowhere"
    store = StudyStore(tmp_path / "plain.db")  # a plain path is an SQLite file
    assert store.is_sqlite and (tmp_path / "plain.db").exists()


def _open_after(barrier, url):  # type: ignore[no-untyped-def]
    barrier.wait()
    try:
        StudyStore(url)
    except Exception as exc:  # reported to the parent
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_processes_opening_a_new_database_at_once_all_succeed(url):
    """A driver starting while ``evomerge status`` polls: both create the schema at once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(6, mp_context=context) as pool:
        barrier = manager.Barrier(6)
        outcomes = list(pool.map(_open_after, [barrier] * 6, [url] * 6))
    assert outcomes == ["ok"] * 6
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        meta = connection.execute(sqlalchemy.text("SELECT * FROM evomerge_meta")).all()
    engine.dispose()
    assert meta == [("schema_version", str(SCHEMA_VERSION))]
