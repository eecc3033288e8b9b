"""Optuna samplers behind the proposer interface: kinds ``tpe``, ``nsga2``, ``optuna-cmaes``,
``gp``, ``random`` and ``qmc``.

Each proposer drives an in-memory study by ask/tell, with one float parameter per gene
(``g0000``, ``g0001``, ...) in [0, 1], except for the proposer's ``categorical`` groups: each
is one categorical parameter (``c000``, ``c001``, ...) choosing an index in the group, and the
genome holds 1.0 at the chosen coordinate and 0.0 at the others; a group of one coordinate is a
yes/no parameter whose coordinate is 0.0 or 1.0. Multi-objective samplers
(all but ``optuna-cmaes``) get one study direction per objective and the raw values;
``optuna-cmaes`` gets one direction (maximize) and the scalarized value. Results may arrive in
any order; ``ask()`` never returns None.

Failures: a failed proposal is told to the study as a FAIL trial. The samplers ignore failed
trials (NSGA-II leaves them out of its populations; Optuna's CMA-ES samples more members for
that generation), so a failure costs one evaluation and teaches nothing.

State: a pickle of the sampler object (with its random generator and caches), every trial of
the study as a ``FrozenTrial`` (including the RUNNING ones in flight), and the study's system
attributes (NSGA-II caches its parent populations there). A restore adds the trials to a new
in-memory study that uses the unpickled sampler; the RUNNING ones can then be told.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler
from optuna.trial import TrialState
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.optimize.base import Proposer, ProposerConfig
from evomerge.optimize.registry import register_proposer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


class OptunaProposer(Proposer):
    """Base of the Optuna kinds: subclasses say how to build their sampler."""

    multi_objective = True

    def __init__(
        self,
        config: ProposerConfig,
        dimension: int,
        objectives: Any,
        *,
        categorical: Sequence[Sequence[int]] = (),
    ) -> None:
        super().__init__(config, dimension, objectives, categorical=categorical)
        if optuna.logging.get_verbosity() < logging.WARNING:
            optuna.logging.set_verbosity(logging.WARNING)
        self._names = [f"g{i:04d}" for i in range(self.dimension)]
        with _quiet():
            self._sampler = self.make_sampler()
        self._study = self._new_study()

    @abstractmethod
    def make_sampler(self) -> BaseSampler:
        """The sampler this kind's config describes."""

    @property
    def study(self) -> optuna.Study:
        """The in-memory study (read it; do not ask or tell it directly)."""
        return self._study

    def _directions(self) -> list[str]:
        if self.multi_objective:
            return [o.direction for o in self.objectives]
        return ["maximize"]

    def _new_study(self) -> optuna.Study:
        with _quiet():
            return optuna.create_study(directions=self._directions(), sampler=self._sampler)

    def _propose(self) -> tuple[np.ndarray, Any]:
        with _quiet():
            trial = self._study.ask()
            genome = np.zeros(self.dimension, dtype=np.float64)
            groups = {group[0]: (number, group) for number, group in enumerate(self.categorical)}
            grouped = {i for group in self.categorical for i in group}
            for index, name in enumerate(self._names):
                if index in groups:
                    number, group = groups[index]
                    if len(group) == 1:  # a yes/no choice
                        pick = trial.suggest_categorical(f"c{number:03d}", [0, 1])
                        genome[index] = float(pick)
                        continue
                    pick = trial.suggest_categorical(f"c{number:03d}", list(range(len(group))))
                    genome[group[int(pick)]] = 1.0
                elif index not in grouped:
                    genome[index] = trial.suggest_float(name, 0.0, 1.0)
        return genome, trial.number

    def _observe(self, token: Any, genome: np.ndarray, values: tuple[float, ...]) -> None:
        told = list(values) if self.multi_objective else [self.score(values)]
        with _quiet():
            self._study.tell(token, told)

    def _observe_failure(self, token: Any, genome: np.ndarray) -> None:
        with _quiet():
            self._study.tell(token, state=TrialState.FAIL)

    def _get_state(self) -> dict[str, Any]:
        storage, study_id = self._study._storage, self._study._study_id
        return {
            "sampler": self._sampler,
            "trials": self._study.get_trials(deepcopy=False),
            "system_attrs": storage.get_study_system_attrs(study_id),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._sampler = state["sampler"]
        self._study = self._new_study()
        storage, study_id = self._study._storage, self._study._study_id
        for key, value in state["system_attrs"].items():
            storage.set_study_system_attr(study_id, key, value)
        with _quiet():
            self._study.add_trials(state["trials"])


class TPEConfig(ProposerConfig):
    """Optuna's TPE sampler; handles several objectives itself."""

    kind: Literal["tpe"] = "tpe"
    n_startup_trials: int = Field(default=10, ge=0)
    """Genomes are drawn uniformly at random until this many results have come back (failed
    proposals do not count); TPE models the results from then on."""
    multivariate: bool = True
    """Model the genes jointly (multivariate TPE), so correlated genes are sampled together;
    false models each gene on its own."""


@register_proposer("tpe", TPEConfig)
class TPEProposer(OptunaProposer):
    """Tree-structured Parzen estimator (Optuna's default, constant liar for pending trials)."""

    config: TPEConfig

    def make_sampler(self) -> BaseSampler:
        return optuna.samplers.TPESampler(
            seed=self.config.seed,
            n_startup_trials=self.config.n_startup_trials,
            multivariate=self.config.multivariate,
        )


class NSGA2Config(ProposerConfig):
    """Optuna's NSGA-II genetic algorithm, for a Pareto front of several objectives."""

    kind: Literal["nsga2"] = "nsga2"
    population_size: int = Field(default=20, ge=2)
    """Genomes per generation: the first generation is uniformly random, later ones are bred
    (crossover and mutation) from parents chosen by non-dominated sorting."""


@register_proposer("nsga2", NSGA2Config)
class NSGA2Proposer(OptunaProposer):
    """NSGA-II genetic algorithm (multi-objective)."""

    config: NSGA2Config

    def make_sampler(self) -> BaseSampler:
        return optuna.samplers.NSGAIISampler(
            seed=self.config.seed, population_size=self.config.population_size
        )


class OptunaCMAESConfig(ProposerConfig):
    """Optuna's CMA-ES sampler, on the scalarized objectives."""

    kind: Literal["optuna-cmaes"] = "optuna-cmaes"
    sigma0: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Initial step size in unit-cube coordinates. None is Optuna's default (a sixth of the
    range)."""


@register_proposer("optuna-cmaes", OptunaCMAESConfig)
class OptunaCMAESProposer(OptunaProposer):
    """Optuna's CMA-ES sampler (needs the ``cmaes`` package); optimizes the scalarization."""

    multi_objective = False
    config: OptunaCMAESConfig

    def make_sampler(self) -> BaseSampler:
        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError(
                "proposer (optuna-cmaes) needs the 'cmaes' package: pip install cmaes"
            )
        return optuna.samplers.CmaEsSampler(
            sigma0=self.config.sigma0, seed=self.config.seed, warn_independent_sampling=False
        )


class GPConfig(ProposerConfig):
    """Optuna's Gaussian-process Bayesian optimization (needs torch)."""

    kind: Literal["gp"] = "gp"
    n_startup_trials: int = Field(default=10, ge=0)
    """Genomes are drawn uniformly at random until this many results have come back (failed
    proposals do not count); the Gaussian process guides the search from then on."""


@register_proposer("gp", GPConfig)
class GPProposer(OptunaProposer):
    """Gaussian-process Bayesian optimization (uses torch)."""

    config: GPConfig

    def make_sampler(self) -> BaseSampler:
        return optuna.samplers.GPSampler(
            seed=self.config.seed,
            n_startup_trials=self.config.n_startup_trials,
            warn_independent_sampling=False,
        )


class RandomConfig(ProposerConfig):
    """Independent uniformly random genomes (a baseline for the other proposers)."""

    kind: Literal["random"] = "random"


@register_proposer("random", RandomConfig)
class RandomProposer(OptunaProposer):
    """Independent uniform samples."""

    config: RandomConfig

    def make_sampler(self) -> BaseSampler:
        return optuna.samplers.RandomSampler(seed=self.config.seed)


class QMCConfig(ProposerConfig):
    """A scrambled quasi-random sequence that covers the unit cube evenly; learns nothing."""

    kind: Literal["qmc"] = "qmc"
    qmc_type: Literal["sobol", "halton"] = "sobol"
    """The low-discrepancy sequence genomes are taken from (scrambled with ``seed``)."""


@register_proposer("qmc", QMCConfig)
class QMCProposer(OptunaProposer):
    """Scrambled quasi-random (Sobol or Halton) sequence; the first genome is uniform random."""

    config: QMCConfig

    def make_sampler(self) -> BaseSampler:
        return optuna.samplers.QMCSampler(
            qmc_type=self.config.qmc_type,
            scramble=True,
            seed=self.config.seed,
            warn_independent_sampling=False,
        )
