"""The three images of an exported trial, shown in its model card: the Pareto plot with the
model starred, the history, and the model's recipe heatmap (for a data-flow trial, its layer
path: :mod:`evomerge.plots.path`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.plots.history import history_figure
from evomerge.plots.pareto import pareto_figure
from evomerge.plots.path import path_figure, path_grid
from evomerge.plots.png import write_png
from evomerge.plots.recipe import recipe_figure, recipe_grid, recipe_title

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from evomerge.dataflow.recipe import DataflowRecipe
    from evomerge.merge.plan import MergePlan
    from evomerge.merge.recipe import Recipe
    from evomerge.study.store import StudyStore, TrialView

IMAGES = (
    ("pareto.png", "The study's trials and its Pareto front; this model is starred."),
    ("history.png", "Best score so far against trials and hours of search."),
    ("recipe.png", "This model's merge coefficients by layer and tensor kind."),
)
PATH_CAPTION = (
    "This model's layer path: which layer of which model each depth takes, and its input scaling."
)
"""The caption of ``recipe.png`` for a data-flow (layer path) trial."""


def study_images(
    store: StudyStore,
    study: str,
    trial: TrialView,
    plan: MergePlan,
    recipe: Recipe | DataflowRecipe,
    folder: Path,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw the three images of an exported trial into ``folder`` (created).

    Returns ``(drawn, skipped)``: ``(path relative to the folder's parent, caption)`` per
    image written, and ``"name: why"`` per image that could not be drawn (a study without
    objectives, a plotting error): a picture is not worth failing an export. A failure to
    write (a full disk) is raised. For a data-flow recipe, ``recipe.png`` is its layer path.
    """
    from evomerge.dataflow.recipe import DataflowRecipe
    from evomerge.study.read import study_objectives
    from evomerge.util import first_line

    trials = store.trials(study)

    def pareto() -> Figure:
        objectives = study_objectives(store, study)
        front = store.pareto(study, objectives)
        return pareto_figure(study, trials, front, objectives, trial.number)

    def history() -> Figure:
        return history_figure(study, trials, study_objectives(store, study), None, trial.number)

    is_path = isinstance(recipe, DataflowRecipe)

    def heatmap() -> Figure:
        if isinstance(recipe, DataflowRecipe):
            return path_figure(path_grid(recipe), recipe_title(study, trial))
        return recipe_figure(recipe_grid(plan, recipe), recipe_title(study, trial))

    folder.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[str, str]] = []
    skipped: list[str] = []
    for (name, caption), draw in zip(IMAGES, (pareto, history, heatmap)):
        try:
            figure = draw()
        except Exception as exc:  # reported; the export goes on
            skipped.append(f"{name}: {first_line(exc)}")
            continue
        write_png(figure, folder / name)
        if is_path and name == "recipe.png":
            caption = PATH_CAPTION
        drawn.append((f"{folder.name}/{name}", caption))
    if not drawn:
        folder.rmdir()
    return drawn, skipped
