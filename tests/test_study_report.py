"""`evomerge status` and `evomerge pareto` (# column, --plot) on real SQLite and PostgreSQL.

Every expected number below is worked out by hand from the trials that ``make_report_study``
writes (tests/study_helpers.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from evomerge.cli import main
from evomerge.plots.pareto import staircase
from evomerge.study import StudyStore
from evomerge.study.schema import StudyRow, TrialRow
from evomerge.study.status import error_type, study_status
from tests.study_helpers import REPORT_OBJECTIVES, TIMED_OUT, make_report_study

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _set_times(store: StudyStore, elapsed: float) -> None:
    """Trial n created at T0 + n min; finished ones 330 s later; the study's elapsed time."""
    with store.session() as session:
        session.query(StudyRow).filter_by(name="s").one().elapsed_seconds = elapsed
        for trial in session.query(TrialRow).all():
            trial.created_at = T0 + timedelta(minutes=trial.number)
            if trial.finished_at is not None:
                trial.finished_at = trial.created_at + timedelta(seconds=330)


def test_status_numbers_by_hand(url):
    store = make_report_study(url)
    _set_times(store, elapsed=0.0)
    status = study_status(store, "s", latest=3)
    assert status["study"] == "s" and status["status"] == "running"
    assert status["states"] == {"QUEUED": 1, "RUNNING": 1, "COMPLETE": 5, "FAILED": 4}
    # No driver time recorded: trial 0 created at T0, trial 8 finished last at T0 + 8 min + 330 s.
    assert status["progress"] == {
        "finished": 9,
        "budget_trials": 20,
        "trials_percent": pytest.approx(45.0),
        "elapsed_seconds": pytest.approx(810.0),
        "elapsed_from": "trials",
        "budget_hours": 2.0,
        "hours_percent": pytest.approx(11.25),
    }
    assert status["trials_per_hour"] == pytest.approx(40.0)  # 9 trials in 810 s
    failures = status["failures"]
    assert failures["count"] == 4
    assert failures["reasons"] == [
        {"type": "WorkerDied", "count": 2},
        {"type": "EvaluationError", "count": 1},
        {"type": "TrialTimeout", "count": 1},
    ]
    assert [f["trial"] for f in failures["latest"]] == [8, 6, 5]
    assert failures["latest"][0]["finished_at"].startswith("2024-05-01T12:13:30")
    assert failures["latest"][2]["error"] == TIMED_OUT and failures["latest"][2]["worker"] == "w1"
    # Trial 3's full-fidelity (0.7, 0.3) counts, not its limit=10 (0.95, 0.2).
    best_a, best_b = status["best"]
    assert best_a == {
        "metric": "a/acc",
        "direction": "maximize",
        "trial": 0,
        "value": 0.9,
        "fidelity": "full",
        "role": "source",
        "label": "ft_a",
        "holdout_value": None,
    }
    assert (best_b["trial"], best_b["value"], best_b["label"]) == (1, 0.1, "ft_b")
    # Trial 7 has only its limit=10 score: counted apart, never compared with full scores.
    assert status["fidelities"]["counts"] == {"full": 4, "limit=10": 2}
    assert status["fidelities"]["cheap_only"] == 1
    assert status["fidelities"]["best_cheap"]["trial"] == 7
    assert status["fidelities"]["best_cheap"]["value"] == pytest.approx(0.3)
    # a - 0.5 b: 0.5, 0.15, 0.25, 0.55, 0.3 for trials 0, 1, 2, 3, 7.
    weighted = status["best_weighted"]
    assert (weighted["trial"], weighted["fidelity"]) == (3, "full")
    assert weighted["value"] == pytest.approx(0.55) and weighted["values"] == [0.7, 0.3]
    assert status["pareto_size"] == 3  # 0, 1, 3; trial 3 dominates 2 and 7
    assert status["workers"] == [
        {
            "worker": "w0",
            "trials": 5,
            "failed": 2,
            "mean_merge_seconds": 1.5,
            "mean_eval_seconds": 7.5,
        },
        {
            "worker": "w1",
            "trials": 4,
            "failed": 2,
            "mean_merge_seconds": 2.0,
            "mean_eval_seconds": 12.0,
        },
    ]

    _set_times(store, elapsed=1800.0)  # the driver's own clock wins once it has one
    progress = study_status(store, "s")
    assert progress["progress"]["elapsed_from"] == "driver"
    assert progress["progress"]["hours_percent"] == pytest.approx(25.0)
    assert progress["trials_per_hour"] == pytest.approx(18.0)
    assert len(progress["failures"]["latest"]) == 4


def test_status_of_an_empty_study_and_other_budgets(tmp_path):
    store = StudyStore(tmp_path / "s.db")
    store.create_study(
        "hours", {"objectives": REPORT_OBJECTIVES, "budget": {"hours": 1.5}}, budget=10**9
    )
    store.create_study("count", {"objectives": REPORT_OBJECTIVES, "budget": 7}, budget=7)
    store.create_study("bare", {}, budget=3)
    status = study_status(store, "hours")
    assert status["progress"]["budget_trials"] is None
    assert status["progress"]["trials_percent"] is None
    assert status["progress"]["budget_hours"] == 1.5
    assert status["progress"]["elapsed_from"] is None and status["trials_per_hour"] is None
    assert status["states"] == {"QUEUED": 0, "RUNNING": 0, "COMPLETE": 0, "FAILED": 0}
    assert [b["trial"] for b in status["best"]] == [None, None]
    assert status["best_weighted"] is None and status["pareto_size"] == 0
    assert status["workers"] == [] and status["failures"]["count"] == 0
    count = study_status(store, "count")["progress"]
    assert (count["budget_trials"], count["budget_hours"]) == (7, None)
    bare = study_status(store, "bare")  # a config without objectives or budget
    assert bare["progress"]["budget_trials"] == 3 and bare["best"] == []


def test_error_types():
    assert error_type("WorkerDied: worker died once (last: x: y)") == "WorkerDied"
    assert error_type("evomerge.errors.EvaluationError: no metric a") == "EvaluationError"
    assert error_type("segfault in worker\nmore") == "segfault in worker"
    assert error_type(None) == error_type("  ") == "unknown"


def test_staircase_follows_the_directions():
    # Both maximized: x ascending, then down to the next point's y.
    points = [(1.0, 0.1), (0.1, 1.0), (0.9, 0.8)]
    assert staircase(points, (1.0, 1.0)) == [
        (0.1, 1.0),
        (0.1, 0.8),
        (0.9, 0.8),
        (0.9, 0.1),
        (1.0, 0.1),
    ]
    # Max x, min y: the dominated region lies up and left, so the steps go up.
    points = [(0.9, 0.8), (0.2, 0.1), (0.7, 0.3)]
    assert staircase(points, (1.0, -1.0)) == [
        (0.2, 0.1),
        (0.2, 0.3),
        (0.7, 0.3),
        (0.7, 0.8),
        (0.9, 0.8),
    ]
    # Min x, max y: x descending.
    assert staircase([(0.1, 0.1), (0.5, 0.9)], (-1.0, 1.0)) == [
        (0.5, 0.9),
        (0.5, 0.1),
        (0.1, 0.1),
    ]
    assert staircase([(0.3, 0.4)], (1.0, 1.0)) == [(0.3, 0.4)]


def test_status_cli_text_and_json(url, capsys):
    store = make_report_study(url)
    _set_times(store, elapsed=1800.0)
    assert main(["status", "--storage", url, "--study", "s", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(study_status(store, "s")))
    assert main(["status", "--storage", url, "--study", "s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("study 's': running (created ")
    assert lines[1] == "progress   9/20 trials finished (45.0%); 30m 00s of 2h 00m (25.0%)"
    assert lines[2] == "trials     5 complete, 4 failed, 1 running, 1 queued; 18.0 trials/hour"
    assert lines[3] == "failures   4: WorkerDied 2, EvaluationError 1, TrialTimeout 1"
    pad = " " * 11
    assert lines[4:8] == [
        pad + "trial 8 (proposal 5 on w0): evomerge.errors.EvaluationError: objective values [nan]",
        pad + "trial 6 (proposal 3 on w1): WorkerDied: worker died once running this candidate "
        "(last: gone)",
        pad + "trial 5 (proposal 2 on w1): TrialTimeout: timed out after 60 s",
        pad + "trial 4 (proposal 1 on w0): WorkerDied: worker died 2 times running this "
        "candidate (last: OOM)",
    ]
    assert lines[-10:] == [
        "best       a/acc (maximize)       0.9000  trial 0     ft_a",
        "           b/loss (minimize)      0.1000  trial 1     ft_b",
        "           weighted sum           0.5500  trial 3     proposal 0",
        "           (full fidelity: every searched-on document)",
        "fidelity   scored trials by fidelity: full 4, limit=10 2; "
        "1 not (yet) scored on all documents",
        "           best cheap score (not comparable): 0.3000 at limit=10, trial 7 proposal 4",
        "pareto     3 trial(s) on the front (evomerge pareto --study s)",
        "workers    worker  trials  failed  merge s   eval s",
        "           w0           5       2     1.50     7.50",
        "           w1           4       2     2.00    12.00",
    ]


def test_status_unknown_study_is_one_line(tmp_path, capsys):
    StudyStore(tmp_path / "s.db").create_study("s", {"objectives": REPORT_OBJECTIVES}, budget=1)
    assert main(["status", "--storage", str(tmp_path / "s.db"), "--study", "nope"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no study 'nope'" in err


def test_pareto_rank_column_and_json(url, capsys):
    make_report_study(url)
    assert main(["pareto", "--storage", url, "--study", "s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["#", "trial"]
    # Best weighted sum first: trial 3 (0.55), trial 0 (0.5), trial 1 (0.15).
    assert [line.split()[:2] for line in lines[1:4]] == [["1", "3"], ["2", "0"], ["3", "1"]]
    assert lines[1].split()[2:] == ["0.7000", "0.3000", "proposal", "0"]
    assert lines[4].startswith("scores on the searched-on documents")
    assert lines[5] == "3 trial(s) on the Pareto front of study 's'"
    assert main(["pareto", "--storage", url, "--study", "s", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["rank"], r["trial"], r["role"]) for r in rows] == [
        (1, 3, "proposal"),
        (2, 0, "source"),
        (3, 1, "source"),
    ]
    assert rows[0]["holdout_values"] is None and "holdout" not in rows[0]["scores"]
    # Held-out scores sit beside the searched-on ones, in the table and the JSON.
    store = StudyStore(url)
    store.add_metrics("s", 3, {"a/acc": 0.6, "b/loss": 0.35}, None, split="holdout")
    assert main(["pareto", "--storage", url, "--study", "s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2:] == [
        "a/acc",
        "a/acc",
        "held",
        "out",
        "b/loss",
        "b/loss",
        "held",
        "out",
        "label",
    ]
    assert lines[1].split()[2:6] == ["0.7000", "0.6000", "0.3000", "0.3500"]
    assert lines[2].split()[2:6] == ["0.9000", "-", "0.8000", "-"]
    assert main(["pareto", "--storage", url, "--study", "s", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["holdout_values"] == [0.6, 0.35]
    assert rows[0]["scores"]["holdout"] == {"a/acc": 0.6, "b/loss": 0.35}
    assert rows[0]["scores"]["limit=10"] == {"a/acc": 0.95, "b/loss": 0.2}
    assert main(["status", "--storage", url, "--study", "s"]) == 0
    status_text = capsys.readouterr().out
    assert "weighted sum           0.5500  trial 3     proposal 0  held out 0.4250" in status_text


def _plot_db(tmp_path: Path) -> str:
    """Studies with 1, 2 and 3 objectives over the same trials, and one with none complete."""
    (tmp_path / "db").mkdir()
    path = tmp_path / "db" / "s.db"
    store = StudyStore(path)
    third = {"metric": "c/x", "direction": "maximize", "weight": 1.0}
    configs = {
        "one": REPORT_OBJECTIVES[:1],
        "two": REPORT_OBJECTIVES,
        "three": [*REPORT_OBJECTIVES, third],
    }
    rows = [
        ("source", "ft_a", 0.9, 0.8, 0.3),
        ("source", "ft_b", 0.2, 0.1, 0.5),
        ("uniform", "uniform", 0.5, 0.5, 0.4),
        ("proposal", "p0", 0.7, 0.3, 0.9),
        ("proposal", "p1", 0.6, 0.6, 0.1),
    ]
    for study, objectives in configs.items():
        store.create_study(study, {"objectives": objectives}, budget=10)
        for number, (role, label, a, b, c) in enumerate(rows):
            store.add_trial(study, number, role=role, label=label)
            metrics = {"a/acc": a, "b/loss": b, "c/x": c}
            store.finish_trial(study, number, state="COMPLETE", metrics=metrics)
        store.add_trial(study, 5, role="proposal", label="p2")
        store.finish_trial(study, 5, state="FAILED", error="WorkerDied: x")
    store.create_study("none", {"objectives": REPORT_OBJECTIVES}, budget=10)
    store.add_trial("none", 0, role="proposal", label="p0")
    store.finish_trial("none", 0, state="FAILED", error="TrialTimeout: x")
    return str(path)


@pytest.mark.parametrize(("study", "front"), [("one", 1), ("two", 3), ("three", 3)])
def test_pareto_plot_is_a_png(tmp_path, capsys, study, front):
    storage = _plot_db(tmp_path)
    out = tmp_path / "plots" / f"{study}.png"
    out.parent.mkdir()
    out.write_bytes(b"an older plot")
    assert main(["pareto", "--storage", storage, "--study", study, "--plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        f"{front} trial(s) on the Pareto front" in printed and f"plot written to {out}" in printed
    )
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) >= 400
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left


def test_pareto_plot_errors_are_one_line_and_leave_no_file(tmp_path, capsys):
    storage = _plot_db(tmp_path)
    cases = [
        (["--study", "two", "--plot", str(tmp_path / "front.jpg")], "ending in .png"),
        (["--study", "two", "--plot", str(tmp_path / "no" / "front.png")], "does not exist"),
        (["--study", "none", "--plot", str(tmp_path / "front.png")], "no complete trial"),
    ]
    for extra, message in cases:
        assert main(["pareto", "--storage", storage, *extra]) == 1
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and message in captured.err
        assert captured.out == ""
    assert [p.name for p in tmp_path.iterdir()] == ["db"]


def test_a_failed_plot_keeps_the_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, handle, **kwargs):  # type: ignore[no-untyped-def]
        handle.write(b"half a png")
        raise RuntimeError("disk trouble")

    storage = _plot_db(tmp_path)
    out = tmp_path / "plots" / "front.png"
    out.parent.mkdir()
    out.write_bytes(b"the old plot")
    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk trouble"):
        main(["pareto", "--storage", storage, "--study", "two", "--plot", str(out)])
    assert out.read_bytes() == b"the old plot"
    assert [p.name for p in out.parent.iterdir()] == ["front.png"]


def test_a_lucky_cheap_score_is_never_best(url, capsys):
    """A proposal scored on 12 documents with a perfect score loses to full scores everywhere."""
    from evomerge.study.read import select_trial

    store = StudyStore(url)
    store.create_study("s", {"objectives": REPORT_OBJECTIVES, "budget": 3}, budget=3)
    for number, metrics, limit in [
        (0, {"a/acc": 0.6, "b/loss": 0.4}, None),
        (1, {"a/acc": 1.0, "b/loss": 0.0}, 12),  # lucky on 12 documents, never promoted
        (2, {"a/acc": 0.5, "b/loss": 0.3}, None),
    ]:
        store.add_trial("s", number, role="proposal", label=f"p{number}")
        store.finish_trial("s", number, state="COMPLETE", metrics=metrics, limit=limit)
    assert select_trial(store, "s", "best").number == 0  # 0.6 - 0.2 = 0.4 > 0.5 - 0.15
    status = study_status(store, "s")
    assert status["best_weighted"]["trial"] == 0
    assert [b["trial"] for b in status["best"]] == [0, 2]
    assert status["pareto_size"] == 2
    assert status["fidelities"]["best_cheap"]["trial"] == 1
    assert main(["pareto", "--storage", url, "--study", "s", "--json"]) == 0
    assert [r["trial"] for r in json.loads(capsys.readouterr().out)] == [0, 2]


def test_status_says_how_often_cma_restarted_and_why(tmp_path, capsys):
    """The proposer's own notes come from its latest snapshot (so they survive a resume)."""
    from evomerge.optimize import build_proposer

    store = make_report_study(str(tmp_path / "s.db"))
    proposer = build_proposer({"kind": "cma", "popsize": 4}, 3, [{"metric": "a/acc"}])
    for _ in range(4 + 8 + 2):  # two generations of equal scores: two restarts
        proposal = proposer.ask()
        assert proposal is not None
        proposer.tell(proposal.id, [0.25])
    store.save_snapshot("s", proposer.state_dict(), 14)
    assert study_status(store, "s")["proposer"] == {
        "CMA-ES restarts": "2 (tie: all fitnesses equal)",
        "CMA-ES run": "3: population 16, 0 generations done",
    }
    assert main(["status", "--storage", str(tmp_path / "s.db"), "--study", "s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [
        "proposer   CMA-ES restarts: 2 (tie: all fitnesses equal)",
        "           CMA-ES run: 3: population 16, 0 generations done",
    ]
