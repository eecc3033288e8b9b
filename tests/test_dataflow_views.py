"""The study views of a data-flow (layer path) study: the path figure (`evomerge plot recipe`,
an export's recipe.png), the Optuna view's parameters, and `evomerge status` / `pareto`.

The study is recorded directly in SQLite (no search, no evaluation, no Ray): three trials whose
recipes the bound ``dfs`` space decodes from hand-made genomes, with made-up metrics and the
timings a worker records for a path candidate (``hold``); one test exports a trial. The
expectations are worked out by hand from the space's layout (2 repeats x ft_a, ft_b x 4 layers
= 16 positions, use genes then scale genes, log scale on [0.5, 2]).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from evomerge.checkpoint import ModelFolder
from evomerge.dataflow.recipe import parse_dataflow_recipe
from evomerge.plots.images import PATH_CAPTION
from evomerge.plots.path import PathPoint, path_figure, path_grid
from evomerge.space import load_space
from evomerge.study import StudyStore
from evomerge.study.export import export_trial
from evomerge.study.optuna_view import StudyStorageView
from evomerge.study.read import trial_path_recipe
from tests.study_helpers import TOY_METRICS, run, study_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
USES = 16
LAYOUT = [(r, m, layer) for r in range(2) for m in ("ft_a", "ft_b") for layer in range(4)]
"""Position p of the dfs space on the toy zoo: (repeat, model, layer)."""


def genome(bound: Any, used: dict[int, float], scales: dict[int, float]) -> list[float]:
    """Use genes 0.1 but ``used``; scale genes 0.5 (scale 1) but ``scales``, by position (each
    gene found by its role and position, wherever the space puts it)."""
    unit = []
    for gene in bound.genes:
        if gene.role == "use":
            unit.append(used.get(gene.position, 0.1))
        else:
            unit.append(scales.get(gene.position, 0.5))
    return unit


# Positions 0, 1 (ft_a L0, L1), 6, 7 (ft_b L2, L3), 11 (repeat 1: ft_a L3 at 0.51, above the
# 0.5 threshold); position 2 at exactly 0.5 is not used. Scale genes: 0.75 at 6 (crosses from
# ft_a: 0.5 * 4**0.75 = sqrt 2), 0.25 at 11 (crosses back: 0.5 * 4**0.25 = 1/sqrt 2), 0.9 at 0
# (does not cross from the outer model ft_a: scale 1, if the space has that gene) and 0.9 at 7
# (ft_b after ft_b: the path's scale is 1; the gene reads 0.5 * 4**0.9).
KNOWN = (
    {0: 0.9, 1: 0.8, 2: 0.5, 6: 0.7, 7: 0.95, 11: 0.51},
    {0: 0.9, 6: 0.75, 7: 0.9, 11: 0.25},
)
KNOWN_PATH = [
    PathPoint(0, "ft_a", 0, 1.0),
    PathPoint(1, "ft_a", 1, 1.0),
    PathPoint(2, "ft_b", 2, math.sqrt(2)),
    PathPoint(3, "ft_b", 3, 1.0),
    PathPoint(4, "ft_a", 3, 1 / math.sqrt(2)),
]
TRIALS = [  # genome, (toy_facts_a/acc, toy_facts_b/acc), merge seconds, timings
    (KNOWN, (0.5, 0.4), 2.5, {"hold": 2.0, "evaluation": 1.0, "oom_retries": 0}),
    (({4: 0.9, 5: 0.9}, {4: 0.0}), (0.3, 0.6), 0.1, {"hold": 0.0, "evaluation": 2.0}),
    (({12: 0.9}, {12: 1.0}), (0.2, 0.2), 0.3, {"hold": 0.0, "evaluation": 3.0}),
]
"""Trial 1: ft_b L0 at scale 0.5 (gene 0), then ft_b L1; trial 2: ft_b L0 alone (repeat 1) at
scale 2 (gene 1).
Front (max both): trials 0 and 1; 2 is dominated by 0. Path assembly (merge less hold): 0.5,
0.1, 0.3, mean 0.3 s; held models: mean 2/3 s; evaluation: mean 2 s."""


@pytest.fixture(scope="module")
def dfs_study(toy_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The SQLite URL of study 'toy' (space dfs) with the trials of TRIALS."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('dfs') / 'dfs.db'}"
    config = study_config(toy_zoo, storage, space="dfs")
    bound = load_space("dfs").bind(ModelFolder(config.base), ["ft_a", "ft_b"])
    assert bound.positions == LAYOUT and bound.use_count == USES
    store = StudyStore(storage)
    store.create_study("toy", config.model_dump(mode="json"), 5)
    for number, ((used, scales), values, merge, timings) in enumerate(TRIALS):
        unit = genome(bound, used, scales)
        recipe = bound.decode(unit, config.base, config.sources)
        store.add_trial(
            "toy",
            number,
            role="proposal",
            label=f"proposal {number}",
            genome=unit,
            recipe=recipe.model_dump(exclude_defaults=True),
        )
        store.finish_trial(
            "toy",
            number,
            state="COMPLETE",
            metrics=dict(zip(TOY_METRICS, values)),
            worker="w0",
            merge_seconds=merge,
            eval_seconds=timings["evaluation"],
            timings=timings,
        )
    return storage


def test_path_grid_is_the_decoded_path(dfs_study):
    store = StudyStore(dfs_study)
    trial = store.trials("toy")[0]
    grid = path_grid(trial_path_recipe(trial, "toy"))
    assert grid.outer == "ft_a" and grid.models == ("ft_a", "ft_b") and grid.merges == ()
    assert [(p.depth, p.model, p.layer) for p in grid.points] == [
        (p.depth, p.model, p.layer) for p in KNOWN_PATH
    ]
    assert [p.scale for p in grid.points] == pytest.approx([p.scale for p in KNOWN_PATH])
    assert [p.depth for p in grid.scaled] == [2, 4]


def test_path_figure_marks_each_step_with_its_layer_and_scale(dfs_study):
    grid = path_grid(trial_path_recipe(StudyStore(dfs_study).trials("toy")[0], "toy"))
    figure = path_figure(grid, "toy: trial 0")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.texts] == ["0", "1", "2", "x1.41", "3", "3", "x0.71"]
    (dots,) = axes.collections
    assert dots.get_offsets().tolist() == [[0, 0], [1, 0], [2, 1], [3, 1], [4, 0]]  # depth, row
    assert [t.get_text() for t in axes.get_yticklabels()] == ["ft_a [outer]", "ft_b"]
    assert "'ft_a'" in figure._suptitle.get_text() and len(figure.axes) == 2  # plus a colour bar


def test_plot_recipe_draws_the_path_of_a_path_trial(dfs_study, tmp_path, capsys):
    out = tmp_path / "path.png"
    code, printed, err = run(
        [
            "plot",
            "recipe",
            "--storage",
            dfs_study,
            "--study",
            "toy",
            "--trial",
            "best",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    assert out.read_bytes().startswith(PNG_SIGNATURE) and f"plot written to {out}" in printed


def test_export_images_show_the_path_with_its_caption(dfs_study, tmp_path):
    """Through the export, which hands study_images the path recipe and its export plan."""
    result = export_trial(StudyStore(dfs_study), "toy", "0", tmp_path / "m", verify=False)
    assert result.images_skipped == ()
    assert "images/recipe.png" in result.images
    assert (tmp_path / "m" / "images" / "recipe.png").read_bytes().startswith(PNG_SIGNATURE)
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"{PATH_CAPTION}\n\n![recipe](images/recipe.png)" in card


def test_optuna_view_shows_use_genes_as_choices_and_scales_in_bounds(dfs_study, toy_zoo):
    view = StudyStorageView(StudyStore(dfs_study))
    trials = optuna.load_study(study_name="toy", storage=view).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # Optuna accepted the params
    known = trials[0]
    genes = load_space("dfs").bind(ModelFolder(toy_zoo["base"]), ["ft_a", "ft_b"]).genes
    assert list(known.params) == [g.name for g in genes]
    used = [name for name, value in known.params.items() if value == "used"]
    assert used == [
        "use/r0/ft_a/L0",
        "use/r0/ft_a/L1",
        "use/r0/ft_b/L2",
        "use/r0/ft_b/L3",
        "use/r1/ft_a/L3",
    ]
    assert known.params["use/r0/ft_a/L2"] == "unused"  # exactly 0.5: not above the threshold
    # the used genes, in order, are the path the space decodes
    stored = parse_dataflow_recipe(StudyStore(dfs_study).trials("toy")[0].recipe)
    assert [n.split("/")[2:] for n in used] == [[s.model, f"L{s.layer}"] for s in stored.path]
    scales = [g.name for g in genes if g.role == "scale"]
    assert len(scales) >= USES - 4  # all but, perhaps, the outer model's opening layers
    for repeat, model, layer in LAYOUT:
        use = f"use/r{repeat}/{model}/L{layer}"
        assert known.distributions[use] == CategoricalDistribution(("unused", "used"))
    for scale in scales:
        assert known.distributions[scale] == FloatDistribution(0.5, 2.0, log=True)
        for trial in trials:
            assert 0.5 <= trial.params[scale] <= 2.0
    assert known.params["scale/r0/ft_b/L2"] == pytest.approx(math.sqrt(2))
    assert known.params["scale/r1/ft_a/L3"] == pytest.approx(1 / math.sqrt(2))
    assert known.params["scale/r0/ft_b/L3"] == pytest.approx(0.5 * 4**0.9)
    assert known.params["scale/r1/ft_a/L0"] == pytest.approx(1.0)
    assert trials[1].params["scale/r0/ft_b/L0"] == pytest.approx(0.5)
    assert trials[2].params["scale/r1/ft_b/L0"] == pytest.approx(2.0)
    assert [n for n, v in trials[2].params.items() if v == "used"] == ["use/r1/ft_b/L0"]


def test_status_shows_the_path_timings_and_pareto_the_front(dfs_study, capsys):
    code, printed, err = run(["status", "--storage", dfs_study, "--study", "toy"], capsys)
    assert code == 0, err
    (phases,) = [line for line in printed.splitlines() if line.startswith("phases")]
    assert phases.endswith(
        "mean of 3 trial(s): path assembly 0.3 s, held models 0.667 s, evaluation 2 s"
    )
    code, printed, err = run(["status", "--storage", dfs_study, "--study", "toy", "--json"], capsys)
    assert code == 0, err
    means: dict[str, Any] = json.loads(printed)["timings"]["mean_seconds"]
    assert means["path_assembly"] == pytest.approx(0.3)
    assert means["held_models"] == pytest.approx(2 / 3)
    assert means["merge_math"] is None
    code, printed, err = run(["pareto", "--storage", dfs_study, "--study", "toy"], capsys)
    assert code == 0, err
    rows = [line.split()[:2] for line in printed.splitlines()]
    assert sorted(int(row[1]) for row in rows if len(row) == 2 and "".join(row).isdigit()) == [
        0,
        1,
    ]
    assert "2 trial(s) on the Pareto front of study 'toy'" in printed
