"""CMA-ES (pycma) with IPOP/BIPOP restarts, kind ``cma``.

Generations: pycma samples a whole generation at once; ``ask()`` hands its solutions out one
at a time. When all of them are out but some are not yet told, ``ask()`` returns None (a
generation boundary); the last result of the generation completes it (``es.tell``), and the
next ``ask()`` samples the next generation. With ``ask_ahead: K``, ``ask()`` at the boundary
instead samples up to K more genomes from the same distribution (``es.ask(1)``), and the
generation is updated from the first ``popsize`` results to arrive, told in the order they were
handed out; results arriving after the update are dropped here (the study keeps them). Once the
last run stops, ``finished`` is True and ``ask()`` returns None for good.

Fitness: pycma minimizes ``-scalarize(objectives, values)``. A failed proposal gets the worst
fitness told in its generation; a generation in which every proposal failed is discarded
(never told to pycma) and re-sampled.

Runs and restarts: a run stops when pycma's own criteria fire (``es.stop()``), when every
fitness of a generation is equal (``tie_restart``; common with small evaluation sets), or
after ``max_generations_per_run``. A restart starts again from ``x0``; by default there is no
limit on restarts, so a study runs to its budget (``restarts`` caps them; the proposer is
finished when the last allowed run stops). :meth:`CMAProposer.describe` tells how many
restarts there were and why, for ``evomerge status``. IPOP: run ``k`` has
``popsize * incpopsize**k`` and ``sigma0``. BIPOP alternates: odd runs are large (the IPOP
schedule over the large runs only), even runs (after the first) are small, with
``u ~ U(0, 1)``: popsize ``int(popsize * (0.5 * last_large / popsize) ** (u ** 2))`` and step
``sigma0 * 10 ** (-2 u)``. Run ``k`` seeds its random numbers from ``(seed, k)``.

Randomness: pycma draws from numpy's global RNG. The proposer keeps its own copy of that
generator's state and swaps it in around every pycma call (so other users of ``np.random``
do not change the proposals, and vice versa; not thread-safe).

State: a pickle of the pycma ``CMAEvolutionStrategy``, the current generation's solutions and
told fitnesses, the run bookkeeping and the private RNG state. No files are written
(pycma's logging is off).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field, field_validator

from evomerge.errors import ConfigError
from evomerge.optimize.base import Proposer, ProposerConfig
from evomerge.optimize.registry import register_proposer

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Could not import matplotlib")
    import cma
    from cma.utilities.utils import SolutionDict

T = TypeVar("T")


class CMAConfig(ProposerConfig):
    """pycma CMA-ES over the unit cube; ``sigma0`` and ``x0`` are in unit-cube coordinates."""

    kind: Literal["cma"] = "cma"
    sigma0: float = Field(default=0.25, gt=0, allow_inf_nan=False)
    """Initial step size of each run, in unit-cube coordinates: 0.25 is a quarter of every
    gene's range (of its log range on a log scale). BIPOP's small runs scale it down."""
    x0: list[float] | float | None = None
    """Start (and restart) point: None is 0.5 for every gene; a list has one value per gene."""
    popsize: int | None = Field(default=None, ge=2)
    """Genomes per generation of the first run (restarts grow it). None is pycma's default,
    ``4 + int(3 ln d)`` for ``d`` genes."""
    restarts: int | None = Field(default=None, ge=0)
    """New runs started from ``x0`` after a run stops (a tie, pycma's stop criteria, or
    ``max_generations_per_run``). None (the default) restarts without limit, so the search
    runs to the study's budget; a number caps the restarts (0 runs once), and when the last
    run stops the proposer is finished and the study ends before its budget."""
    restart_strategy: Literal["ipop", "bipop"] = "ipop"
    """How restarts are sized: ``ipop`` grows the population by ``incpopsize`` every restart;
    ``bipop`` alternates such growing runs with small runs of a random, smaller population and
    step size."""
    incpopsize: float = Field(default=2.0, ge=1, allow_inf_nan=False)
    """Factor by which the population grows from one (large) run to the next: IPOP run ``k``
    has ``popsize * incpopsize**k`` genomes per generation; 1 keeps it constant."""
    tie_restart: bool = True
    """Stop a run (and restart, see ``restarts``) when all fitnesses of a generation are
    equal: CMA-ES learns nothing from such a generation."""
    max_generations_per_run: int | None = Field(default=None, ge=1)
    """Generations after which a run stops (and the next restart, if any, begins); None leaves
    stopping to pycma's own criteria and ``tie_restart``."""
    ask_ahead: int = Field(default=0, ge=0)
    """Extra genomes a generation may hand out, sampled from the same distribution, once its
    ``popsize`` genomes are all out and results are pending: a free worker then scores one
    instead of waiting at the generation boundary. The generation is updated from the first
    ``popsize`` results to arrive (so candidates that score faster weigh in more often); a
    result arriving after the update is recorded in the study but not told to CMA-ES. 0 waits
    at every boundary."""

    @field_validator("x0")
    @classmethod
    def _x0_in_cube(cls, value: list[float] | float | None) -> list[float] | float | None:
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not values and isinstance(value, list):
            raise ValueError("x0 must not be empty")
        for v in values:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"x0 values must be within [0, 1], got {v}")
        return value


def _global_randn(*shape: int) -> np.ndarray:
    """pycma's ``randn`` option: pickles by name, so a restored strategy still draws from the
    global generator (into which the proposer swaps its own state)."""
    return np.random.randn(*shape)


def _rehash_solution_dicts(root: Any) -> None:
    """Re-key every pycma ``SolutionDict`` reachable from ``root``.

    pycma keys solutions by ``hash(x.tobytes())``, and bytes hash differently in another
    process (hash randomization): without re-keying, a strategy unpickled elsewhere no longer
    finds the genotypes of the solutions it handed out, and its next update differs slightly.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, SolutionDict):
            new = {old: obj.key(x) for old, x in obj._unhashed_keys.items()}
            obj.data = {new.get(k, k): v for k, v in obj.data.items()}
            obj.data_with_same_key = {new.get(k, k): v for k, v in obj.data_with_same_key.items()}
            obj._unhashed_keys = {new[k]: x for k, x in obj._unhashed_keys.items()}
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple):
            stack.extend(obj)
        elif type(obj).__module__.startswith("cma.") and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())


def _reason_text(reason: str) -> str:
    """Why a run stopped, for people: ``tie``, ``max_generations`` or pycma's criteria."""
    if reason == "tie":
        return "tie: all fitnesses equal"
    if reason == "max_generations":
        return "max_generations_per_run reached"
    return f"pycma: {reason}"


def _run_seed(seed: int, run: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, run, stream]).generate_state(1)[0]) or 1


@register_proposer("cma", CMAConfig)
class CMAProposer(Proposer):
    """CMA-ES; see the module docstring for generations, failures, restarts and state."""

    multi_objective = False
    config: CMAConfig

    def __init__(
        self,
        config: CMAConfig,
        dimension: int,
        objectives: Any,
        *,
        categorical: Sequence[Sequence[int]] = (),
    ) -> None:
        """``categorical`` groups are kept (and saved) but searched as ordinary coordinates:
        a search space decodes each one-of-k group by its argmax."""
        super().__init__(config, dimension, objectives, categorical=categorical)
        if isinstance(config.x0, list) and len(config.x0) != self.dimension:
            raise ConfigError(
                f"proposer (cma): x0 has {len(config.x0)} values but genomes have "
                f"{self.dimension} genes"
            )
        self.restarts_done = 0
        self.runs: list[dict[str, Any]] = []
        """One record per finished run: popsize, sigma0, generations, stop reason."""
        self._finished = False
        self._sample = 0
        """Counts the populations asked (a generation sampled again after all of it failed is
        a new one), so a result asked ahead of an earlier one is told apart."""
        self._start_run(0)

    # -- runs ------------------------------------------------------------------------------

    @property
    def base_popsize(self) -> int:
        return self.config.popsize or 4 + int(3 * math.log(self.dimension))

    def regime(self, run: int) -> tuple[int, float]:
        """(popsize, sigma0) of run ``run`` (0 is the first run)."""
        base, inc, sigma0 = self.base_popsize, self.config.incpopsize, self.config.sigma0
        if self.config.restart_strategy == "ipop" or run == 0:
            return round(base * inc**run), sigma0
        n_large = (run + 1) // 2
        if run % 2 == 1:
            return round(base * inc**n_large), sigma0
        u = np.random.default_rng(_run_seed(self.config.seed, run, 1)).random()
        popsize = int(base * (0.5 * inc**n_large) ** (u**2))
        return max(2, popsize), sigma0 * 10 ** (-2 * u)

    def _start_run(self, run: int) -> None:
        popsize, sigma0 = self.regime(run)
        x0 = self.config.x0
        if x0 is None:
            x0 = 0.5
        x0_vec = list(x0) if isinstance(x0, list) else [float(x0)] * self.dimension
        options = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "seed": math.nan,  # seeding is ours: the private RNG state below
            "randn": _global_randn,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        self._run = run
        self._generation = 0
        self._run_popsize, self._run_sigma0 = popsize, sigma0
        self._rng_state = np.random.RandomState(_run_seed(self.config.seed, run)).get_state()
        self._es = self._call(cma.CMAEvolutionStrategy, x0_vec, sigma0, options)
        self._solutions: list[np.ndarray] = []
        self._handed = 0
        self._fitness: dict[int, float | None] = {}

    def _end_run(self, reason: str) -> None:
        self.runs.append(
            {
                "run": self._run,
                "popsize": self._run_popsize,
                "sigma0": self._run_sigma0,
                "generations": self._generation,
                "reason": reason,
            }
        )
        if self.config.restarts is None or self.restarts_done < self.config.restarts:
            self.restarts_done += 1
            self._start_run(self._run + 1)
        else:
            self._finished = True
            self._solutions = []

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` with the proposer's RNG state swapped into ``np.random``."""
        outer = np.random.get_state()
        np.random.set_state(self._rng_state)
        try:
            return fn(*args)
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(outer)

    # -- ask/tell --------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def generation(self) -> int:
        """Generations completed in the current run."""
        return self._generation

    @property
    def popsize(self) -> int:
        """Population size of the current run."""
        return self._run_popsize

    def describe(self) -> dict[str, str]:
        """Restarts so far and why, and the current run: ``{"CMA-ES restarts": "2 (tie: all
        fitnesses equal)", "CMA-ES run": "3 of 3: population 32, 1 generation done"}``."""
        reasons = Counter(_reason_text(r["reason"]) for r in self.runs[: self.restarts_done])
        why = ", ".join(
            text if count == self.restarts_done else f"{count}x {text}"
            for text, count in reasons.items()
        )
        cap = "" if self.config.restarts is None else f" of at most {self.config.restarts}"
        notes = {"CMA-ES restarts": f"{self.restarts_done}{cap}" + (f" ({why})" if why else "")}
        if self._finished:
            last = _reason_text(self.runs[-1]["reason"]) if self.runs else "stopped"
            notes["CMA-ES run"] = f"finished: the last allowed run stopped ({last})"
        else:
            done = self._generation
            notes["CMA-ES run"] = (
                f"{self._run + 1}: population {self._run_popsize}, "
                f"{done} generation{'' if done == 1 else 's'} done"
            )
        return notes

    @classmethod
    def _saved_config(cls, saved: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
        """``restarts`` defaulted to 0 before it defaulted to None (no limit): a study that
        never set it continues without a limit."""
        if saved.get("restarts") == 0 and now.get("restarts") is None:
            return {**saved, "restarts": None}
        return saved

    def _propose(self) -> tuple[np.ndarray, Any] | None:
        if self._finished:
            return None
        if not self._solutions:
            self._solutions = list(self._call(self._es.ask))
            self._handed = 0
            self._fitness = {}
            self._sample += 1
        if self._handed == len(self._solutions):
            if len(self._solutions) >= self._run_popsize + self.config.ask_ahead:
                return None  # generation boundary: wait for the pending results
            self._solutions += self._call(self._es.ask, 1)  # ask ahead, same distribution
        index = self._handed
        self._handed += 1
        return self._solutions[index], (self._run, self._generation, index, self._sample)

    def _observe(self, token: Any, genome: np.ndarray, values: tuple[float, ...]) -> None:
        self._record(token, -self.score(values))

    def _observe_failure(self, token: Any, genome: np.ndarray) -> None:
        self._record(token, None)

    def _record(self, token: tuple[int, ...], fitness: float | None) -> None:
        run, generation, index = token[:3]
        sample = token[3] if len(token) > 3 else self._sample  # tokens saved before ask_ahead
        if (run, generation, sample) != (self._run, self._generation, self._sample):
            if self.config.ask_ahead:  # asked ahead, arrived after its generation's update
                return
            raise RuntimeError(f"cma: result for generation {token} arrived too late")
        self._fitness[index] = fitness
        if len(self._fitness) >= self._run_popsize:
            self._complete_generation()

    def _complete_generation(self) -> None:
        # The first popsize results to arrive, in the order they were handed out (without
        # asking ahead: every genome of the generation, as pycma asked them).
        chosen = sorted(list(self._fitness)[: self._run_popsize])
        told = [self._fitness[i] for i in chosen]
        ok = [f for f in told if f is not None]
        if not ok:  # nothing to learn from: sample this generation again
            self._solutions = []
            return
        worst = max(ok)
        fitnesses = [worst if f is None else f for f in told]
        self._call(self._es.tell, [self._solutions[i] for i in chosen], fitnesses)
        self._generation += 1
        self._solutions = []
        limit = self.config.max_generations_per_run
        stop = self._call(self._es.stop)
        if self.config.tie_restart and max(fitnesses) == min(fitnesses):
            self._end_run("tie")
        elif limit is not None and self._generation >= limit:
            self._end_run("max_generations")
        elif stop:
            self._end_run(", ".join(sorted(stop)))

    # -- state -----------------------------------------------------------------------------

    _STATE_FIELDS = (
        "_es",
        "_rng_state",
        "_run",
        "_generation",
        "_run_popsize",
        "_run_sigma0",
        "_solutions",
        "_handed",
        "_fitness",
        "_sample",
        "_finished",
        "restarts_done",
        "runs",
    )

    def _get_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._STATE_FIELDS}

    def _set_state(self, state: dict[str, Any]) -> None:
        state = {"_sample": 0, **state}  # saved before ask_ahead: one sample per generation
        for name in self._STATE_FIELDS:
            setattr(self, name, state[name])
        _rehash_solution_dicts(self._es)
        restarts = self.config.restarts
        if self._finished and (restarts is None or self.restarts_done < restarts):
            # Saved finished under a lower cap (the old default was 0): restart as _end_run
            # would have with this config.
            self._finished = False
            self.restarts_done += 1
            self._start_run(self._run + 1)
