"""Score a model with a user-written Python function.

``function`` is ``"package.module:function"`` (imported from ``sys.path``) or
``"path/to/file.py:function"`` (relative paths are resolved against the current working
directory). The function is called as ``fn(model, tokenizer, **options)``, plus ``limit=...`` when
it accepts a ``limit`` parameter or ``**kwargs``, and ``batch_size=...`` when the config sets one
(the function must then accept it; the suite halves it when the function runs out of memory),
and returns either ``{name: number}`` or one
number (reported as ``{prefix}/score``). It picks its own documents, so ``holdout`` is refused
and only ``split="search"`` exists. Preflight calls it once on a tiny stand-in model
(``probe_at_preflight``) to learn its metric names; what it returns there that is not metrics
is an ``EvaluatorReturnError``.

This imports and runs arbitrary code: only point it at code you trust, exactly as you would
before running it yourself.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import Field, field_validator

from evomerge.errors import EvaluationError
from evomerge.evaluate.base import (
    EvalResult,
    Evaluator,
    EvaluatorConfig,
    EvaluatorReturnError,
    Split,
    as_number,
    check_limit,
    check_split,
    numeric_metrics,
)
from evomerge.evaluate.registry import register_evaluator

_module_counter = itertools.count()


class PythonConfig(EvaluatorConfig):
    """A user function to call; ``options`` are passed to it as keyword arguments."""

    kind: Literal["python"] = "python"
    function: str = Field(min_length=1)
    """``package.module:function`` or ``path/to/file.py:function``, called as
    ``fn(model, tokenizer, **options)`` (plus ``limit`` when it takes one); it returns
    ``{name: number}`` or one number (``{prefix}/score``)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the function on every call (not ``limit``: set the
    evaluator's ``limit`` instead)."""
    name: str | None = Field(default=None, min_length=1)
    """Metric prefix; defaults to the function's name."""
    batch_size: int | None = Field(default=None, ge=1)
    """Passed to the function as ``batch_size=...`` (it must take that parameter or
    ``**kwargs``); halved for the rest of the worker's life when the function runs out of
    memory. None passes nothing, and running out of memory fails the trial at once."""

    holdout: None = None
    """Not available: a python evaluator chooses its own documents, so hold some out inside
    the function (``lm_eval`` and ``perplexity`` evaluators take a holdout fraction)."""

    @field_validator("holdout", mode="before")
    @classmethod
    def _no_holdout(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "not available for python evaluators: a python evaluator chooses its own "
                "documents, so hold some out inside the function (lm_eval and perplexity "
                "evaluators take a holdout fraction)"
            )
        return None

    @field_validator("options")
    @classmethod
    def _no_limit_option(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "limit" in value:
            raise ValueError("'limit' is not an option; set the evaluator's limit field instead")
        if "batch_size" in value:
            raise ValueError(
                "'batch_size' is not an option; set the evaluator's batch_size field instead "
                "(it is halved when the function runs out of memory)"
            )
        return value


def _is_path(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def _import_file(path_text: str, spec_text: str) -> ModuleType:
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_file():
        raise EvaluationError(f"python evaluator {spec_text}: file not found: {path}")
    module_name = f"_evomerge_user_{path.stem}_{next(_module_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise EvaluationError(f"python evaluator {spec_text}: cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise EvaluationError(
            f"python evaluator {spec_text}: importing {path} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def load_function(spec_text: str) -> tuple[Callable[..., Any], str]:
    """The callable ``spec_text`` names, and its short name."""
    module_part, sep, attr_part = spec_text.rpartition(":")
    if not sep or not module_part or not attr_part:
        raise EvaluationError(
            f"python evaluator {spec_text!r}: expected 'package.module:function' or "
            "'path/to/file.py:function'"
        )
    if _is_path(module_part):
        module = _import_file(module_part, spec_text)
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            raise EvaluationError(
                f"python evaluator {spec_text}: cannot import module {module_part!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    target: Any = module
    for part in attr_part.split("."):
        if not hasattr(target, part):
            raise EvaluationError(
                f"python evaluator {spec_text}: {module_part!r} has no attribute {attr_part!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise EvaluationError(
            f"python evaluator {spec_text}: {attr_part!r} is not callable "
            f"(it is a {type(target).__name__})"
        )
    return target, attr_part.rsplit(".", 1)[-1]


def _accepts(fn: Callable[..., Any], keyword: str) -> bool:
    """True when ``fn`` can be called with ``keyword=...`` (a parameter of that name or
    ``**kwargs``); False when its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == keyword and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in params
    )


def _check_batch_parameter(fn: Callable[..., Any], config: PythonConfig) -> None:
    """EvaluationError when the config sets ``batch_size`` and ``fn`` cannot take it."""
    if config.batch_size is not None and not _accepts(fn, "batch_size"):
        raise EvaluationError(
            f"python evaluator {config.function}: batch_size is set ({config.batch_size}) but "
            "the function takes no batch_size parameter (add one, or **kwargs, or drop "
            "batch_size from the config)"
        )


@register_evaluator("python", PythonConfig)
class PythonEvaluator(Evaluator):
    """Calls a user function on the model each time; see the module docstring."""

    config: PythonConfig
    probe_at_preflight = True

    def __init__(self, config: PythonConfig, model: Any, tokenizer: Any) -> None:
        super().__init__(config, model, tokenizer)
        self.function, short_name = load_function(config.function)
        self.prefix = config.name or short_name
        self.passes_limit = _accepts(self.function, "limit")
        _check_batch_parameter(self.function, config)
        self._batch_size = config.batch_size
        self.owner = f"python evaluator {config.function}"

    @property
    def name(self) -> str:
        return f"python:{self.prefix}"

    @property
    def batch_size(self) -> int | None:
        """The ``batch_size`` passed to the function now (None: the config sets none)."""
        return self._batch_size

    def resize_batch(self, size: int) -> None:
        if self._batch_size is None:
            super().resize_batch(size)
        self._batch_size = max(1, int(size))

    @classmethod
    def preflight(cls, config: EvaluatorConfig) -> set[str] | None:
        """A ``path.py:function`` is imported and looked up here already; a module is not (it
        may be installed only where the workers run)."""
        assert isinstance(config, PythonConfig)
        module_part, _, attr_part = config.function.rpartition(":")
        if _is_path(module_part) or not module_part or not attr_part:
            function, _ = load_function(config.function)
            _check_batch_parameter(function, config)
        return {config.name or attr_part.rsplit(".", 1)[-1]}

    def evaluate(self, limit: int | float | None = None, split: Split = "search") -> EvalResult:
        """Call the function; only the "search" split exists (it picks its own documents)."""
        start = time.perf_counter()
        check_split(split, None, self.owner)
        limit = check_limit(limit if limit is not None else self.config.limit, self.owner)
        kwargs = dict(self.config.options)
        if self.passes_limit:
            kwargs["limit"] = limit
        if self._batch_size is not None:
            kwargs["batch_size"] = self._batch_size
        try:
            result = self.function(self.model, self.tokenizer, **kwargs)
        except Exception as exc:
            raise EvaluationError(f"{self.owner} raised {type(exc).__name__}: {exc}") from exc
        return EvalResult(metrics=self._metrics(result), seconds=time.perf_counter() - start)

    def _metrics(self, result: Any) -> dict[str, float]:
        """``result`` as prefixed metrics; EvaluatorReturnError names what came back."""
        try:
            if isinstance(result, Mapping):
                values = numeric_metrics(result, self.owner)
                if not values:
                    raise EvaluationError(
                        f"{self.owner} returned no metrics: {_shown(result)} "
                        "(return {name: number, ...} or one number)"
                    )
                return {f"{self.prefix}/{key}": value for key, value in values.items()}
            return {f"{self.prefix}/score": as_number(result, f"{self.owner}: return value")}
        except EvaluationError as exc:
            raise EvaluatorReturnError(str(exc)) from None


def _shown(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
