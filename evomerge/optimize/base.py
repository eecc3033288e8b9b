"""The proposer interface: optimizers that propose genomes in [0, 1]^d through ask/tell.

Several proposals may be in flight at once and results may arrive in any order. ``ask()``
returns None when the proposer cannot propose before some pending result arrives (or, for a
finished proposer, ever again). Each kind's module says how it treats failed proposals.

``state_dict()`` is a pickle (trusted input only) of everything the proposer knows: the
common bookkeeping here (next id, pending proposals with their genomes, counters, best) plus
the kind's own state. ``from_state`` rebuilds a proposer that, given the same tells, proposes
exactly the genomes the uninterrupted one would have; proposals in flight at save time are
still pending after the restore and can be told.
"""

from __future__ import annotations

import copyreg
import io
import math
import pickle
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.optimize.objectives import Objective, parse_objectives, scalarize

STATE_FORMAT = 1


class ProposerConfig(BaseModel):
    """Fields every proposer kind shares. Subclasses add ``kind: Literal[...]`` and their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    seed: int = Field(default=0, ge=0)
    """Seed of the proposer's random numbers: the same seed and the same sequence of asks and
    tells give the same genomes."""


@dataclass(frozen=True, eq=False)
class Proposal:
    """A genome to evaluate; tell its result back under ``id``."""

    id: int
    genome: np.ndarray
    """A read-only float64 copy, within [0, 1]."""


class Proposer(ABC):
    """An optimizer over the unit cube behind one ask/tell interface (not thread-safe)."""

    kind: ClassVar[str]
    config_class: ClassVar[type[ProposerConfig]]
    multi_objective: ClassVar[bool] = False
    """False: with several objectives, the proposer optimizes their ``scalarize``."""

    def __init__(
        self,
        config: ProposerConfig,
        dimension: int,
        objectives: Sequence[Objective | Mapping[str, Any]],
        *,
        categorical: Sequence[Sequence[int]] = (),
    ) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"proposer ({self.kind}): expected a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        if isinstance(dimension, bool) or not isinstance(dimension, int | np.integer):
            raise ConfigError(
                f"proposer ({self.kind}): dimension must be an int, got {dimension!r}"
            )
        if dimension < 1:
            raise ConfigError(f"proposer ({self.kind}): dimension must be >= 1, got {dimension}")
        self.config = config
        self.dimension = int(dimension)
        self.categorical = _check_categorical(self.kind, self.dimension, categorical)
        """Groups of coordinates that are one-of-k choices (a search space's method choice), or
        of one coordinate, a yes/no choice (a data-flow space's use genes): Optuna kinds suggest
        each as a categorical parameter and return it one-hot (a yes/no one as 0 or 1); the
        other kinds search them as numbers (the space decodes a group by its argmax, a yes/no
        coordinate by a threshold)."""
        self.objectives = parse_objectives(objectives)
        self.n_told = 0
        self.n_failed = 0
        self._next_id = 0
        self._pending: dict[int, tuple[np.ndarray, Any]] = {}
        self._best: tuple[np.ndarray, float] | None = None
        self.last_failure: tuple[int, str] | None = None
        """The id and reason of the latest ``tell_failed``."""

    # -- public interface ------------------------------------------------------------------

    def ask(self) -> Proposal | None:
        """The next genome to evaluate, or None if none can be proposed now."""
        proposed = self._propose()
        if proposed is None:
            return None
        genome, token = proposed
        genome = np.clip(np.array(genome, dtype=np.float64).reshape(-1), 0.0, 1.0)
        if genome.shape != (self.dimension,) or not np.all(np.isfinite(genome)):
            raise RuntimeError(f"{self.kind} proposed an invalid genome: {genome!r}")
        genome.setflags(write=False)
        proposal_id = self._next_id
        self._next_id += 1
        self._pending[proposal_id] = (genome, token)
        public = genome.copy()
        public.setflags(write=False)
        return Proposal(id=proposal_id, genome=public)

    def tell(self, proposal_id: int, values: Sequence[float]) -> None:
        """Report the raw objective values (in the objectives' order) of a pending proposal."""
        if isinstance(values, int | float | np.number):
            values = [values]  # type: ignore[list-item]
        numbers = tuple(float(v) for v in values)
        if len(numbers) != len(self.objectives):
            raise ValueError(
                f"proposal {proposal_id}: expected {len(self.objectives)} objective value(s), "
                f"got {len(numbers)}"
            )
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(
                f"proposal {proposal_id}: values must be finite, got {numbers}; "
                "use tell_failed for a proposal that could not be evaluated"
            )
        genome, token = self._take(proposal_id)
        self.n_told += 1
        score = scalarize(self.objectives, numbers)
        if self._best is None or score > self._best[1]:
            self._best = (genome, score)
        self._observe(token, genome, numbers)

    def tell_failed(self, proposal_id: int, reason: str = "") -> None:
        """Report that a pending proposal could not be evaluated."""
        genome, token = self._take(proposal_id)
        self.n_failed += 1
        self.last_failure = (proposal_id, reason)
        self._observe_failure(token, genome)

    @property
    def pending(self) -> list[int]:
        """Ids of the proposals handed out and not yet told."""
        return sorted(self._pending)

    @property
    def next_id(self) -> int:
        """The id the next proposal will get (ids count up from 0, one per proposal)."""
        return self._next_id

    @property
    def finished(self) -> bool:
        """True when the proposer will never propose again."""
        return False

    @property
    def best(self) -> tuple[np.ndarray, float] | None:
        """The told genome with the highest scalarized value, and that value."""
        if self._best is None:
            return None
        return self._best[0].copy(), self._best[1]

    def describe(self) -> dict[str, str]:
        """What this kind has to say about its own course, as ``{label: text}`` lines for
        ``evomerge status`` (e.g. ``{"CMA-ES restarts": "2 (tie: all fitnesses equal)"}``);
        nothing by default. Read from a restored state, so it covers resumed studies too."""
        return {}

    def state_dict(self) -> bytes:
        """Everything needed to continue exactly where this proposer is (a pickle)."""
        state = {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "config": self.config.model_dump(),
            "dimension": self.dimension,
            "objectives": [o.model_dump() for o in self.objectives],
            "categorical": self.categorical,
            "base": {
                "next_id": self._next_id,
                "pending": self._pending,
                "n_told": self.n_told,
                "n_failed": self.n_failed,
                "best": self._best,
                "last_failure": self.last_failure,
            },
            "impl": self._get_state(),
        }
        return _dumps(state)

    @classmethod
    def from_state(
        cls,
        config: ProposerConfig,
        dimension: int,
        objectives: Sequence[Objective | Mapping[str, Any]],
        state: bytes,
        *,
        categorical: Sequence[Sequence[int]] = (),
    ) -> Proposer:
        """A proposer continuing from ``state_dict()``; config, dimension, objectives and
        categorical groups must be the ones it was saved with (a state saved before groups
        existed has none)."""
        proposer = cls(config, dimension, objectives, categorical=categorical)
        where = f"proposer ({cls.kind}) state"
        try:
            data = pickle.loads(state)
        except Exception as exc:
            raise ConfigError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ConfigError(f"{where}: not a proposer state of format {STATE_FORMAT}")
        saved = {
            "kind": data.get("kind"),
            "config": data.get("config"),
            "dimension": data.get("dimension"),
            "objectives": data.get("objectives"),
            "categorical": data.get("categorical", ()),
        }
        now = {
            "kind": cls.kind,
            "config": proposer.config.model_dump(),
            "dimension": proposer.dimension,
            "objectives": [o.model_dump() for o in proposer.objectives],
            "categorical": proposer.categorical,
        }
        if isinstance(saved["config"], dict):
            saved["config"] = cls._saved_config(saved["config"], now["config"])
        for key, value in now.items():
            if saved[key] != value:
                raise ConfigError(f"{where}: saved with {key} {saved[key]!r}, not {value!r}")
        base = data["base"]
        proposer._next_id = base["next_id"]
        proposer._pending = base["pending"]
        proposer.n_told = base["n_told"]
        proposer.n_failed = base["n_failed"]
        proposer._best = base["best"]
        proposer.last_failure = base["last_failure"]
        proposer._set_state(data["impl"])
        return proposer

    # -- for subclasses --------------------------------------------------------------------

    @classmethod
    def _saved_config(cls, saved: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
        """A saved config as this version reads it (a kind whose defaults changed maps the old
        default to the new one here); ``now`` is the config being restored with."""
        return saved

    def score(self, values: Sequence[float]) -> float:
        """The scalarized value (to maximize) of raw objective values."""
        return scalarize(self.objectives, values)

    @abstractmethod
    def _propose(self) -> tuple[np.ndarray, Any] | None:
        """A genome and a token identifying it to this kind, or None."""

    @abstractmethod
    def _observe(self, token: Any, genome: np.ndarray, values: tuple[float, ...]) -> None:
        """Learn the raw objective values of the proposal ``token``."""

    @abstractmethod
    def _observe_failure(self, token: Any, genome: np.ndarray) -> None:
        """Learn that the proposal ``token`` could not be evaluated."""

    @abstractmethod
    def _get_state(self) -> Any:
        """This kind's state (picklable)."""

    @abstractmethod
    def _set_state(self, state: Any) -> None:
        """Replace this kind's state by one ``_get_state`` returned."""

    def _take(self, proposal_id: int) -> tuple[np.ndarray, Any]:
        if proposal_id not in self._pending:
            raise ValueError(
                f"proposal {proposal_id!r} is not pending (unknown, or already told); "
                f"pending: {self.pending}"
            )
        return self._pending.pop(proposal_id)


def _check_categorical(
    kind: str, dimension: int, groups: Sequence[Sequence[int]]
) -> tuple[tuple[int, ...], ...]:
    """Disjoint groups of coordinates in range, as tuples (a group of one is a yes/no choice)."""
    checked = tuple(tuple(int(i) for i in group) for group in groups)
    seen: set[int] = set()
    for group in checked:
        if not group or any(not 0 <= i < dimension for i in group) or seen & set(group):
            raise ConfigError(
                f"proposer ({kind}): categorical groups must be disjoint, non-empty, of "
                f"coordinates in [0, {dimension}); got {[list(g) for g in checked]}"
            )
        seen |= set(group)
    return checked


class _StatePickler(pickle.Pickler):
    """Stores each thread lock as a new, unlocked one. A sampler may hold a lock for its caches
    (Optuna 5.1's genetic samplers do); the state is taken between calls, when no lock is
    held, so nothing of it is lost."""

    dispatch_table: ClassVar[dict[type, Any]] = {
        **copyreg.dispatch_table,
        type(threading.Lock()): lambda lock: (threading.Lock, ()),
        type(threading.RLock()): lambda lock: (threading.RLock, ()),
    }


def _dumps(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    _StatePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(state)
    return buffer.getvalue()
