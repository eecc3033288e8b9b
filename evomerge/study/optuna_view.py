"""The study database seen as a read-only Optuna storage, for optuna-dashboard and Optuna's API.

evomerge keeps its trials in its own tables (``evomerge_*``): each result is one transaction of
its own, and promotions re-score a trial at a higher fidelity, which a finished Optuna trial
cannot show. :class:`StudyStorageView` presents those tables through Optuna's
:class:`~optuna.storages.BaseStorage` interface instead of copying them, so the dashboard is
live, nothing is written twice, and ``optuna.load_study(storage=view)`` works for analysis.

How a trial maps: objectives are the study's values (their directions and metric names too);
the genome's genes are the parameters, in their natural units (a SLERP ``t``, a source
weight) when the space can be bound to the study's models, a ``method_choice`` group as one
categorical parameter (``method/L0-1``: the method the space decodes); of a data-flow space,
a use gene as a categorical ``unused``/``used`` (``use/r0/ft_a/L3``: above 0.5 is used) and a
scale gene as a float in its bounds; else as ``gene_i`` in [0, 1];
role, label, fidelity, worker, timings, the error and every metric are user attributes
(``metric:`` at full fidelity, ``metric@limit=N:`` for a cheap score, ``holdout:`` on the
held-out documents). QUEUED is WAITING and FAILED is FAIL; a COMPLETE trial scored only on a
subset (never promoted) is PRUNED, so Optuna's front compares full scores only, and one that
lacks an objective's metric is FAIL. Everything that would write raises
:class:`ReadOnlyStorageError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from evomerge.optimize import Objective
from evomerge.study.read import config_objectives
from evomerge.study.store import StudyStore, TrialView
from evomerge.util import first_line

logger = logging.getLogger(__name__)

TRIAL_ID_STRIDE = 1_000_000_000
"""Optuna trial ids are unique over the storage: ``study id * stride + trial number``."""

STATES = {
    "QUEUED": TrialState.WAITING,
    "RUNNING": TrialState.RUNNING,
    "COMPLETE": TrialState.COMPLETE,
    "FAILED": TrialState.FAIL,
}
METRIC_NAMES_ATTR = "study:metric_names"
"""The system attribute in which Optuna (and the dashboard) look for objective names."""


class ReadOnlyStorageError(RuntimeError):
    """Raised by every method that would change the study database through Optuna."""

    def __init__(self, action: str) -> None:
        super().__init__(
            f"cannot {action}: evomerge's Optuna view of a study database is read-only "
            "(run, resume and export studies with the evomerge command)"
        )


@dataclass(frozen=True)
class _Gene:
    """One parameter as the dashboard shows it: a searched value in its own units, read from
    one coordinate of the genome, or a ``method_choice`` group's method, read from its
    one-of-k coordinates (the highest wins, ties to the first, as the space decodes it), or a
    yes/no choice read from one coordinate (the second choice above ``threshold``)."""

    name: str
    distribution: BaseDistribution
    coords: tuple[int, ...]
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: tuple[str, ...] = ()
    threshold: float | None = None

    def value(self, genome: Sequence[float]) -> float | str:
        if self.threshold is not None:
            return self.choices[1 if float(genome[self.coords[0]]) > self.threshold else 0]
        if self.choices:
            units = [float(genome[i]) for i in self.coords]
            return self.choices[units.index(max(units))]
        unit = min(1.0, max(0.0, float(genome[self.coords[0]])))
        if self.log:
            return math.exp(math.log(self.low) + unit * (math.log(self.high) - math.log(self.low)))
        return self.low + unit * (self.high - self.low)


@dataclass(frozen=True)
class _Study:
    id: int
    name: str
    objectives: list[Objective]
    genes: list[_Gene] | None
    """None until the space has been bound (or failed to bind) for this study."""
    frozen: FrozenStudy


class StudyStorageView(BaseStorage):
    """Optuna's storage interface over an evomerge :class:`StudyStore`, for reading."""

    def __init__(self, store: StudyStore, bind_spaces: bool = True) -> None:
        self.store = store
        self.bind_spaces = bind_spaces
        self._genes: dict[str, list[_Gene]] = {}
        self._configs: dict[str, dict[str, Any]] = {}

    # -- studies -----------------------------------------------------------------------------

    def _studies(self) -> list[_Study]:
        studies = []
        for row in self.store.studies():
            config = self._config(row["name"])
            objectives = config_objectives(config, row["name"], required=False)
            directions = [
                StudyDirection.MAXIMIZE if o.direction == "maximize" else StudyDirection.MINIMIZE
                for o in objectives
            ]
            user_attrs = {
                "status": row["status"],
                "budget": row["budget"],
                "elapsed_hours": round(row["elapsed_seconds"] / 3600, 3),
                "proposer": (config.get("proposer") or {}).get("kind", "cma"),
                "base": config.get("base"),
                "sources": config.get("sources"),
            }
            system_attrs = {METRIC_NAMES_ATTR: [o.metric for o in objectives]}
            frozen = FrozenStudy(
                study_name=row["name"],
                direction=None,
                directions=directions,
                user_attrs=user_attrs,
                system_attrs=system_attrs,
                study_id=row["id"],
            )
            genes = self._genes.get(row["name"])
            studies.append(_Study(row["id"], row["name"], objectives, genes, frozen))
        return studies

    def _config(self, name: str) -> dict[str, Any]:
        if name not in self._configs:  # a study's config never changes once created
            self._configs[name] = self.store.study_config(name)
        return self._configs[name]

    def _study(self, study_id: int) -> _Study:
        for study in self._studies():
            if study.id == study_id:
                return study
        raise KeyError(f"no study with id {study_id}")

    def get_all_studies(self) -> list[FrozenStudy]:
        return [s.frozen for s in self._studies()]

    def get_study_id_from_name(self, study_name: str) -> int:
        for study in self._studies():
            if study.name == study_name:
                return study.id
        raise KeyError(f"no study named {study_name!r}")

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._study(study_id).name

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._study(study_id).frozen.directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._study(study_id).frozen.user_attrs)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._study(study_id).frozen.system_attrs)

    # -- trials --------------------------------------------------------------------------------

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        study = self._study(study_id)
        genes = self._study_genes(study)
        trials = [self._frozen(study, genes, t) for t in self.store.trials(study.name)]
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return trials

    def get_trial(self, trial_id: int) -> FrozenTrial:
        study_id, number = divmod(trial_id, TRIAL_ID_STRIDE)
        for trial in self.get_all_trials(study_id, deepcopy=False):
            if trial.number == number:
                return trial
        raise KeyError(f"no trial with id {trial_id}")

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return study_id * TRIAL_ID_STRIDE + trial_number

    def _frozen(self, study: _Study, genes: list[_Gene], trial: TrialView) -> FrozenTrial:
        values = trial.values(study.objectives)
        state = STATES.get(trial.state, TrialState.FAIL)
        finite = values is not None and all(math.isfinite(v) for v in values)
        cheap_only = state == TrialState.COMPLETE and not trial.metrics and bool(trial.scores)
        if cheap_only:
            state = TrialState.PRUNED  # scored on a subset only, never promoted: not compared
        elif state == TrialState.COMPLETE and not finite:
            state = TrialState.FAIL
        params, distributions = _params(genes, trial.genome)
        user_attrs: dict[str, Any] = {
            "role": trial.role,
            "label": trial.label,
            "fidelity": trial.fidelity,
            "worker": trial.worker,
            "attempts": trial.attempts,
            "merge_seconds": trial.merge_seconds,
            "eval_seconds": trial.eval_seconds,
        }
        if trial.error:
            user_attrs["error"] = trial.error
        fidelity, metrics = trial.search_scores
        prefix = "metric:" if fidelity == "full" else f"metric@{fidelity}:"
        user_attrs.update({f"{prefix}{k}": v for k, v in sorted(metrics.items())})
        user_attrs.update({f"holdout:{k}": v for k, v in sorted(trial.holdout.items())})
        return FrozenTrial(
            number=trial.number,
            state=state,
            value=None,
            values=values if state == TrialState.COMPLETE else None,
            datetime_start=trial.created_at,
            datetime_complete=trial.finished_at if state.is_finished() else None,
            params=params,
            distributions=distributions,
            user_attrs={k: v for k, v in user_attrs.items() if v is not None},
            system_attrs={},
            intermediate_values={},
            trial_id=study.id * TRIAL_ID_STRIDE + trial.number,
        )

    def _study_genes(self, study: _Study) -> list[_Gene]:
        """The space's genes for this study, bound once; [] if it cannot be bound here."""
        if study.genes is not None:
            return study.genes
        genes: list[_Gene] = []
        if self.bind_spaces:
            genes = _bind_genes(study.name, self._config(study.name))
        self._genes[study.name] = genes
        return genes

    # -- writes: refused -----------------------------------------------------------------------

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        raise ReadOnlyStorageError("create a study")

    def delete_study(self, study_id: int) -> None:
        raise ReadOnlyStorageError("delete a study")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStorageError("set a study attribute")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStorageError("save a study note or setting")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        raise ReadOnlyStorageError("add a trial")

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        raise ReadOnlyStorageError("set a trial parameter")

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        raise ReadOnlyStorageError("tell a trial's result")

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        raise ReadOnlyStorageError("report an intermediate value")

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStorageError("set a trial attribute")

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStorageError("save a trial note")


def _params(
    genes: Sequence[_Gene], genome: Sequence[float] | None
) -> tuple[dict[str, float], dict[str, BaseDistribution]]:
    if not genome:
        return {}, {}
    if sum(len(g.coords) for g in genes) != len(genome):  # not bound here: unit coordinates
        unit = FloatDistribution(0.0, 1.0)
        names = [f"gene_{i}" for i in range(len(genome))]
        return dict(zip(names, genome)), dict.fromkeys(names, unit)
    params = {g.name: g.value(genome) for g in genes}
    return params, {g.name: g.distribution for g in genes}


def _bind_genes(study: str, config: Mapping[str, Any]) -> list[_Gene]:
    """Bind the study's space to its base model (config files only; no weights are read)."""
    try:
        from evomerge.checkpoint import ModelFolder, source_labels
        from evomerge.dataflow.space import THRESHOLD
        from evomerge.space import space_from_setting

        labels = source_labels(config["sources"])
        space = space_from_setting(config["space"]).bind(ModelFolder(config["base"]), labels)
    except KeyError as exc:
        logger.warning(
            "study '%s': parameters shown as gene_0.. in [0, 1]: its space cannot be bound "
            "(its config has no %s)",
            study,
            exc,
        )
        return []
    except Exception as exc:  # a missing model folder, a moved space file: fall back, loudly
        logger.warning(
            "study '%s': parameters shown as gene_0.. in [0, 1]: its space cannot be bound "
            "here (%s)",
            study,
            first_line(exc),
        )
        return []
    if len({g.name for g in space.genes}) != len(space.genes):
        return []
    groups = space.categorical_groups()
    yes_no = {  # one coordinate, two choices: a threshold, not a one-of-k group
        indices[0]: names for indices, names in groups if len(indices) == 1 and len(names) == 2
    }
    genes = []
    for index, gene in enumerate(space.genes):
        if index in yes_no:  # a data-flow use gene: used above the threshold
            names = yes_no[index]
            distribution: BaseDistribution = CategoricalDistribution(names)
            genes.append(
                _Gene(gene.name, distribution, (index,), choices=tuple(names), threshold=THRESHOLD)
            )
            continue
        if gene.choice is not None:
            continue  # shown per group, below
        low, high = gene.searched.bounds
        log = gene.searched.scale == "log"
        distribution = FloatDistribution(low, high, log=log)
        genes.append(_Gene(gene.name, distribution, (index,), low, high, log))
    for indices, names in groups:  # a method choice: one categorical
        if len(indices) == 1 and indices[0] in yes_no:
            continue
        name = space.genes[indices[0]].name.split("=", 1)[0]
        distribution = CategoricalDistribution(names)
        genes.append(_Gene(name, distribution, tuple(indices), choices=tuple(names)))
    return genes
