"""The merge-method registry: what each method is called, which parameters it takes, and how
its inputs are checked before any tensor is touched.

A method is a pure function ``fn(base, sources, shared, per_source, ctx) -> Tensor``:

- ``base``: the base model's tensor, or ``None`` for methods that do not use a base;
- ``sources``: one tensor per source model, same shape as ``base``;
- ``shared``: the method-level parameters (``lambda``, ``normalize``, ``t``, ...), defaults filled;
- ``per_source``: one dict per source (``weight``, ``density``, ...), defaults filled;
- ``ctx``: the tensor's name, the recipe seed and auxiliary tensors (e.g. Fisher diagonals);
  random masks draw their uniforms from :meth:`TensorContext.uniform`, a hash of (seed,
  tensor name, source index, element index), so they are the same on every device.

It computes in float32 (float64 if the inputs are float64) on the inputs' device and returns a
tensor of the inputs' shape; casting to the output dtype is the caller's job. Adding a method is
one module in ``evomerge/merge/methods/`` that calls :func:`register`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.errors import MethodError
from evomerge.merge.random_bits import mask_key, uniforms

REQUIRED: Any = object()
"""Sentinel default: the parameter must be given."""


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges, beyond the values."""

    name: str
    seed: int = 0
    aux: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)

    def uniform(
        self,
        shape: Sequence[int] | torch.Size,
        device: torch.device | str,
        source: int,
        offset: int = 0,
    ) -> torch.Tensor:
        """float32 uniforms in [0, 1) for source ``source``'s mask of this tensor.

        Each is a multiple of 2**-24 and a pure function of (seed, tensor name, source index,
        row-major element index): the same bits on every device and for every dtype of the
        tensor (see :mod:`evomerge.merge.random_bits`). ``offset`` is the flat index of the
        first element: a piece of the tensor starting there gets that piece's uniforms.
        """
        return uniforms(mask_key(self.seed, self.name, source), shape, device, offset)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method."""

    name: str
    scope: Literal["shared", "per_source"]
    kind: type = float
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return f"a {self.kind.__name__}"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def coerce(self, value: Any) -> Any:
        """Numbers written as strings (YAML reads '5e-1' as text) become numbers."""
        if self.kind in (int, float) and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    def check(self, value: Any) -> Any:
        """Return the value coerced to this parameter's kind, or raise ValueError."""
        if value is None and self.nullable:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ValueError(f"must be {self.range_text()}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        number = self.kind(value)
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"must be finite, got {value!r}")
        too_low = self.low is not None and (
            number <= self.low if self.low_open else number < self.low
        )
        too_high = self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        )
        if too_low or too_high:
            raise ValueError(f"must be {self.range_text()}, got {value!r}")
        return number


MethodFn = Callable[
    [
        torch.Tensor | None,
        Sequence[torch.Tensor],
        Mapping[str, Any],
        Sequence[Mapping[str, Any]],
        TensorContext,
    ],
    torch.Tensor,
]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and the contract its inputs must meet."""

    name: str
    fn: MethodFn
    params: tuple[ParamSpec, ...]
    uses_base: bool
    """Whether the method reads the base model's tensor (task vectors, interpolation from it)."""
    min_sources: int = 1
    max_sources: int | None = None
    aux: tuple[str, ...] = ()
    mergekit_name: str | None = None
    doc: str = ""
    check: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]], str], None] | None = None
    """Cross-parameter checks, run when parameters are bound (before any tensor is read)."""
    random_masks: bool = False
    """Whether it drops entries at random (DARE, DELLA) when a source's ``density`` is below 1."""
    base_optional: bool = False
    """With ``uses_base``: the base may be left out, and ``fn`` then gets ``None`` (NuSLERP and
    Multi-SLERP work on task vectors with a base, on the weights themselves without one)."""
    temporaries: tuple[float, float] = (3.0, 0.0)
    """Peak float32 temporaries of merging one tensor, in copies of its size (the result
    included), as ``(fixed, per_source)``: ``fixed + per_source x n`` for n sources. Measured by
    ``tests/test_merge_memory.py``; used by the memory plan (:mod:`evomerge.memory`)."""

    def peak_temporaries(self, n: int) -> float:
        """The declared peak of merging one tensor from ``n`` sources, in copies of it."""
        fixed, per_source = self.temporaries
        return fixed + per_source * n

    @property
    def needs_base(self) -> bool:
        return self.uses_base and not self.base_optional

    @property
    def summary(self) -> str:
        """The first line of the method's description."""
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def param(self, name: str, tensor: str = "") -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise MethodError(
            f"method '{self.name}' has no parameter '{name}' "
            f"(it takes: {', '.join(p.name for p in self.params) or 'none'})"
            + (f" (tensor {tensor})" if tensor else "")
        )

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "shared")

    @property
    def per_source_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "per_source")

    @property
    def source_count_text(self) -> str:
        """How many sources it takes: ``exactly 2``, ``at least 1``, ``2 to 4``."""
        if self.max_sources == self.min_sources:
            return f"exactly {self.min_sources}"
        if self.max_sources is None:
            return f"at least {self.min_sources}"
        return f"{self.min_sources} to {self.max_sources}"

    def check_source_count(self, count: int, tensor: str = "") -> None:
        if count < self.min_sources or (self.max_sources is not None and count > self.max_sources):
            raise MethodError(
                f"method '{self.name}' takes {self.source_count_text} source model(s) besides "
                f"the base, got {count}" + (f" (tensor {tensor})" if tensor else "")
            )

    def bind(
        self,
        shared: Mapping[str, Any],
        per_source: Sequence[Mapping[str, Any]],
        tensor: str,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Check parameter names, fill defaults and check ranges; errors name the tensor."""
        self.check_source_count(len(per_source), tensor)
        where = f" (tensor {tensor})" if tensor else ""
        bound_shared: dict[str, Any] = {}
        for name in shared:
            spec = self.param(name, tensor)
            if spec.scope != "shared":
                raise MethodError(
                    f"method '{self.name}': parameter '{name}' is set per source, "
                    f"not for the whole merge{where}"
                )
        for name, values in _per_source_names(per_source):
            spec = self.param(name, tensor)
            if spec.scope != "per_source":
                raise MethodError(
                    f"method '{self.name}': parameter '{name}' applies to the whole merge, "
                    f"not to source {values}{where}"
                )
        for spec in self.shared_params:
            bound_shared[spec.name] = self._value(spec, shared, where, "")
        bound_sources = []
        for index, params in enumerate(per_source):
            bound_sources.append(
                {
                    spec.name: self._value(spec, params, where, f" of source {index}")
                    for spec in self.per_source_params
                }
            )
        if self.check is not None:
            self.check(bound_shared, bound_sources, tensor)
        return bound_shared, bound_sources

    def _value(self, spec: ParamSpec, given: Mapping[str, Any], where: str, who: str) -> Any:
        if spec.name not in given or (given[spec.name] is None and not spec.nullable):
            if spec.required:
                raise MethodError(
                    f"method '{self.name}': parameter '{spec.name}'{who} is required{where}"
                )
            return spec.default
        try:
            return spec.check(given[spec.name])
        except ValueError as exc:
            raise MethodError(
                f"method '{self.name}': parameter '{spec.name}'{who} {exc}{where}"
            ) from None


def _per_source_names(per_source: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    return [(name, index) for index, params in enumerate(per_source) for name in params]


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make a method available by name. Registering a name twice is a programming error."""
    if method.name in _METHODS:
        raise RuntimeError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The method registered under ``name``; a clear error lists what exists."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise MethodError(
            f"unknown merge method '{name}' (available: {', '.join(sorted(_METHODS))})"
        ) from None


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def merge_tensor(
    method: str | MergeMethod,
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any] | None = None,
    per_source: Sequence[Mapping[str, Any]] | None = None,
    ctx: TensorContext | None = None,
) -> torch.Tensor:
    """Validate parameters and merge one tensor (convenience for callers and tests)."""
    spec = get_method(method) if isinstance(method, str) else method
    ctx = ctx or TensorContext(name="")
    if per_source is None:
        per_source = [{} for _ in sources]
    if len(per_source) != len(sources):
        raise MethodError(
            f"method '{spec.name}': {len(sources)} source tensors "
            f"but {len(per_source)} parameter sets"
        )
    if spec.needs_base and base is None:
        raise MethodError(f"method '{spec.name}' needs a base model{_at(ctx)}")
    bound_shared, bound_sources = spec.bind(shared or {}, per_source, ctx.name)
    for aux_name in spec.aux:
        if len(ctx.aux.get(aux_name, ())) != len(sources):
            raise MethodError(
                f"method '{spec.name}' needs one '{aux_name}' tensor per source{_at(ctx)}"
            )
    return spec.fn(base, list(sources), bound_shared, bound_sources, ctx)


def _at(ctx: TensorContext) -> str:
    return f" (tensor {ctx.name})" if ctx.name else ""


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


_loaded = False


def _load_builtin_methods() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib
        import pkgutil

        import evomerge.merge.methods as package

        for module in pkgutil.iter_modules(package.__path__):  # each registers its methods
            importlib.import_module(f"{package.__name__}.{module.name}")
