"""Resolving the merges a data-flow space names by study (``study:NAME:best``) into recipes.

Done once, when the data-flow study is created: the stored config then holds each merge's
recipe, so resuming never looks at the other study again (its ``best`` may have changed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.dataflow.recipe import is_dataflow_recipe
from evomerge.dataflow.space import DataflowSpace, StudyModel
from evomerge.errors import ConfigError
from evomerge.study.read import select_trial, trial_recipe
from evomerge.study.store import StudyStore, mask_url


def resolve_path_merges(
    space: DataflowSpace, store: StudyStore, base: str, sources: Sequence[str]
) -> DataflowSpace:
    """``space`` with each merge named by study replaced by that trial's recipe. The trial must
    be a parameter-space merge of this study's base and (some of) its sources, which the
    study's workers hold."""
    held = {_resolved(path) for path in sources}
    models: list[str | StudyModel] = []
    for entry in space.models:
        if not isinstance(entry, StudyModel) or entry.recipe is not None:
            models.append(entry)
            continue
        name, selector = (entry.study or "").rsplit(":", 1)
        where = f"space '{space.name}': merge '{entry.label}' (study:{entry.study})"
        if not store.has_study(name):
            raise ConfigError(f"{where}: there is no study '{name}' in {mask_url(store.url)}")
        try:
            trial = select_trial(store, name, selector)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if is_dataflow_recipe(trial.recipe):
            raise ConfigError(f"{where}: trial {trial.number} is itself a path, not a merge")
        recipe = trial_recipe(trial, name)
        data: dict[str, Any] = recipe.model_dump(mode="json", exclude_defaults=True)
        if recipe.base is not None and _resolved(recipe.base) != _resolved(base):
            raise ConfigError(
                f"{where}: trial {trial.number} merges over base {recipe.base}, this study's "
                f"base is {base}"
            )
        for source in recipe.sources:
            if _resolved(source.model) not in held:
                raise ConfigError(
                    f"{where}: trial {trial.number} merges {source.model}, which is not one of "
                    "this study's sources (its workers hold only those); add it to 'sources'"
                )
        models.append(StudyModel(label=entry.label, study=f"{name}:{trial.number}", recipe=data))
    return space.model_copy(update={"models": models})


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()
