"""Loading a merge config file: an evomerge recipe, a layer-path recipe (``path:``) or a
mergekit YAML, told apart by their keys."""

from __future__ import annotations

import os
from pathlib import Path

from evomerge.dataflow.recipe import is_dataflow_recipe, parse_dataflow_recipe, plan_dataflow
from evomerge.merge.mergekit_compat import is_mergekit_config, parse_mergekit, plan_mergekit
from evomerge.merge.plan import MergePlan
from evomerge.merge.recipe import (
    open_fisher_folders,
    open_recipe_models,
    parse_recipe,
    plan_recipe,
)
from evomerge.util import load_yaml


def plan_from_file(
    path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[MergePlan, str]:
    """Resolve a config file into a plan. Returns the plan and 'mergekit', 'path' or
    'evomerge'."""
    file = Path(path)
    data = load_yaml(file)
    where = str(file)
    if is_mergekit_config(data):
        config = parse_mergekit(data, where)
        return plan_mergekit(config, relative_to=file.parent, allow_pickle=allow_pickle), "mergekit"
    if is_dataflow_recipe(data):
        path_recipe = parse_dataflow_recipe(data, where)
        plan = plan_dataflow(path_recipe, relative_to=file.parent, allow_pickle=allow_pickle)
        return plan, "path"
    recipe = parse_recipe(data, where)
    models = open_recipe_models(recipe, relative_to=file.parent, allow_pickle=allow_pickle)
    return plan_recipe(
        recipe, models, aux_models=open_fisher_folders(recipe, file.parent)
    ), "evomerge"
