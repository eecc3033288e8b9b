"""Reading a study back: open its database, pick a trial, and read what the study stored.

Every command and figure that looks at a study goes through here: :func:`open_store` (the
checks before a database is opened), :func:`select_trial` (``best``, a number, ``pareto:K``),
:func:`study_objectives`, :func:`study_budget`, :func:`stored_study_config` (the stored config
parsed into a :class:`~evomerge.study.config.StudyConfig`) and :func:`trial_recipe`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.optimize import Objective, parse_objectives, scalarize
from evomerge.study.store import (
    FULL,
    HOLDOUT,
    StorageError,
    StudyStore,
    TrialView,
    mask_url,
    storage_url,
)
from evomerge.util import DTYPES, first_line, number_ranges

if TYPE_CHECKING:  # torch-heavy; imported where used
    from evomerge.dataflow.recipe import DataflowRecipe
    from evomerge.merge.recipe import Recipe
    from evomerge.study.config import StudyConfig

SQLITE_HEADER = b"SQLite format 3\x00"
_SELECTOR = re.compile(r"(best)|(\d+)|pareto:(\d+)")


# -- opening a database ------------------------------------------------------------------------


def check_storage(storage: str, *, what: str = "--storage", must_exist: bool = False) -> str:
    """The SQLAlchemy URL of ``storage``, refused in one line naming ``what`` when it cannot be
    a study database: an unknown scheme, a database driver that is not installed, an SQLite
    path whose folder is missing or that is a folder or another kind of file, or (with
    ``must_exist``) an SQLite file that is not there. Opens and creates nothing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = storage_url(storage)
    shown = mask_url(url)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except ArgumentError as exc:  # NoSuchModuleError (an unknown scheme) is one too
        raise StorageError(f"{what} {shown}: not a database URL ({first_line(exc)})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise StorageError(
            f"{what} {shown}: the database driver for '{parsed.drivername}' is not installed "
            f"({first_line(exc)})"
        ) from None
    if dialect.name != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    file = Path(parsed.database)
    if not file.parent.is_dir():
        raise StorageError(f"{what} {file}: folder {file.parent} does not exist")
    if file.is_dir():
        raise StorageError(f"{what} {file} is a folder, not an SQLite database file")
    if not file.exists():
        if must_exist:
            raise StorageError(f"{what} {file}: no study database there (the file does not exist)")
        return url
    try:
        with file.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StorageError(f"{what} {file}: cannot read it ({exc.strerror or exc})") from None
    if header and header != SQLITE_HEADER:
        raise StorageError(f"{what} {file} is not an SQLite database (it holds something else)")
    return url


def open_store(storage: str, *, what: str = "--storage", create: bool = False) -> StudyStore:
    """:func:`check_storage`, then the store; without ``create`` a missing SQLite file is an
    error (a command that only reads must not leave an empty database behind)."""
    from sqlalchemy.exc import SQLAlchemyError

    url = check_storage(storage, what=what, must_exist=not create)
    try:
        return StudyStore(url)
    except StorageError as exc:  # unreachable, refused, of another schema version
        raise StorageError(f"{what}: {exc}") from None
    except SQLAlchemyError as exc:
        raise StorageError(
            f"{what}: cannot open the study database {mask_url(url)}: {first_line(exc)}"
        ) from None


# -- the stored config -------------------------------------------------------------------------


def config_objectives(
    config: Mapping[str, Any], study: str, *, required: bool = True
) -> list[Objective]:
    """The objectives of a stored config; none is an error unless not ``required``."""
    raw = config.get("objectives")
    if not raw:
        if required:
            raise ConfigError(f"study '{study}' stores no objectives")
        return []
    return parse_objectives(raw, where=f"study '{study}': objectives")


def study_objectives(store: StudyStore, study: str) -> list[Objective]:
    """The objectives in the study's stored config; none is an error."""
    return config_objectives(store.study_config(study), study)


def study_budget(config: Mapping[str, Any], row_budget: int) -> tuple[int | None, float | None]:
    """(trials, hours) from the stored config; the study row's budget if the config has none."""
    budget = config.get("budget")
    if isinstance(budget, Mapping):
        return budget.get("trials"), budget.get("hours")
    if isinstance(budget, int) and not isinstance(budget, bool):
        return budget, None
    return row_budget, None


def stored_study_config(store: StudyStore, study: str) -> StudyConfig:
    """The study's stored config, validated (it imports the merge layer: torch)."""
    from evomerge.study.config import parse_study_config

    return parse_study_config(
        store.study_config(study), f"study '{study}' in {mask_url(store.url)}"
    )


# -- choosing a trial --------------------------------------------------------------------------


def select_trial(store: StudyStore, study: str, selector: str, by: str = "search") -> TrialView:
    """The trial ``selector`` names: ``best``, a trial number, or ``pareto:K`` (1-based row of
    the Pareto front, best scalarized first). Only a COMPLETE trial is returned. ``best`` ranks
    by the full-fidelity score on the searched-on documents, or with ``by="holdout"`` by the
    score on the held-out documents (of the trials ``confirm`` scored)."""
    if by not in ("search", "holdout"):
        raise ConfigError(f"rank by 'search' or 'holdout', not '{by}'")
    match = _SELECTOR.fullmatch(selector.strip())
    if match is None:
        raise ConfigError(
            f"trial selector '{selector}' is not 'best', a trial number or 'pareto:K' (K >= 1)"
        )
    best, number, row = match.groups()
    if number is not None:
        return _numbered(store, study, int(number))
    try:
        objectives = study_objectives(store, study)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; select a trial by its number") from None
    if best:
        return best_trial(store, study, objectives, by)
    return _pareto_row(store, study, objectives, int(row))


def best_trial(
    store: StudyStore, study: str, objectives: Sequence[Objective], by: str = "search"
) -> TrialView:
    """The complete trial with the highest weighted objectives at full fidelity, or with
    ``by="holdout"`` on the held-out documents (the lower number on a tie)."""
    fidelity = HOLDOUT if by == "holdout" else FULL
    complete = store.trials(study, ["COMPLETE"])
    pool = [t for t in complete if t.values(objectives, fidelity) is not None]
    if not pool and by == "holdout":
        raise ConfigError(
            f"no trial of study '{study}' has held-out scores; give the evaluators a "
            f"'holdout' share and run: evomerge confirm --storage {mask_url(store.url)} "
            f"--study {study}"
        )
    if not pool:
        raise _nothing_complete(store, study)
    # The pool is ordered by number and max keeps the first maximum: ties go to the lower one.
    return max(pool, key=lambda t: scalarize(objectives, t.values(objectives, fidelity) or []))


def _numbered(store: StudyStore, study: str, number: int) -> TrialView:
    trials = store.trials(study)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None:
        have = (
            f"its trials are {number_ranges([t.number for t in trials])}" if trials else "no trials"
        )
        raise ConfigError(f"study '{study}' has no trial {number}; {have}")
    if trial.state != "COMPLETE":
        why = f" ({first_line(trial.error)})" if trial.error else ""
        raise ConfigError(
            f"trial {number} of study '{study}' is {trial.state}{why}, not COMPLETE; "
            "only a complete trial can be exported"
        )
    return trial


def _pareto_row(
    store: StudyStore, study: str, objectives: Sequence[Objective], row: int
) -> TrialView:
    front = store.pareto(study, objectives)
    if not front:
        raise _nothing_complete(store, study)
    if not 1 <= row <= len(front):
        raise ConfigError(
            f"pareto:{row}: the Pareto front of study '{study}' has {len(front)} trial(s); "
            f"choose pareto:1 to pareto:{len(front)}"
        )
    return front[row - 1]


def _nothing_complete(store: StudyStore, study: str) -> ConfigError:
    counts = Counter(t.state for t in store.trials(study))
    if not counts:
        return ConfigError(f"study '{study}' has no trials yet; there is nothing to export")
    trials = store.trials(study, ["COMPLETE"])
    states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    cheap = sum(1 for t in trials if t.fidelity not in (None, FULL))
    hint = (
        f"; {cheap} trial(s) have only a cheap score (on a subset of the documents), which is "
        "not compared: export one by its number, or let the study promote more"
        if cheap
        else ""
    )
    return ConfigError(
        f"study '{study}' has no complete trial with a full-fidelity score for every objective "
        f"({states}){hint}"
    )


# -- a trial's recipe --------------------------------------------------------------------------


def trial_recipe(trial: TrialView, study: str, dtype: str | None = None) -> Recipe:
    """The trial's stored recipe with absolute model paths, its ``dtype`` replaced if given."""
    from evomerge.merge.recipe import parse_recipe

    where = _stored_recipe(trial, study, dtype)
    data = parse_recipe(trial.recipe, where).model_dump(mode="json", exclude_defaults=True)
    data = _absolute_recipe(data)
    if dtype is not None:
        data["dtype"] = dtype
    return parse_recipe(data, where)


def trial_path_recipe(trial: TrialView, study: str, dtype: str | None = None) -> DataflowRecipe:
    """A data-flow trial's stored path recipe with absolute model paths (its merges' too),
    its ``dtype`` replaced if given."""
    from evomerge.dataflow.recipe import parse_dataflow_recipe

    where = _stored_recipe(trial, study, dtype)
    data = parse_dataflow_recipe(trial.recipe, where).model_dump(mode="json", exclude_none=True)
    for entry in data["models"]:
        if entry.get("model") is not None:
            entry["model"] = _absolute(entry["model"])
        if entry.get("recipe") is not None:
            entry["recipe"] = _absolute_recipe(entry["recipe"])
    if dtype is not None:
        data["dtype"] = dtype
    return parse_dataflow_recipe(data, where)


def _stored_recipe(trial: TrialView, study: str, dtype: str | None) -> str:
    """Where a trial's recipe is read from, for messages; refuses a trial without one and an
    unknown ``dtype``."""
    if trial.recipe is None:
        raise ConfigError(f"trial {trial.number} of study '{study}' has no stored recipe")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    return f"trial {trial.number} recipe"


def _absolute_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe mapping with its base, source and Fisher folders absolute."""
    data = dict(data)
    if data.get("base") is not None:
        data["base"] = _absolute(data["base"])
    data["sources"] = [dict(s) for s in data.get("sources", [])]
    for source in data["sources"]:
        source["model"] = _absolute(source["model"])
        if source.get("fisher"):
            source["fisher"] = _absolute(source["fisher"])
    return data


def _absolute(path: str) -> str:
    """As a worker reads it: relative to the working directory."""
    return str(Path(path).expanduser().resolve())
