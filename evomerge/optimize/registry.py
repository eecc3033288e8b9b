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
) -> Proposer:
    """A fresh proposer of the kind ``config`` names, over genomes of ``dimension`` genes."""
    parsed = parse_proposer_config(config)
    return proposer_class(parsed.kind)(parsed, dimension, objectives)


def restore_proposer(
    config: Mapping[str, Any] | ProposerConfig,
    dimension: int,
    objectives: Sequence[Objective | Mapping[str, Any]],
    state: bytes,
) -> Proposer:
    """The proposer ``state`` (from ``state_dict()``) describes, continuing exactly."""
    parsed = parse_proposer_config(config)
    return proposer_class(parsed.kind).from_state(parsed, dimension, objectives, state)


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
        return cls.from_state(config, data["dimension"], data["objectives"], state).describe()
    except (ConfigError, KeyError, TypeError, ValueError, pickle.UnpicklingError, AttributeError):
        return {}
