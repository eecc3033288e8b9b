"""Evaluators: score an in-memory model with lm-eval tasks, perplexity, or a user's function."""

from evomerge.evaluate.base import EvalResult, Evaluator, EvaluatorConfig
from evomerge.evaluate.registry import (
    available_evaluators,
    build_evaluator,
    parse_evaluator_config,
    register_evaluator,
)

__all__ = [
    "EvalResult",
    "Evaluator",
    "EvaluatorConfig",
    "available_evaluators",
    "build_evaluator",
    "parse_evaluator_config",
    "register_evaluator",
]
