"""Proposers: optimizers (CMA-ES, Optuna samplers) proposing genomes in [0, 1]^d by ask/tell."""

from evomerge.optimize.base import Proposal, Proposer, ProposerConfig
from evomerge.optimize.objectives import (
    Objective,
    dominates,
    pareto_front,
    parse_objectives,
    scalarize,
)
from evomerge.optimize.registry import (
    available_proposers,
    build_proposer,
    parse_proposer_config,
    register_proposer,
    restore_proposer,
)

__all__ = [
    "Objective",
    "Proposal",
    "Proposer",
    "ProposerConfig",
    "available_proposers",
    "build_proposer",
    "dominates",
    "pareto_front",
    "parse_objectives",
    "parse_proposer_config",
    "register_proposer",
    "restore_proposer",
    "scalarize",
]
