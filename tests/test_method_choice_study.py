"""A study whose space chooses the merge method per layer group, run as a user runs it: Ray
workers build each candidate with its layers' own methods, TPE proposes the choice as a native
categorical parameter, and the export merges the recorded recipe again and reproduces the
recorded scores."""

from __future__ import annotations

from evomerge.cli import main
from evomerge.study import StudyStore
from tests.study_helpers import write_study_yaml

FAMILY = {"ties", "dare_ties", "breadcrumbs_ties", "della"}


def test_a_method_choice_study_runs_on_ray_and_its_export_verifies(toy_zoo, tmp_path, capsys):
    storage = str(tmp_path / "s.db")
    path = write_study_yaml(
        tmp_path,
        toy_zoo,
        space="ties_family_choice",
        proposer={"kind": "tpe", "seed": 0, "n_startup_trials": 4},
        evaluators=[{"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}],
        budget=16,
        storage=storage,
    )
    assert main(["search", str(path), "--quiet"]) == 0
    trials = StudyStore(storage).trials("toy")
    assert len(trials) == 16 and all(t.state == "COMPLETE" for t in trials)
    uniform = [t for t in trials if t.role == "uniform"]
    assert {t.recipe["layer_methods"][0] for t in uniform} == FAMILY  # one baseline per method
    proposals = [t for t in trials if t.role == "proposal"]
    layer_methods = [tuple(t.recipe["layer_methods"]) for t in proposals]
    assert len(proposals) == 6
    for methods in layer_methods:  # two groups of two layers, each one method of the family
        assert len(methods) == 4 and set(methods) <= FAMILY
        assert methods[0] == methods[1] and methods[2] == methods[3]
    assert any(len(set(methods)) > 1 for methods in layer_methods)  # mixed across the layers
    capsys.readouterr()
    out_dir = tmp_path / "merged"
    args = ["--trial", "best", "--out", str(out_dir), "--verify", "--quiet"]
    assert main(["export", "--storage", storage, "--study", "toy", *args]) == 0
    out = capsys.readouterr().out
    assert "verified: yes" in out
    exported = next(t for t in trials if f"exported trial {t.number} " in out)
    card = (out_dir / "README.md").read_text()
    methods = exported.recipe["layer_methods"]
    if methods[0] == methods[2]:
        runs = f"{methods[0]} in layers 0-3"
    else:
        runs = f"{methods[0]} in layers 0-1 and {methods[2]} in layers 2-3"
    # The card says which method went where (ties, the space's `method`, outside the layers).
    expected = "**ties**" if set(methods) == {"ties"} else f"**ties outside the layers; {runs}**"
    assert expected in card


def test_an_svd_space_study_runs_on_ray_and_its_export_verifies(toy_zoo, tmp_path, capsys):
    """TSV-M through the workers: each candidate's SVDs run in the worker, in place, and the
    exported checkpoint (merged again by the streaming engine) scores what was recorded."""
    storage = str(tmp_path / "s.db")
    path = write_study_yaml(
        tmp_path,
        toy_zoo,
        space="tsv_per_layer",
        evaluators=[{"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}],
        budget=8,
        storage=storage,
    )
    assert main(["search", str(path), "--quiet"]) == 0
    trials = StudyStore(storage).trials("toy")
    assert len(trials) == 8 and all(t.state == "COMPLETE" for t in trials)
    assert {t.recipe["method"] for t in trials if t.role != "source"} == {"tsv"}
    capsys.readouterr()
    args = ["--trial", "best", "--out", str(tmp_path / "merged"), "--verify", "--quiet"]
    assert main(["export", "--storage", storage, "--study", "toy", *args]) == 0
    assert "verified: yes" in capsys.readouterr().out
