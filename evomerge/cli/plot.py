"""``evomerge plot history`` and ``evomerge plot recipe``: a study's pictures as PNGs (the
figures are :mod:`evomerge.plots`; the Pareto front is ``evomerge pareto --plot``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evomerge.cli.args import TRIAL_HELP, add_study


def add_commands(commands: Any) -> None:
    """Register ``plot history`` and ``plot recipe`` on the CLI's sub-parsers."""
    plot = commands.add_parser(
        "plot",
        help="draw a study's history or a trial's recipe to a PNG",
        description="Draw pictures of a study (the Pareto front is 'evomerge pareto --plot').",
    )
    kinds = plot.add_subparsers(dest="plot", required=True, metavar="PLOT")
    history = kinds.add_parser(
        "history",
        help="best so far against trials and hours",
        description="The best value so far against the trial number and against hours of "
        "search: for the weighted sum of the objectives and for each objective. Trials are "
        "light points; source models and uniform merges are marked. Idle stretches of a "
        "resumed study are cut from the hours axis and marked.",
    )
    _common(history)
    history.add_argument(
        "--objective",
        metavar="METRIC",
        # 'weighted' is evomerge.plots.history.WEIGHTED, not imported: --help loads no library
        help="only this objective's metric, or 'weighted' for the weighted sum only "
        "(default: both)",
    )
    history.set_defaults(handler=cmd_plot_history)
    recipe = kinds.add_parser(
        "recipe",
        help="a heatmap of one trial's merge coefficients (or its layer path)",
        description="A heatmap of one trial's recipe as the merge engine resolves it: layers "
        "by tensor kind, one panel per method parameter and source. For a data-flow trial, its "
        "layer path: which layer of which model each depth takes, and the input scalings.",
    )
    _common(recipe)
    recipe.add_argument("--trial", required=True, help=TRIAL_HELP)
    recipe.set_defaults(handler=cmd_plot_recipe)


def _common(parser: argparse.ArgumentParser) -> None:
    add_study(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="the PNG")


def cmd_plot_history(args: argparse.Namespace) -> int:
    from evomerge.plots.history import history_figure
    from evomerge.plots.png import check_png_path, save_png
    from evomerge.study.read import open_store, study_objectives

    out = check_png_path(args.out, "--out")
    store = open_store(args.storage)
    objectives = study_objectives(store, args.study)
    trials = store.trials(args.study)
    figure = history_figure(args.study, trials, objectives, args.objective)
    save_png(figure, out, "--out")
    print(f"plot written to {out}")
    return 0


def cmd_plot_recipe(args: argparse.Namespace) -> int:
    from evomerge.dataflow.recipe import is_dataflow_recipe
    from evomerge.plots.path import path_figure, path_grid
    from evomerge.plots.png import check_png_path, save_png
    from evomerge.plots.recipe import recipe_figure, recipe_title, trial_recipe_grid
    from evomerge.study.read import open_store, select_trial, trial_path_recipe

    out = check_png_path(args.out, "--out")
    store = open_store(args.storage)
    trial = select_trial(store, args.study, args.trial)
    title = recipe_title(args.study, trial)
    if is_dataflow_recipe(trial.recipe):  # a layer path: which layer of which model, in order
        figure = path_figure(path_grid(trial_path_recipe(trial, args.study)), title)
    else:
        figure = recipe_figure(trial_recipe_grid(trial, args.study), title)
    save_png(figure, out, "--out")
    print(f"plot written to {out}")
    return 0
