"""`evomerge studies` and `evomerge pareto` read a study database (SQLite here)."""

from __future__ import annotations

import json

from evomerge.cli import main
from evomerge.study import StudyStore


def _filled(path):  # type: ignore[no-untyped-def]
    store = StudyStore(path)
    objectives = [{"metric": "a/acc", "direction": "maximize"}, {"metric": "b/acc"}]
    store.create_study("toy", {"objectives": objectives}, budget=10)
    store.create_study("empty", {"objectives": objectives}, budget=3)
    points = {0: (1.0, 0.1), 1: (0.1, 1.0), 2: (0.4, 0.4), 3: (0.9, 0.8)}
    for number, (a, b) in points.items():
        store.add_trial("toy", number, role="proposal", label=f"p{number}")
        store.finish_trial("toy", number, state="COMPLETE", metrics={"a/acc": a, "b/acc": b})
    store.add_trial("toy", 4, role="proposal", label="p4")
    store.finish_trial("toy", 4, state="FAILED", error="RuntimeError: NaN")
    store.add_trial("toy", 5, role="proposal", label="p5")
    return store


def test_studies_lists_progress(tmp_path, capsys):
    _filled(tmp_path / "s.db")
    assert main(["studies", "--storage", str(tmp_path / "s.db")]) == 0
    lines = capsys.readouterr().out.splitlines()
    toy = next(line for line in lines if line.startswith("toy"))
    assert "5/10" in toy and toy.split()[3] == "1" and toy.split()[4] == "1"
    assert any(line.startswith("empty") and "0/3" in line for line in lines)


def test_pareto_table_and_json(tmp_path, capsys):
    _filled(tmp_path / "s.db")
    storage = str(tmp_path / "s.db")
    assert main(["pareto", "--storage", storage, "--study", "toy", "--json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert sorted(t["trial"] for t in front) == [0, 1, 3]
    assert main(["pareto", "--storage", storage, "--study", "toy"]) == 0
    out = capsys.readouterr().out
    assert "3 trial(s) on the Pareto front" in out and "0.9000" in out


def test_unknown_study_and_bad_storage_are_one_line(tmp_path, capsys):
    _filled(tmp_path / "s.db")
    assert main(["pareto", "--storage", str(tmp_path / "s.db"), "--study", "nope"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "it has: empty, toy" in err
    assert main(["studies", "--storage", "postgresql+psycopg://u:pw@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pw" not in err and "***" in err


def test_resume_names_what_the_yaml_changed_since_the_study_started(tmp_path, capsys):
    from pathlib import Path

    import yaml

    from evomerge.cli.run import config_changes_note
    from evomerge.study.config import load_study_config

    data = {
        "name": "toy",
        "base": "models/base",
        "sources": ["models/a", "models/b"],
        "space": "task_arithmetic_global",
        "proposer": {"kind": "cma", "seed": 0},
        "objectives": [{"metric": "t/acc"}],
        "evaluators": [{"kind": "lm_eval", "tasks": ["t"]}],
        "budget": 20,
    }
    path = Path(tmp_path / "study.yaml")
    path.write_text(yaml.safe_dump(data))
    stored = load_study_config(path).model_dump(mode="json")  # what `search` stored
    assert config_changes_note(path, load_study_config(path), stored, "toy") is None  # as it was

    data.update(budget=40, proposer={"kind": "cma", "seed": 1}, storage="elsewhere.db")
    path.write_text(yaml.safe_dump(data))
    err = config_changes_note(path, load_study_config(path), stored, "toy") or ""
    assert f"note: {path} differs from the config study 'toy' started with" in err
    assert "(budget, proposer); resume runs the stored config" in err  # storage: where, not what
