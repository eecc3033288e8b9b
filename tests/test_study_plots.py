"""The plots: `evomerge pareto --plot`, `evomerge plot history|recipe` and an export's images.

The commands draw from a real study: 12 trials on the toy zoo (the two fine-tunes alone, three
uniform merges, seven random per-layer task-arithmetic proposals, with the driver's roles,
labels and recipes), each merged in place and scored by lm-eval in this process (no Ray: the
driver is tested elsewhere), recorded in SQLite. The numbers behind the pictures (the
heatmap's cells, the best-so-far series, the search clock, where the tags go) are checked
against values worked out by hand.
"""

from __future__ import annotations

import itertools
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from evomerge.cli import main
from evomerge.merge.recipe import open_recipe_models, parse_recipe, plan_recipe
from evomerge.optimize import Objective, scalarize
from evomerge.plots import images as images_module
from evomerge.plots.history import best_so_far, history_series, search_clock
from evomerge.plots.labels import baseline_tags
from evomerge.plots.pareto import pareto_figure
from evomerge.plots.recipe import OUTSIDE, recipe_grid, recipe_matrix
from evomerge.study import StudyStore
from evomerge.study.export import export_trial
from evomerge.study.store import TrialView

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = ("toy_facts_a/acc", "toy_facts_b/acc")
EVALUATOR = {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}
BUDGET = 12


@pytest.fixture(scope="module")
def study(toy_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The SQLite file of study 'toy' (see the module docstring), made once for the module."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate import build_evaluator
    from evomerge.merge.engine import InPlaceMerger
    from evomerge.space import space_from_setting
    from evomerge.study.config import parse_study_config

    database = str(tmp_path_factory.mktemp("plots") / "s.db")
    config = parse_study_config(
        {
            "name": "toy",
            "storage": database,
            "base": str(toy_zoo["base"]),
            "sources": [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
            "space": "task_arithmetic_per_layer",
            "proposer": {"kind": "random", "seed": 0},
            "objectives": [{"metric": m} for m in METRICS],
            "evaluators": [EVALUATOR],
            "budget": BUDGET,
        },
        "study",
    )
    store = StudyStore(database)
    store.create_study("toy", config.model_dump(mode="json"), BUDGET)
    folders = [ModelFolder(config.base, label="base"), *(ModelFolder(s) for s in config.sources)]
    space = space_from_setting(config.space).bind(folders[0], [f.label for f in folders[1:]])

    def decoded(genome: np.ndarray) -> dict[str, Any]:
        recipe = space.decode(genome, config.base, config.sources)
        return recipe.model_dump(exclude_defaults=True)

    # The trials the driver runs: each source alone, the uniform merges, then proposals.
    trials = [
        (
            "source",
            f.label,
            {
                "method": "linear",
                "sources": [{"model": str(f.path), "parameters": {"weight": 1.0}}],
            },
        )
        for f in folders[1:]
    ]
    trials += [("uniform", label, decoded(g)) for label, g in space.uniform_baselines()]
    rng = np.random.default_rng(0)
    while len(trials) < BUDGET:
        trials.append(
            ("proposal", f"proposal {len(trials) - 5}", decoded(rng.random(space.dimension)))
        )
    model = AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32).eval()
    evaluator = build_evaluator(EVALUATOR, model, AutoTokenizer.from_pretrained(config.base))
    merger = InPlaceMerger(folders)
    for number, (role, label, data) in enumerate(trials):
        store.add_trial("toy", number, role=role, label=label, recipe=data)
        recipe = parse_recipe(data)
        if recipe.base is None:  # a source alone
            alone = InPlaceMerger([ModelFolder(recipe.sources[0].model)])
            alone.merge_into(plan_recipe(recipe, alone.models), model)
        else:
            merger.merge_into(plan_recipe(recipe, folders), model)
        metrics = evaluator.evaluate().metrics
        store.finish_trial("toy", number, state="COMPLETE", metrics=metrics, worker="w0")
    evaluator.close()
    assert [t.role for t in store.trials("toy")] == ["source"] * 2 + ["uniform"] * 3 + [
        "proposal"
    ] * (BUDGET - 5)
    return database


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_png(path: Path) -> None:
    width, height = png_size(path)
    assert 400 <= width <= 4000 and 400 <= height <= 4000, (width, height)
    assert 15_000 < path.stat().st_size < 1_000_000  # drawn, not blank; not absurd
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (width, height)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # markers, lines, text: not one fill


def run(args: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["pareto", "--plot"],
        ["plot", "history", "--out"],
        ["plot", "history", "--objective", METRICS[1], "--out"],
        ["plot", "recipe", "--trial", "best", "--out"],
        ["plot", "recipe", "--trial", "pareto:1", "--out"],
        ["plot", "recipe", "--trial", "7", "--out"],
    ],
    ids=["pareto", "history", "history-one", "recipe-best", "recipe-pareto", "recipe-7"],
)
def test_each_plot_is_a_png_of_sensible_size(study, tmp_path, capsys, command):
    out = tmp_path / "plots" / "p.png"
    out.parent.mkdir()
    out.write_bytes(b"an older plot")  # replaced whole
    args = [*command[:-1], "--storage", study, "--study", "toy", command[-1], out]
    code, printed, err = run(args, capsys)
    assert code == 0, err
    assert f"plot written to {out}" in printed
    check_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["p.png"]  # no temporary left


def test_bad_input_is_one_line_and_leaves_no_file(study, tmp_path, capsys):
    good = tmp_path / "p.png"
    history = ["plot", "history", "--storage", study, "--study", "toy"]
    recipe = ["plot", "recipe", "--storage", study, "--study", "toy", "--out", good]
    cases = [
        ([*recipe, "--trial", "99"], "has no trial 99; its trials are 0-11"),
        ([*recipe, "--trial", "pareto:40"], "choose pareto:1 to pareto:"),
        ([*recipe, "--trial", "worst"], "is not 'best', a trial number or 'pareto:K'"),
        ([*history, "--out", tmp_path / "p.jpg"], "give a file name ending in .png"),
        ([*history, "--out", tmp_path / "no" / "p.png"], "does not exist"),
        ([*history, "--out", good, "--objective", "c/acc"], "not an objective of the study"),
        (["plot", "history", "--storage", study, "--study", "nope", "--out", good], "nope"),
        (
            ["plot", "history", "--storage", tmp_path / "none.db", "--study", "toy", "--out", good],
            "no study database there",
        ),
        (
            ["pareto", "--storage", study, "--study", "toy", "--plot", good.with_suffix(".jpg")],
            ".png",
        ),
    ]
    for args, message in cases:
        code, _, err = run(args, capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1, (args, err)
        assert lines[0].startswith("evomerge: error: ") and message in lines[0], (args, err)
        assert list(tmp_path.iterdir()) == [], args  # no PNG, no temporary, no database


def test_a_failed_draw_keeps_the_old_file(study, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, handle, **kwargs):  # type: ignore[no-untyped-def]
        handle.write(b"half a png")
        raise RuntimeError("disk trouble")

    out = tmp_path / "p.png"
    out.write_bytes(b"the old plot")
    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk trouble"):
        main(
            [
                "plot",
                "recipe",
                "--storage",
                study,
                "--study",
                "toy",
                "--trial",
                "3",
                "--out",
                str(out),
            ]
        )
    assert out.read_bytes() == b"the old plot"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


# -- the export's images ---------------------------------------------------------------------------


def test_the_exported_card_shows_the_three_images(study, tmp_path):
    store = StudyStore(study)
    result = export_trial(store, "toy", "pareto:1", tmp_path / "m", verify=False)
    assert result.images == ("images/pareto.png", "images/history.png", "images/recipe.png")
    assert result.images_skipped == ()
    card = (tmp_path / "m" / "README.md").read_text()
    plots_section = card.split("## Plots", 1)[1].split("## Recipe", 1)[0]
    for name in ("pareto", "history", "recipe"):
        assert f"![{name}](images/{name}.png)" in plots_section
        check_png(tmp_path / "m" / "images" / f"{name}.png")
    assert sorted(p.name for p in (tmp_path / "m" / "images").iterdir()) == [
        "history.png",
        "pareto.png",
        "recipe.png",
    ]


def test_a_plot_that_cannot_be_drawn_does_not_fail_the_export(study, tmp_path, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("no room for a heatmap\nsecond line")

    monkeypatch.setattr(images_module, "recipe_figure", broken)
    result = export_trial(StudyStore(study), "toy", "best", tmp_path / "m", verify=False)
    assert result.images == ("images/pareto.png", "images/history.png")
    assert result.images_skipped == ("recipe.png: no room for a heatmap",)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "images/history.png" in card and "recipe.png" not in card
    assert sorted(p.name for p in (tmp_path / "m" / "images").iterdir()) == [
        "history.png",
        "pareto.png",
    ]


# -- the numbers behind the pictures ---------------------------------------------------------------

TENSORS = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{part}.weight"
        for i in range(4)
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "mlp.up_proj",
            "input_layernorm",
        )
    ),
    "model.norm.weight",
    "lm_head.weight",
]


def test_slerp_heatmap_by_hand():
    recipe = parse_recipe(
        {
            "method": "slerp",
            "base": "base",
            "sources": [{"model": "ft"}],
            "parameters": {
                "t": [
                    {"value": 0.9, "kind": "mlp"},
                    {"value": 0.2, "filter": "q_proj"},
                    {"value": [0.0, 0.6]},  # layer i of 4: 0.2 * i; outside the layers: 0.0
                ]
            },
        }
    )
    grid = recipe_matrix(recipe, TENSORS, 4)
    assert grid.rows == ("0", "1", "2", "3", OUTSIDE)
    assert grid.kinds == ("attention", "mlp", "norm", "embedding", "head")
    assert [(p.parameter, p.source) for p in grid.panels] == [("t", None)]
    nan = np.nan
    expected = [  # attention: mean of q (0.2) and k (0.2 * i); norm: 0.2 * i
        [0.1, 0.9, 0.0, nan, nan],
        [0.2, 0.9, 0.2, nan, nan],
        [0.3, 0.9, 0.4, nan, nan],
        [0.4, 0.9, 0.6, nan, nan],
        [nan, nan, 0.0, 0.0, 0.0],
    ]
    panel = grid.panel("t")
    np.testing.assert_allclose(panel.values, expected, atol=1e-12)
    assert panel.varies[:4, 0].tolist() == [True, False, True, True]  # q and k equal at layer 1
    assert not panel.varies[:, 1:].any()


def test_task_arithmetic_heatmap_by_hand_and_as_the_engine_plans_it(toy_zoo):
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(toy_zoo["base"]),
            "sources": [
                {
                    "model": str(toy_zoo["ft_a"]),
                    "parameters": {"weight": [{"value": 0.3, "kind": "attention"}, {"value": 1.2}]},
                },
                {"model": str(toy_zoo["ft_b"]), "label": "b"},
            ],
            "parameters": {"weight": [0.5, 0.8]},  # ft_b's: 0.5 + 0.1 * i; outside: 0.5
        }
    )
    grid = recipe_matrix(recipe, TENSORS, 4)
    assert [(p.parameter, p.source) for p in grid.panels] == [("weight", "ft_a"), ("weight", "b")]
    a, b = grid.panel("weight", "ft_a").values, grid.panel("weight", "b").values
    np.testing.assert_allclose(a[:4, :3], [[0.3, 1.2, 1.2]] * 4)
    np.testing.assert_allclose(a[4, 2:], [1.2, 1.2, 1.2])
    np.testing.assert_allclose(b[:4, :3], [[0.5 + 0.1 * i] * 3 for i in range(4)])
    np.testing.assert_allclose(b[4, 2:], [0.5, 0.5, 0.5])
    # The real toy models, planned as the engine plans a merge, give the same cells.
    real = recipe_grid(plan_recipe(recipe, open_recipe_models(recipe)), recipe)
    assert real.kinds == grid.kinds and real.rows == grid.rows
    for mine, theirs in zip(grid.panels, real.panels, strict=True):
        np.testing.assert_allclose(mine.values, theirs.values, atol=1e-12)


def test_a_recipe_with_layer_methods_shows_every_methods_parameters_by_hand():
    """ties in layers 0-1, breadcrumbs_ties in 2-3 (task arithmetic's weights outside): gamma,
    which only breadcrumbs takes, has values in layers 2-3 and empty cells in 0-1 and outside;
    density, which both take, has them in every layer; the title names the methods per layer."""
    recipe = parse_recipe(
        {
            "method": "ties",
            "layer_methods": ["ties", "ties", "breadcrumbs_ties", "breadcrumbs_ties"],
            "base": "base",
            "sources": [
                {"model": "a", "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.02}}
            ],
        }
    )
    grid = recipe_matrix(recipe, TENSORS, 4)
    assert grid.method == "ties outside the layers; ties in layers 0-1 and breadcrumbs_ties in " + (
        "layers 2-3"
    )
    names = [p.parameter for p in grid.panels]
    assert names == ["weight", "density", "gamma"]
    gamma = grid.panel("gamma", "a").values
    assert np.isnan(gamma[:2]).all() and np.isnan(gamma[4]).all()
    np.testing.assert_allclose(gamma[2:4, :3], 0.02)
    np.testing.assert_allclose(grid.panel("density", "a").values[:4, :3], 0.5)


def test_best_so_far_by_hand(study):
    assert best_so_far([0.2, 0.5, 0.3, 0.7, 0.1], 1.0) == [0.2, 0.5, 0.5, 0.7, 0.7]
    assert best_so_far([0.2, 0.5, 0.1, 0.7, 0.05], -1.0) == [0.2, 0.2, 0.1, 0.1, 0.05]
    trials = StudyStore(study).trials("toy")
    weighted, first, second = history_series(trials, [Objective(metric=m) for m in METRICS])
    sums = [t.metrics[METRICS[0]] + t.metrics[METRICS[1]] for t in trials]
    running = [max(sums[: i + 1]) for i in range(len(sums))]
    assert list(weighted.values) == pytest.approx(sums)
    assert list(weighted.best_by_number) == pytest.approx(running)
    assert list(first.best_by_number) == [
        max(t.metrics[METRICS[0]] for t in trials[: i + 1]) for i in range(len(trials))
    ]
    ended = sorted(trials, key=lambda t: t.finished_at)  # type: ignore[arg-type,return-value]
    assert [b for _, b in second.by_time] == [
        max(t.metrics[METRICS[1]] for t in ended[: i + 1]) for i in range(len(ended))
    ]
    (only,) = history_series(trials, [Objective(metric=m) for m in METRICS], "weighted")
    assert only.values == weighted.values
    assert scalarize([Objective(metric=m) for m in METRICS], [0.5, 0.25]) == 0.75


T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def trial(number: int, role: str, label: str, metrics: dict[str, float], **times: Any) -> TrialView:
    return TrialView(
        number=number,
        role=role,
        label=label,
        state="COMPLETE",
        genome=None,
        recipe=None,
        proposal_id=None,
        worker="w0",
        attempts=1,
        error=None,
        fidelity="full",
        metrics=metrics,
        merge_seconds=times.get("merge", 2.0),
        eval_seconds=times.get("eval", 20.0),
        created_at=times.get("created", T0),
        finished_at=times.get("finished"),
    )


def test_the_search_clock_cuts_a_resumed_studys_idle_night():
    # Trials end every 60 s: six, then the study is stopped for 8 h, then four more. Trial 5
    # was running when it stopped: created before the night, ended after it.
    ends = [60.0 * (i + 1) for i in range(6)] + [6 * 60 + 8 * 3600 + 60.0 * i for i in (1, 2, 3)]
    trials = [
        trial(i, "proposal", f"p{i}", {}, finished=T0 + timedelta(seconds=end))
        for i, end in enumerate(ends)
    ]
    clock = search_clock(trials)
    assert len(clock.gaps) == 1
    assert clock.gaps[0].idle_hours == pytest.approx((8 * 3600 + 60) / 3600)
    hours = [clock.hours[i] * 3600 for i in range(len(ends))]
    assert hours == pytest.approx([60.0 * (i + 1) for i in range(len(ends))])  # gap -> 60 s
    assert clock.gaps[0].at_hours * 3600 == pytest.approx(360 + 30)
    steady = search_clock(trials[:6])
    assert steady.gaps == () and steady.hours[5] == pytest.approx(0.1)


def test_tags_of_close_baselines_do_not_overlap():
    """Two sources and six uniform merges within 0.01 of each other, and the front: every tag
    beside its point, no two tags overlapping, each named in the legend."""
    points = [(0.50 + 0.002 * i, 0.50 + 0.003 * (i % 3)) for i in range(8)]
    roles = ["source"] * 2 + ["uniform"] * 6
    trials = [
        trial(i, role, f"base {i}", {"a": x, "b": y})
        for i, (role, (x, y)) in enumerate(zip(roles, points))
    ]
    trials += [
        trial(8 + i, "proposal", f"p{i}", {"a": x, "b": y})
        for i, (x, y) in enumerate([(0.9, 0.3), (0.7, 0.7), (0.3, 0.9), (0.45, 0.45)])
    ]
    objectives = [Objective(metric="a"), Objective(metric="b")]
    front = [t for t in trials if t.number in (8, 9, 10)]
    assert baseline_tags(trials) == {0: "S1", 1: "S2", 2: "U1", 3: "U2", 4: "U3"} | {
        5: "U4",
        6: "U5",
        7: "U6",
    }
    from matplotlib.text import Text

    figure = pareto_figure("close", trials, front, objectives)
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    notes = [t for t in axes.texts if t.get_text() in {"S1", "S2", *(f"U{i}" for i in range(1, 7))}]
    ranks = [t for t in axes.texts if t.get_text().startswith("#")]
    assert len(notes) == 8 and len(ranks) == 3
    boxes = [Text.get_window_extent(t, renderer) for t in notes + ranks]  # the text, no line
    for one, other in itertools.combinations(boxes, 2):
        assert not one.overlaps(other), (one, other)
    frame = axes.get_window_extent(renderer)
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert "S1  base 0" in legend and "U6  base 7" in legend
