"""A study that merges by Fisher diagonals, end to end on the toy zoo: `evomerge fisher` makes
each source's diagonal, the study names them (`fisher:`), preflight checks them, the workers hold
them, the ready `fisher_per_layer` space searches the weights, and the export verifies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evomerge.study import StudyStore
from tests.helpers import load_folder
from tests.study_helpers import one_line_error, run, write_study_yaml


@pytest.fixture(scope="module")
def diagonals(toy_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ft_a's Fisher on toy_facts_a and ft_b's on toy_facts_b, made by `evomerge fisher`."""
    from evomerge.cli import main

    root = tmp_path_factory.mktemp("fisher")
    made = {}
    for label, task in (("ft_a", "toy_facts_a"), ("ft_b", "toy_facts_b")):
        out = root / label
        args = ["fisher", str(toy_zoo[label]), "--out", str(out), "--tasks", task]
        assert main([*args, "--samples", "16", "--quiet"]) == 0
        made[label] = out
    return made


def _study(tmp_path: Path, zoo: dict, **changes: object) -> Path:
    data: dict = {
        "space": "fisher_per_layer",
        "proposer": {"kind": "random", "seed": 0},
        "evaluators": [{"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}],
        "budget": 6,
        "storage": str(tmp_path / "s.db"),
        "cluster": {"workers": 1},
    }
    data.update(changes)
    return write_study_yaml(tmp_path, zoo, **data)


def test_a_fisher_study_runs_end_to_end_and_its_export_verifies(
    toy_zoo, diagonals, tmp_path, capsys
):
    fisher = [str(diagonals["ft_a"]), str(diagonals["ft_b"])]
    path = _study(tmp_path, toy_zoo, fisher=fisher)
    code, out, err = run(["search", str(path), "--quiet"], capsys)
    assert code == 0, err
    store = StudyStore(str(tmp_path / "s.db"))
    trials = store.trials("toy")
    assert all(t.state == "COMPLETE" for t in trials), [t.error for t in trials]
    merged = [t for t in trials if t.role in ("uniform", "proposal")]
    assert merged and all(
        [s.get("fisher") for s in t.recipe["sources"]] == fisher for t in merged
    ), "every recipe records its sources' Fisher folders, so it can be merged again"
    code, out, err = run(
        [
            "export",
            "--storage",
            str(tmp_path / "s.db"),
            "--study",
            "toy",
            "--trial",
            "best",
            "--out",
            str(tmp_path / "merged"),
            "--verify",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and "verified: yes" in out, err


def test_the_uniform_baseline_is_the_plain_fisher_merge(toy_zoo, diagonals, tmp_path, capsys):
    """Weights 1 everywhere: base + sum_i F_i (x_i - base) / sum_j F_j is exactly the Fisher
    merge sum_i F_i x_i / sum_j F_j (method `fisher`), up to float32 rounding."""
    recipe = {
        "method": "fisher",
        "sources": [
            {"model": str(toy_zoo[label]), "fisher": str(diagonals[label])}
            for label in ("ft_a", "ft_b")
        ],
    }
    (tmp_path / "fisher.yaml").write_text(json.dumps(recipe))
    assert run(["merge", str(tmp_path / "fisher.yaml"), str(tmp_path / "f")], capsys)[0] == 0
    path = _study(tmp_path, toy_zoo, fisher=[str(diagonals["ft_a"]), str(diagonals["ft_b"])])
    assert run(["search", str(path), "--quiet"], capsys)[0] == 0
    store = StudyStore(str(tmp_path / "s.db"))
    [uniform] = [
        t for t in store.trials("toy") if t.role == "uniform" and t.label.endswith("weight=1")
    ]
    (tmp_path / "uniform.yaml").write_text(json.dumps(uniform.recipe))
    assert run(["merge", str(tmp_path / "uniform.yaml"), str(tmp_path / "u")], capsys)[0] == 0
    plain, searched = load_folder(tmp_path / "f"), load_folder(tmp_path / "u")
    for name, tensor in plain.items():
        assert (searched[name] - tensor).abs().max() <= 1e-5 * (1 + tensor.abs().max()), name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "fisher: the space merges with method 'fisher_task_arithmetic', which weighs"),
        (
            {"space": "task_arithmetic_global", "fisher": ["A", "A"]},
            "fisher: the space's method 'task_arithmetic' does not use Fisher diagonals",
        ),
        ({"fisher": ["A"]}, "fisher: one Fisher folder per source, in the order of sources: 2"),
        ({"fisher": ["A", "MISSING"]}, "fisher[1]: "),
        ({"fisher": ["A", "PARTIAL"]}, "has no Fisher diagonal for tensor "),
    ],
)
def test_fisher_settings_are_checked_before_the_study_starts(
    toy_zoo, diagonals, tmp_path, capsys, changes, message
):
    partial = tmp_path / "partial"
    shutil.copytree(diagonals["ft_b"], partial)
    tensors = load_folder(partial)
    dropped = sorted(tensors)[0]
    from safetensors.torch import save_file

    for file in partial.glob("*.safetensors"):
        file.unlink()
    save_file(
        {k: v for k, v in tensors.items() if k != dropped}, str(partial / "model.safetensors")
    )
    where = {
        "A": str(diagonals["ft_a"]),
        "MISSING": str(tmp_path / "nope"),
        "PARTIAL": str(partial),
    }
    if "fisher" in changes:
        changes = {**changes, "fisher": [where[f] for f in changes["fisher"]]}  # type: ignore[union-attr]
    path = _study(tmp_path, toy_zoo, **changes)
    code, _, err = run(["search", str(path), "--quiet"], capsys)
    assert code == 1
    assert message in one_line_error(err)
    assert not (tmp_path / "s.db").exists() or not StudyStore(str(tmp_path / "s.db")).studies()
