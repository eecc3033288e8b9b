"""Recipes: which models to merge, with which method and parameters, resolved per tensor.

A parameter value may be

- a scalar: ``weight: 0.5``;
- a gradient: ``density: [0.2, 0.8]``, anchors interpolated linearly across the layers (a list
  as long as the model has layers gives one value per layer). Tensors outside the layers
  (embeddings, final norm, head) take the first anchor, as in mergekit;
- conditional: a list of ``{value, kind?, filter?}``; the first entry whose ``kind`` (attention,
  mlp, norm, embedding, head) and ``filter`` (a substring of the tensor name) match wins; if
  none matches, the next level decides (a source's own parameters, then the recipe's, then the
  method's default).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.adapters import Source, open_source, plan_extra
from evomerge.checkpoint import ModelFolder, check_compatible, path_labels
from evomerge.errors import ConfigError
from evomerge.merge.plan import MergePlan, TensorJob, TensorRef, freeze
from evomerge.merge.registry import MergeMethod, ParamSpec, get_method
from evomerge.merge.tensors import layer_index, layer_position, tensor_kind
from evomerge.util import pydantic_message

Scalar = bool | int | float | str
Value = Scalar | list[Scalar]


class Condition(BaseModel):
    """A parameter value that applies only to matching tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: Value
    """The value for matching tensors: a scalar, or a list of anchors interpolated across the
    layers."""
    kind: Literal["embedding", "head", "norm", "attention", "mlp", "other"] | None = None
    """Match only tensors of this kind; None matches every kind."""
    filter: str | None = None
    """Match only tensors whose name contains this text (a plain substring, not a pattern);
    None or ``*`` matches every name."""


ParamSetting = Value | Condition | list[Condition]


class SourceModel(BaseModel):
    """One fine-tune to merge, with its own parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="path of the model folder (Hugging Face layout)")
    label: str | None = Field(None, description="name used in messages; default: folder name")
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    """This source's per-source method parameters (such as ``weight``); they override the
    recipe's ``parameters`` of the same name."""
    fisher: str | None = Field(
        None, description="folder or .safetensors file of Fisher diagonals (method 'fisher')"
    )


class Recipe(BaseModel):
    """An evomerge recipe (YAML). Paths are relative to the recipe file."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="merge method name (see `evomerge methods`)")
    base: str | None = Field(None, description="base model folder; required by most methods")
    sources: list[SourceModel] = Field(min_length=1)
    """The fine-tunes to merge, in order."""
    parameters: dict[str, ParamSetting] = Field(
        default_factory=dict, description="method parameters, and per-source defaults"
    )
    seed: int = Field(0, description="seed of random masks (DARE, DELLA)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="output dtype; default: each tensor keeps the base's dtype"
    )
    tokenizer_source: str = Field("base", description="'base' or a source label")
    layer_methods: list[str] | None = None
    """One merge method per layer (as many as the model has layers), for a merge that uses
    different methods in different layers; tensors outside the layers (embeddings, head, final
    norm) use ``method``. Each tensor takes only the parameters its own method takes; every
    parameter must be taken by at least one method in use. Methods that need Fisher diagonals
    are not allowed here. None: ``method`` everywhere."""

    @field_validator("parameters")
    @classmethod
    def _no_empty_names(cls, value: dict[str, ParamSetting]) -> dict[str, ParamSetting]:
        for name in value:
            if not name:
                raise ValueError("parameter names must not be empty")
        return value


def evaluate_setting(
    setting: ParamSetting | None,
    name: str,
    t: float,
    coerce: Callable[[Any], Any] | None = None,
) -> Any:
    """The value of one parameter setting for tensor ``name`` at layer position ``t``.

    ``coerce`` is applied to every scalar first (e.g. YAML's string '5e-1' to 0.5).
    """
    if setting is None:
        return None
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], Condition):
        kind = tensor_kind(name)
        for cond in setting:
            if cond.kind is not None and cond.kind != kind:
                continue
            if cond.filter not in (None, "*") and cond.filter not in name:
                continue
            return evaluate_setting(cond.value, name, t, coerce)
        return None
    if isinstance(setting, list):
        return interpolate([coerce(a) for a in setting] if coerce else setting, t)
    return coerce(setting) if coerce else setting


def interpolate(anchors: Sequence[Scalar], t: float) -> Scalar | None:
    """Linear interpolation between anchors at position t in [0, 1] (mergekit's arithmetic)."""
    if not anchors:
        return None
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in anchors)
    if not numeric:
        return anchors[int(t * (len(anchors) - 1))]
    scaled = t * (len(anchors) - 1)
    low = int(scaled)
    high = min(len(anchors) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * anchors[low] + frac * anchors[high]


def parse_recipe(data: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_message(exc)}") from None


def resolve_path(path: str, relative_to: Path | None) -> str:
    expanded = Path(os.path.expanduser(path))
    if not expanded.is_absolute() and relative_to is not None:
        expanded = relative_to / expanded
    return str(expanded)


def open_recipe_models(
    recipe: Recipe, relative_to: Path | None = None, allow_pickle: bool = False
) -> list[Source]:
    """Open base (if any) then sources, and check they can be merged.

    A source may be a PEFT LoRA adapter folder of the recipe's base (see
    :mod:`evomerge.adapters`): it reads as the base with the adapter applied.
    """
    models: list[Source] = []
    base: ModelFolder | None = None
    if recipe.base is not None:
        base = ModelFolder(
            resolve_path(recipe.base, relative_to), label="base", allow_pickle=allow_pickle
        )
        models.append(base)
    labels = {"base"}
    paths = [resolve_path(source.model, relative_to) for source in recipe.sources]
    for index, (source, path, default) in enumerate(
        zip(recipe.sources, paths, path_labels(paths), strict=True)
    ):
        folder = open_source(
            path,
            label=source.label or default,
            base=base,
            allow_pickle=allow_pickle,
            what="set 'base' in the recipe",
        )
        if folder.label in labels:
            folder.label = f"{folder.label}#{index}"
        labels.add(folder.label)
        models.append(folder)
    check_compatible(models)  # type: ignore[arg-type]  # an adapter mirrors its base
    return models


def open_fisher_folders(recipe: Recipe, relative_to: Path | None = None) -> dict[int, ModelFolder]:
    """The Fisher-diagonal folders (or .safetensors files) of the sources that name one."""
    return {
        index: ModelFolder(
            resolve_path(source.fisher, relative_to),
            label=f"fisher of source {index}",
            require_config=False,
        )
        for index, source in enumerate(recipe.sources)
        if source.fisher
    }


def plan_recipe(
    recipe: Recipe, models: Sequence[Source], aux_models: dict[int, ModelFolder] | None = None
) -> MergePlan:
    """Resolve a recipe against opened models (base first if the recipe has one)."""
    method = get_method(recipe.method)
    has_base = recipe.base is not None
    num_layers = models[0].num_layers or 0
    layer_methods = _layer_methods(recipe, method, num_layers)
    in_use = [method]
    for used in layer_methods:
        if all(used.name != m.name for m in in_use):
            in_use.append(used)
    for used in in_use:
        if used.needs_base and not has_base:
            raise ConfigError(f"method '{used.name}' needs a base model: set 'base' in the recipe")
        used.check_source_count(len(recipe.sources))
    _check_parameter_names(in_use, recipe)
    first_source = 1 if has_base else 0
    all_models = list(models)
    aux_refs: dict[str, list[int]] = {}
    for name in method.aux:
        aux_refs[name] = []
        for index in range(len(recipe.sources)):
            folder = (aux_models or {}).get(index)
            if folder is None:
                raise ConfigError(
                    f"method '{method.name}' needs '{name}' for every source: "
                    f"set sources[{index}].{name}"
                )
            all_models.append(folder)
            aux_refs[name].append(len(all_models) - 1)
    jobs = []
    for tensor, info in models[0].tensors.items():
        source_models = range(first_source, len(models))
        if not info.dtype.is_floating_point:
            jobs.append(TensorJob(tensor, TensorRef(0, tensor), (), (), ()))
            continue
        layer = layer_index(tensor) if layer_methods else None
        method_here = layer_methods[layer] if layer is not None else method
        own = method_here.name if method_here.name != method.name else None
        base_ref = TensorRef(0, tensor) if has_base and method_here.uses_base else None
        t = layer_position(tensor, num_layers or 1)
        shared = {
            spec.name: value
            for spec in method_here.shared_params
            if (value := evaluate_setting(recipe.parameters.get(spec.name), tensor, t, spec.coerce))
            is not None
        }
        per_source = []
        for source in recipe.sources:
            params = {}
            for spec in method_here.per_source_params:
                value = evaluate_setting(source.parameters.get(spec.name), tensor, t, spec.coerce)
                if value is None:
                    value = evaluate_setting(
                        recipe.parameters.get(spec.name), tensor, t, spec.coerce
                    )
                if value is not None:
                    params[spec.name] = value
            per_source.append(params)
        sources = [TensorRef(i, tensor) for i in source_models]
        bound_shared, bound_sources = method_here.bind(shared, per_source, tensor)
        aux = tuple(
            (name, tuple(TensorRef(i, tensor) for i in refs)) for name, refs in aux_refs.items()
        )
        jobs.append(
            TensorJob(
                tensor,
                base_ref,
                tuple(sources),
                freeze(bound_shared),
                tuple(freeze(p) for p in bound_sources),
                aux,
                own,
            )
        )
    labels = tuple(m.label for m in all_models)
    return MergePlan(
        method=method.name,
        models=tuple(str(m.path) for m in all_models),
        labels=labels,
        jobs=tuple(jobs),
        seed=recipe.seed,
        out_dtype=recipe.dtype,
        config_model=0,
        tokenizer_model=_tokenizer_model(recipe, models),
        num_layers=models[0].num_layers,
        extra=plan_extra(all_models),
    )


def _layer_methods(recipe: Recipe, method: MergeMethod, num_layers: int) -> list[MergeMethod]:
    """The method of each layer (empty without ``layer_methods``), checked."""
    if recipe.layer_methods is None:
        return []
    if len(recipe.layer_methods) != num_layers:
        raise ConfigError(
            f"layer_methods lists {len(recipe.layer_methods)} method(s) but the model has "
            f"{num_layers} layers: give exactly {num_layers}, one per layer"
        )
    methods = [get_method(name) for name in recipe.layer_methods]
    for used in [method, *methods]:
        if used.aux:
            raise ConfigError(
                f"layer_methods: method '{used.name}' needs {', '.join(used.aux)} for every "
                "source and cannot be mixed with other methods per layer"
            )
    return methods


def _check_parameter_names(methods: Sequence[MergeMethod], recipe: Recipe) -> None:
    """Every parameter is taken by some method in use (``methods``, the recipe's first), and
    a source's own parameters are per-source ones."""
    if len(methods) == 1:
        (method,) = methods
        for name in recipe.parameters:
            method.param(name)
    names = ", ".join(m.name for m in methods)
    for name in recipe.parameters:
        if not _taking(methods, name):
            raise ConfigError(f"parameters.{name}: no method in use ({names}) takes '{name}'")
    for index, source in enumerate(recipe.sources):
        for name in source.parameters:
            specs = _taking(methods, name)
            if not specs:
                if len(methods) == 1:
                    methods[0].param(name)  # the usual error for one method
                raise ConfigError(
                    f"sources[{index}].parameters.{name}: no method in use ({names}) takes '{name}'"
                )
            if any(spec.scope == "shared" for spec in specs):
                raise ConfigError(
                    f"sources[{index}].parameters.{name}: '{name}' applies to the whole merge; "
                    "set it under the recipe's 'parameters'"
                )


def _taking(methods: Sequence[MergeMethod], name: str) -> list[ParamSpec]:
    """The specs of parameter ``name`` in the methods that take it."""
    return [spec for m in methods for spec in m.params if spec.name == name]


def _tokenizer_model(recipe: Recipe, models: Sequence[Source]) -> int:
    if recipe.tokenizer_source == "base":
        return 0
    for index, model in enumerate(models):
        if model.label == recipe.tokenizer_source:
            return index
    raise ConfigError(
        f"tokenizer_source '{recipe.tokenizer_source}' is neither 'base' nor a source label "
        f"({', '.join(m.label for m in models)})"
    )
