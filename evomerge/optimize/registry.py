"""Proposer kinds by name: adding one is one module with one ``@register_proposer``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from evomerge.errors import ConfigError
from evomerge.optimize.base import Proposer, ProposerConfig
from evomerge.optimize.objectives import Objective

_PROPOSERS: dict[str, type[Proposer]] = {}

P = TypeVar("P", bound=type[Proposer])


def register_proposer(kind: str, config_class: type[ProposerConfig]) -> Callable[[P], P]:
    """Class decorator: make a Proposer subclass available as ``kind``."""

    def add(cls: P) -> P:
        if kind in _PROPOSERS:
            raise ValueError(f"proposer kind {kind!r} is registered twice")
        cls.kind = kind
        cls.config_class = config_class
        _PROPOSERS[kind] = cls
        return cls

    return add


def _load_builtin() -> None:
    from evomerge.optimize import cma_proposer, optuna_proposer  # noqa: F401


def available_proposers() -> list[str]:
    _load_builtin()
    return sorted(_PROPOSERS)


def proposer_class(kind: str) -> type[Proposer]:
    _load_builtin()
    if kind not in _PROPOSERS:
        raise ConfigError(
            f"unknown proposer kind {kind!r}; available: {', '.join(sorted(_PROPOSERS))}"
        )
    return _PROPOSERS[kind]


def parse_proposer_config(
    data: Mapping[str, Any] | ProposerConfig, where: str = "proposer"
) -> ProposerConfig:
    """Validate a mapping (``kind`` picks the model) into that kind's config."""
    if isinstance(data, ProposerConfig):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'kind', got {data!r}")
    if "kind" not in data:
        raise ConfigError(f"{where}: missing 'kind' (one of {', '.join(available_proposers())})")
    try:
        cls = proposer_class(str(data["kind"]))
    except ConfigError as exc:
        raise ConfigError(f"{where}: kind: {exc}") from None
    try:
        return cls.config_class.model_validate(dict(data))
    except ValidationError as exc:
        from evomerge.util import pydantic_message

        raise ConfigError(f"{where} ({cls.kind}): {pydantic_message(exc)}") from None


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
