"""Proposer kinds by name: adding one is one module with one ``@register_proposer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.errors import ConfigError
from evomerge.optimize.base import Proposer, ProposerConfig
from evomerge.optimize.objectives import Objective
from evomerge.registry import KindRegistry

PROPOSERS: KindRegistry[Proposer, ProposerConfig] = KindRegistry(
    "proposer",
    ProposerConfig,
    ConfigError,
    plugins=("evomerge.optimize.cma_proposer", "evomerge.optimize.optuna_proposer"),
)

register_proposer = PROPOSERS.register
"""Class decorator ``@register_proposer(kind, ConfigClass)``: make a Proposer available."""
available_proposers = PROPOSERS.names
proposer_class = PROPOSERS.get
parse_proposer_config = PROPOSERS.parse


def build_proposer(
    config: Mapping[str, Any] | ProposerConfig,
    dimension: int,
    objectives: Sequence[Objective | Mapping[str, Any]],
    *,
    categorical: Sequence[Sequence[int]] = (),
) -> Proposer:
    """A fresh proposer of the kind ``config`` names, over genomes of ``dimension`` genes;
    ``categorical``: groups of coordinates that are one-of-k choices (see
    :attr:`Proposer.categorical`)."""
    parsed = parse_proposer_config(config)
    return proposer_class(parsed.kind)(parsed, dimension, objectives, categorical=categorical)


def restore_proposer(
    config: Mapping[str, Any] | ProposerConfig,
    dimension: int,
    objectives: Sequence[Objective | Mapping[str, Any]],
    state: bytes,
    *,
    categorical: Sequence[Sequence[int]] = (),
) -> Proposer:
    """The proposer ``state`` (from ``state_dict()``) describes, continuing exactly (with the
    ``categorical`` groups it was built with)."""
    parsed = parse_proposer_config(config)
    return proposer_class(parsed.kind).from_state(
        parsed, dimension, objectives, state, categorical=categorical
    )


def describe_state(state: bytes) -> dict[str, str]:
    """:meth:`Proposer.describe` of the proposer a ``state_dict()`` holds, rebuilt from the kind,
    config, dimension and objectives saved with it (no search space needed). Empty for kinds
    that describe nothing, and for a state this version cannot read."""
    import pickle

    try:
        data = pickle.loads(state)
        cls = proposer_class(data["kind"])
        if cls.describe is Proposer.describe:
            return {}
        config = parse_proposer_config(data["config"])
        groups = data.get("categorical", ())
        return cls.from_state(
            config, data["dimension"], data["objectives"], state, categorical=groups
        ).describe()
    except (ConfigError, KeyError, TypeError, ValueError, pickle.UnpicklingError, AttributeError):
        return {}
