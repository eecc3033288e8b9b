"""`evomerge search` and `evomerge resume` as a user runs them: a real driver process, real Ray
workers, real signals. Ctrl-C stops cleanly, SIGKILL loses nothing, and after resuming the
study holds exactly its budget of trials, none twice."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from evomerge.cli import main
from evomerge.study import StudyStore
from tests.study_helpers import start_cli, write_study_yaml


def _wait_for(store_path: Path, finished: int, process: subprocess.Popen) -> None:
    """Until ``finished`` trials are done and one is running (the driver is mid-study)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if store_path.exists():
            try:
                trials = StudyStore(store_path).trials("toy")
            except Exception:  # the study is not created yet
                trials = []
            states = [t.state for t in trials]
            done = sum(s in ("COMPLETE", "FAILED") for s in states)
            if done >= finished and "RUNNING" in states:
                return
        time.sleep(0.05)
    raise AssertionError(f"no {finished} finished trials within 180 s")


def test_search_refuses_an_existing_study_and_bad_configs_in_one_line(toy_zoo, tmp_path, capsys):
    path = write_study_yaml(tmp_path, toy_zoo, storage=str(tmp_path / "s.db"))
    store = StudyStore(tmp_path / "s.db")
    store.create_study("toy", {"objectives": []}, budget=3)
    assert main(["search", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evomerge resume" in err and "toy" in err
    for changes, message in [
        ({"budget": 0}, "budget"),
        ({"proposer": {"kind": "annealing"}}, "annealing"),
        ({"objectives": []}, "objectives"),
        ({"cluster": {"workers": 0}}, "cluster.workers"),
        ({"fidelity": {"limit": 5, "promote": 2}}, "fidelity.promote"),
        ({"space": "no_such_space"}, "ready spaces"),
        ({"colour": "red"}, "colour"),
    ]:
        path = write_study_yaml(tmp_path, toy_zoo, name="other", **changes)
        assert main(["search", str(path), "--quiet"]) == 1, changes
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (changes, err)
    assert (
        not (tmp_path / "evomerge_studies.db").exists()
        or not StudyStore(tmp_path / "evomerge_studies.db").studies()
    )


def test_resume_of_an_unknown_study_names_the_ones_there(tmp_path, capsys):
    store = StudyStore(tmp_path / "s.db")
    store.create_study("alpha", {"objectives": []}, budget=3)
    assert main(["resume", "--storage", str(tmp_path / "s.db"), "--study", "beta"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "it has: alpha" in err


@pytest.mark.timeout(300)
def test_the_demo_runs_a_study_and_exports_a_verified_best_merge(toy_zoo, tmp_path, capsys):
    import shutil

    shutil.copytree(Path(toy_zoo["base"]).parent, tmp_path / "zoo")  # the demo reuses it
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    store = StudyStore(tmp_path / "evomerge_studies.db")
    trials = store.trials("demo")
    assert len(trials) == 125 and {t.state for t in trials} == {"COMPLETE"}
    assert "scores exactly what the database recorded" in out
    assert (tmp_path / "merged" / "evomerge_recipe.yaml").exists()
    best = next(line for line in out.splitlines() if "(trial" in line and "best" in line)
    uniform = [line for line in out.splitlines() if line.strip().startswith("uniform")]
    assert float(best.split()[-1]) > max(float(line.split()[-1]) for line in uniform)
    # The export's card shows the study's plots, drawn from this real study's database.
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    for name in ("pareto", "history", "recipe"):
        image = tmp_path / "merged" / "images" / f"{name}.png"
        assert f"images/{name}.png" in card
        with Image.open(image) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 400
        assert image.stat().st_size > 15_000


def test_a_cluster_that_does_not_answer_is_one_line(toy_zoo, tmp_path, capsys):
    path = write_study_yaml(tmp_path, toy_zoo, cluster={"address": "127.0.0.1:9"})
    assert main(["search", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot join the Ray cluster at 127.0.0.1:9" in err
    store = StudyStore(tmp_path / "evomerge_studies.db")
    assert store.study("toy")["status"] == "stopped"  # resumable once the cluster is up


@pytest.mark.timeout(420)
def test_a_second_driver_is_refused_while_another_study_shares_the_database(toy_zoo, tmp_path):
    slow = {"kind": "python", "function": "nap.py:nap", "options": {"seconds": 1.5}}
    lm_eval = {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}
    # Slow trials: the first study is surely still running when the second driver has started.
    path = write_study_yaml(tmp_path, toy_zoo, budget=14, evaluators=[lm_eval, slow])
    db = tmp_path / "evomerge_studies.db"
    (tmp_path / "other").mkdir()
    other = write_study_yaml(tmp_path / "other", toy_zoo, name="other", storage=str(db), budget=8)

    first = start_cli("search", str(path))
    _wait_for(db, 2, first)
    second = start_cli("resume", "--storage", str(db), "--study", "toy")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1
    assert len(err.strip().splitlines()) == 1 and "being run by another driver" in err, err

    side = start_cli("search", str(other))  # a different study in the same SQLite file, at once
    for process in (first, side):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    store = StudyStore(db)
    for name, budget in (("toy", 14), ("other", 8)):
        trials = store.trials(name)
        assert [t.number for t in trials] == list(range(budget))
        assert {t.state for t in trials} == {"COMPLETE"}
        assert store.study(name)["owner"] is None  # released at the end


KILLS = [  # each resume is SIGKILLed at one fault point (counted within that process)
    "after_add_trial=9",  # during dispatch: a trial written RUNNING, never submitted
    "after_tell=6",  # between a result told to the proposer and its database write
    "in_snapshot=2",  # inside the transaction that writes the proposer's snapshot
]
BUDGET = 32


@pytest.mark.timeout(600)
def test_ctrl_c_then_kills_at_three_fault_points_then_resume_ends_with_exactly_the_budget(
    toy_zoo, tmp_path
):
    """One study through every way a driver stops: Ctrl-C, then a resume SIGKILLed at each
    fault point in turn, then a last resume. (One chain: each process start costs ~25 s.)"""
    path = write_study_yaml(tmp_path, toy_zoo, budget=BUDGET, snapshot_every=3)
    db = tmp_path / "evomerge_studies.db"  # the default storage, beside the YAML

    search = start_cli("search", str(path))
    _wait_for(db, 6, search)
    search.send_signal(signal.SIGINT)
    out, err = search.communicate(timeout=60)
    assert search.returncode == 130, err
    assert f"continue with: evomerge resume {path}" in err  # no URL to copy: the YAML says
    store = StudyStore(db)
    assert store.studies()[0]["status"] == "stopped"
    states = [t.state for t in store.trials("toy")]
    assert "RUNNING" not in states and "QUEUED" in states  # in flight when stopped

    for failpoint in KILLS:
        before = store.trials("toy")
        resume = start_cli(
            "resume", "--storage", str(db), "--study", "toy", EVOMERGE_FAILPOINTS=failpoint
        )
        _, err = resume.communicate(timeout=300)
        assert resume.returncode == -signal.SIGKILL, (failpoint, err)  # died where told to
        after = {t.number: t for t in store.trials("toy")}
        assert len(after) > len(before), failpoint  # it got somewhere before dying
        for old in before:  # nothing recorded before the kill was lost or changed
            if old.state == "COMPLETE":
                assert after[old.number].metrics == old.metrics, (failpoint, old.number)

    final = start_cli("resume", str(path))  # found by its YAML this time
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert f"finished: {BUDGET}/{BUDGET} trials" in out and "Pareto front" in out
    trials = store.trials("toy")
    assert [t.number for t in trials] == list(range(BUDGET))
    assert {t.state for t in trials} == {"COMPLETE"}
    ids = [t.proposal_id for t in trials if t.role == "proposal"]
    assert sorted(ids) == list(range(len(ids)))
    assert len({tuple(t.genome or []) for t in trials if t.role == "proposal"}) == len(ids)
    # Every proposal was told exactly once, in one sequence: the proposer continued each time.
    seqs = sorted(t.told.seq for t in trials if t.told is not None)
    assert seqs == list(range(len(ids)))
    assert store.studies()[0]["status"] == "finished"


def test_a_bfloat16_study_with_holdout_ends_with_held_out_scores_and_a_verified_export(
    toy_zoo, tmp_path, capsys
):
    """`working_dtype: bfloat16` and `holdout: 0.25`: every trial is recorded as scored in
    bfloat16 with its phase timings; the search selects on the other documents; when it ends,
    its front and baselines are scored on the held-out ones (fidelity `holdout`), shown by
    `pareto --json` and on the card of `export --trial best --by holdout --verify`, which
    re-scores the written checkpoint in bfloat16 and reproduces the workers' scores;
    `confirm --redo` in one process gives the Ray workers' numbers again."""
    import json

    evaluator = {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"], "holdout": 0.25}
    path = write_study_yaml(
        tmp_path,
        toy_zoo,
        evaluators=[evaluator],
        proposer={"kind": "random", "seed": 0},
        budget=9,
        storage=str(tmp_path / "s.db"),
        working_dtype="bfloat16",
    )
    assert main(["search", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "scored on the held-out documents" in out
    for trial in StudyStore(str(tmp_path / "s.db")).trials("toy"):
        assert trial.scored_with == "bfloat16 on cpu"
        phases = trial.timings
        assert phases["merge_math"] > 0 and phases["copy"] > 0 and phases["evaluation"] > 0
        assert phases["merge_math"] + phases["copy"] <= trial.merge_seconds
        assert phases["batch_sizes"] and phases["oom_retries"] == 0
    storage = str(tmp_path / "s.db")
    assert main(["pareto", "--storage", storage, "--study", "toy", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["holdout_values"] is not None for r in rows)
    assert all(set(r["scores"]) >= {"full", "holdout"} for r in rows)
    store = StudyStore(storage)
    trials = store.trials("toy")
    baselines = [t for t in trials if t.role in ("source", "uniform")]
    assert baselines and all(t.holdout for t in baselines)
    proposals_off_front = {t.number for t in trials if t.role == "proposal"} - {
        r["trial"] for r in rows
    }
    assert all(not trials[n].holdout for n in proposals_off_front)
    by_workers = {t.number: t.holdout for t in trials if t.holdout}
    assert main(["confirm", "--storage", storage, "--study", "toy", "--redo", "--quiet"]) == 0
    assert {t.number: t.holdout for t in store.trials("toy") if t.holdout} == by_workers
    best = max(
        (t for t in store.trials("toy") if t.holdout),
        key=lambda t: (
            sum(t.holdout[m] for m in ("toy_facts_a/acc", "toy_facts_b/acc")),
            -t.number,
        ),
    )
    capsys.readouterr()
    out_dir = tmp_path / "merged"
    args = ["--trial", "best", "--by", "holdout", "--out", str(out_dir), "--verify", "--quiet"]
    assert main(["export", "--storage", storage, "--study", "toy", *args]) == 0
    out = capsys.readouterr().out
    assert f"exported trial {best.number} " in out and "verified: yes" in out
    card = (out_dir / "README.md").read_text()
    assert "| metric | search (full) | held out |" in card
    for name in ("toy_facts_a/acc", "toy_facts_b/acc"):
        assert f"| {name} | {best.metrics[name]:.6g} | {best.holdout[name]:.6g} |" in card
