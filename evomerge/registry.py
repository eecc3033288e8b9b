"""Plugin kinds by name, shared by proposers and evaluators.

A :class:`KindRegistry` maps a ``kind`` (``"cma"``, ``"lm_eval"``, ...) to a plugin class and
that class's pydantic config model. Adding a kind is one module whose class is decorated with
``@registry.register(kind, ConfigClass)``; the registry imports its built-in plugin modules
(named when it is made) the first time it is asked what it holds, so the plugins may import it
back to register themselves. Only pydantic here: nothing imports torch, numpy or lm-eval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from evomerge.util import pydantic_message


class Pluggable(Protocol):
    """What a registered class gets from :meth:`KindRegistry.register`."""

    kind: ClassVar[str]
    config_class: ClassVar[type[BaseModel]]


T = TypeVar("T", bound=Pluggable)
"""The plugins' base class (``Proposer``, ``Evaluator``)."""
C = TypeVar("C", bound=BaseModel)
"""Their configs' base model (``ProposerConfig``, ``EvaluatorConfig``)."""
K = TypeVar("K", bound=type)


class KindRegistry(Generic[T, C]):
    """Kind name -> plugin class, filled by :meth:`register`; errors are ``error`` and name
    the plugin family (``what``) and the kinds known."""

    def __init__(
        self,
        what: str,
        config_base: type[C],
        error: type[Exception],
        plugins: Sequence[str] = (),
    ) -> None:
        self.what = what
        self.config_base = config_base
        self.error = error
        self._plugins = tuple(plugins)
        self._loaded = False
        self._classes: dict[str, type[T]] = {}

    def register(self, kind: str, config_class: type[C]) -> Callable[[K], K]:
        """Class decorator: make a plugin class available as ``kind``, configured by
        ``config_class``. Registering a kind twice is a programming error (ValueError)."""

        def add(cls: K) -> K:
            if kind in self._classes:
                raise ValueError(f"{self.what} kind {kind!r} is registered twice")
            cls.kind = kind
            cls.config_class = config_class
            self._classes[kind] = cls
            return cls

        return add

    def _load(self) -> None:
        """Import the built-in plugin modules (they register themselves), once."""
        if not self._loaded:
            for module in self._plugins:
                import_module(module)
            self._loaded = True

    def names(self) -> list[str]:
        """The registered kinds, sorted."""
        self._load()
        return sorted(self._classes)

    def get(self, kind: str) -> type[T]:
        """The class registered as ``kind``; an error listing the known kinds otherwise."""
        self._load()
        if kind not in self._classes:
            known = ", ".join(sorted(self._classes))
            raise self.error(f"unknown {self.what} kind {kind!r}; available: {known}")
        return self._classes[kind]

    def parse(self, data: Mapping[str, Any] | C, where: str | None = None) -> C:
        """Validate a mapping (its ``kind`` picks the model) into that kind's config; a config
        object is returned as is. Errors start with ``where`` (default: ``what``)."""
        where = self.what if where is None else where
        if isinstance(data, self.config_base):
            return data
        if not isinstance(data, Mapping):
            raise self.error(f"{where}: expected a mapping with a 'kind', got {data!r}")
        if "kind" not in data:
            raise self.error(f"{where}: missing 'kind' (one of {', '.join(self.names())})")
        try:
            cls = self.get(str(data["kind"]))
        except self.error as exc:
            raise self.error(f"{where}: kind: {exc}") from None
        try:
            return cls.config_class.model_validate(dict(data))  # type: ignore[return-value]
        except ValidationError as exc:
            raise self.error(f"{where} ({cls.kind}): {pydantic_message(exc)}") from None
