"""A path recipe: which layer of which model a token passes through at each depth.

A data-flow recipe names its models by label (a model folder, or a parameter-space recipe whose
merge is one of the candidates), the model whose embeddings, final norm and LM head the path
uses (``outer``), and the path: one step per layer of the resulting model. A step's ``scale``
multiplies what that layer reads of its input, the output of its input normalization (the
attention's input in a pre-norm decoder); the residual stream passes through unchanged. That is
exactly the layer with its input norm's weight (and bias) multiplied by ``scale``, which is how
an export writes it (:func:`plan_dataflow`).

A recipe with one model and a path that repeats some of its layers is a layer-repetition model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.util import pydantic_message

INPUT_NORM = "input_layernorm"
"""The attribute of a decoder layer whose output a step's ``scale`` multiplies."""


class PathModel(BaseModel):
    """A model whose layers a path may use: a folder, or a recipe whose merge it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str = Field(min_length=1, description="the name path steps use for this model")
    model: str | None = Field(None, description="model folder (Hugging Face layout)")
    recipe: dict[str, Any] | None = Field(
        None, description="a parameter-space recipe (as `evomerge merge` takes); its merge"
    )

    @model_validator(mode="after")
    def _one(self) -> PathModel:
        if (self.model is None) == (self.recipe is None):
            raise ValueError(f"model '{self.label}': give exactly one of 'model' or 'recipe'")
        return self


class PathStep(BaseModel):
    """One layer of the path: layer ``layer`` of model ``model``, its input scaled by ``scale``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(min_length=1, description="label of one of the recipe's models")
    layer: int = Field(ge=0, description="the layer's index in that model")
    scale: float = Field(1.0, description="multiplies the layer's normalized input (> 0)")

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"must be a finite number above 0, got {value}")
        return value


class DataflowRecipe(BaseModel):
    """A data-flow (layer path) recipe; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    models: list[PathModel] = Field(min_length=1)
    """The models whose layers the path uses (and the outer model), each with a label."""
    outer: str = Field(
        min_length=1, description="label of the model whose embeddings, final norm, head are used"
    )
    path: list[PathStep] = Field(min_length=1)
    """The layers of the resulting model, first to last."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of the exported weights; default: the outer model's"
    )

    @model_validator(mode="after")
    def _labels(self) -> DataflowRecipe:
        labels = [m.label for m in self.models]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"models: label {', '.join(repeated)} is used twice")
        if self.outer not in labels:
            raise ValueError(f"outer: '{self.outer}' is none of the models ({', '.join(labels)})")
        for index, step in enumerate(self.path):
            if step.model not in labels:
                raise ValueError(
                    f"path[{index}].model: '{step.model}' is none of the models "
                    f"({', '.join(labels)})"
                )
        return self

    def model(self, label: str) -> PathModel:
        return next(m for m in self.models if m.label == label)

    def runs(self, scaled_alone: bool = False) -> list[tuple[str, int, int, float]]:
        """``(model, first layer, last layer, scale)`` per run of consecutive layers of one
        model; a scaled step starts a run (its scale is the run's input's), and with
        ``scaled_alone`` it is a run of its own."""
        runs: list[tuple[str, int, int, float]] = []
        for step in self.path:
            last = runs[-1] if runs else None
            if (
                last is not None
                and last[0] == step.model
                and last[2] == step.layer - 1
                and step.scale == 1.0
                and not (scaled_alone and last[3] != 1.0)
            ):
                runs[-1] = (last[0], last[1], step.layer, last[3])
            else:
                runs.append((step.model, step.layer, step.layer, step.scale))
        return runs

    def describe(self) -> str:
        """``8 layers: a 0-3, b 1-2 (input x1.31), a 3``: runs of consecutive layers of one
        model; a scaling applies to the input of the run's first layer."""
        parts = [
            f"{model} {first}"
            + (f"-{last}" if last != first else "")
            + (f" (input x{scale:.3g})" if scale != 1.0 else "")
            for model, first, last, scale in self.runs()
        ]
        return f"{len(self.path)} layers: " + ", ".join(parts)


def is_dataflow_recipe(data: Any) -> bool:
    """Whether a recipe mapping is a data-flow recipe (it has a ``path``)."""
    return isinstance(data, Mapping) and "path" in data


def parse_dataflow_recipe(data: Any, where: str = "recipe") -> DataflowRecipe:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        return DataflowRecipe.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_message(exc)}") from None


# -- the export plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layers:
    """One model of a path: how to make each of its tensors, by name."""

    num_layers: int
    jobs: dict[str, Any]
    """Tensor name -> a TensorJob over the combined plan's models."""


def plan_dataflow(
    recipe: DataflowRecipe, relative_to: Path | None = None, allow_pickle: bool = False
) -> Any:
    """The :class:`~evomerge.merge.plan.MergePlan` that writes the path as a standalone model:
    the outer model's embeddings, final norm and head, then each step's layer renumbered in path
    order, its input norm's weight (and bias) multiplied by the step's scale. A layer of a
    merge is merged as its recipe says. Refused, with the reason, where that fold would not be
    exact (see :func:`fold_problem`)."""
    import dataclasses

    from evomerge.checkpoint import ModelFolder, check_compatible
    from evomerge.merge.plan import MergePlan, TensorJob, TensorRef
    from evomerge.merge.recipe import (
        open_fisher_folders,
        open_recipe_models,
        parse_recipe,
        plan_recipe,
        resolve_path,
    )
    from evomerge.merge.tensors import layer_index, tensor_kind, with_layer_index

    folders: list[Any] = []
    paths: dict[Path, int] = {}

    def held(folder: Any) -> int:
        key = Path(folder.path).resolve()
        if key not in paths:
            paths[key] = len(folders)
            folders.append(folder)
        return paths[key]

    layers: dict[str, _Layers] = {}
    seeds: set[int] = set()
    for entry in recipe.models:
        if entry.model is not None:
            folder = _open_whole_model(
                resolve_path(entry.model, relative_to), entry.label, allow_pickle
            )
            index = held(folder)
            jobs = {
                name: TensorJob(
                    name,
                    None if info.dtype.is_floating_point else TensorRef(index, name),
                    (TensorRef(index, name),) if info.dtype.is_floating_point else (),
                    (),
                    (((("scale", None),),) if info.dtype.is_floating_point else ()),
                    method="passthrough",
                )
                for name, info in folder.tensors.items()
            }
            layers[entry.label] = _Layers(folder.num_layers or 0, jobs)
            continue
        where = f"models '{entry.label}' recipe"
        inner = parse_recipe(entry.recipe or {}, where)
        models = open_recipe_models(inner, relative_to, allow_pickle)
        plan = plan_recipe(inner, models, open_fisher_folders(inner, relative_to))
        seeds.add(plan.seed)
        remap = {i: held(m) for i, m in enumerate(models)}
        for offset, folder in enumerate(_aux_folders(plan, models, allow_pickle)):
            remap[len(models) + offset] = held(folder)

        def moved(ref: TensorRef | None, remap: dict[int, int] = remap) -> TensorRef | None:
            return None if ref is None else TensorRef(remap[ref.model], ref.tensor)

        jobs = {
            job.name: dataclasses.replace(
                job,
                base=moved(job.base),
                sources=tuple(moved(r) for r in job.sources),
                aux=tuple((n, tuple(moved(r) for r in refs)) for n, refs in job.aux),
                method=plan.method_of(job),
            )
            for job in plan.jobs
        }
        layers[entry.label] = _Layers(models[0].num_layers or 0, jobs)
    if len(seeds) > 1:
        raise ConfigError(
            f"the path's merges draw random masks with different seeds ({sorted(seeds)}); "
            "one exported plan takes one seed"
        )
    check_compatible([f for f in folders if isinstance(f, ModelFolder) and f.config])
    reference = folders[0]
    problem = fold_problem(reference.path) if any(s.scale != 1.0 for s in recipe.path) else None
    if problem is not None:
        raise ConfigError(f"the path scales a layer's input, which cannot be exported: {problem}")
    outer = layers[recipe.outer]
    jobs: list[TensorJob] = []
    outside = [name for name in outer.jobs if layer_index(name) is None]
    pre = [n for n in outside if tensor_kind(n) == "embedding"]  # before the layers, as read
    post = [n for n in outside if n not in pre]
    jobs += [outer.jobs[n] for n in pre]
    for position, step in enumerate(recipe.path):
        model = layers[step.model]
        if step.layer >= model.num_layers:
            raise ConfigError(
                f"path[{position}]: model '{step.model}' has {model.num_layers} layers "
                f"(0-{model.num_layers - 1}); there is no layer {step.layer}"
            )
        for name, job in model.jobs.items():
            if layer_index(name) != step.layer:
                continue
            scaled = step.scale != 1.0 and f".{INPUT_NORM}." in name and job.sources
            jobs.append(
                dataclasses.replace(
                    job,
                    name=with_layer_index(name, position),
                    scale=step.scale if scaled else None,
                )
            )
    jobs += [outer.jobs[n] for n in post]
    outer_folder = next(
        r.model for job in outer.jobs.values() for r in (job.base, *job.sources) if r is not None
    )
    labels = tuple(getattr(f, "label", str(f.path)) for f in folders)
    return MergePlan(
        method="passthrough",
        models=tuple(str(f.path) for f in folders),
        labels=labels,
        jobs=tuple(jobs),
        seed=seeds.pop() if seeds else 0,
        out_dtype=recipe.dtype,
        config_model=outer_folder,
        tokenizer_model=outer_folder,
        num_layers=len(recipe.path),
        layer_origins=tuple(step.layer for step in recipe.path),
    )


def _open_whole_model(path: str, label: str, allow_pickle: bool) -> Any:
    from evomerge.adapters import is_adapter_folder
    from evomerge.checkpoint import ModelFolder

    if is_adapter_folder(path):
        raise ConfigError(
            f"model '{label}' ({path}) is a LoRA adapter; a path takes layers of whole models "
            "(merge the adapter into its base first, or name it in a recipe)"
        )
    return ModelFolder(path, label=label, allow_pickle=allow_pickle)


def _aux_folders(plan: Any, models: Sequence[Any], allow_pickle: bool) -> list[Any]:
    """The plan's models after the recipe's (Fisher diagonals), opened."""
    from evomerge.checkpoint import ModelFolder

    return [
        ModelFolder(path, label=label, require_config=False, allow_pickle=allow_pickle)
        for path, label in zip(plan.models[len(models) :], plan.labels[len(models) :], strict=True)
    ]


# -- whether a scaling folds exactly -----------------------------------------------------------

_FOLD_PROBLEMS: dict[str, str | None] = {}


def fold_problem(folder: str | Path) -> str | None:
    """Why scaling a layer's normalized input is not exactly a scaling of its input norm's
    weight (and bias) in this architecture, or None when it is. Probed on a one-layer copy of
    the architecture built on the meta device (its norm alone is materialized): the layers must
    have an ``input_layernorm`` whose output is linear in its weight (Gemma's ``1 + weight``
    is not)."""
    import json

    key = str(Path(folder).expanduser().resolve())
    if key in _FOLD_PROBLEMS:
        return _FOLD_PROBLEMS[key]
    try:
        config = json.loads((Path(key) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"cannot read {key}/config.json: {exc}"
    problem = _probe_fold(key, config)
    _FOLD_PROBLEMS[key] = problem
    return problem


def _probe_fold(folder: str, config: Mapping[str, Any]) -> str | None:
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = ", ".join(config.get("architectures") or [str(config.get("model_type"))])
    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        cfg.num_hidden_layers = 1
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:1]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
        layer = decoder_layers(model)[0]
    except Exception as exc:  # an architecture transformers cannot build, or without layers
        return f"{arch}: cannot build its layers ({type(exc).__name__}: {exc})"
    norm = getattr(layer, INPUT_NORM, None)
    if not isinstance(norm, torch.nn.Module) or getattr(norm, "weight", None) is None:
        return f"{arch}: its layers have no {INPUT_NORM} with a weight to fold a scaling into"
    norm = copy.deepcopy(norm).to_empty(device="cpu").float()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        hidden = norm.weight.shape[-1]
        x = torch.randn(3, hidden, generator=generator)
        scale = 1.7
        expected = norm(x) * scale
        for parameter in norm.parameters():
            parameter.mul_(scale)
        folded = norm(x)
    if not torch.allclose(folded, expected, rtol=1e-5, atol=1e-6):
        return (
            f"{arch}: its {INPUT_NORM} ({type(norm).__name__}) is not linear in its weight, so "
            "multiplying the weight does not multiply the output"
        )
    return None


def decoder_layers(model: Any) -> Any:
    """The decoder's list of layers (``model.model.layers`` in Llama-like models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    found = getattr(decoder, "layers", None)
    if found is None:
        raise ConfigError(f"{type(model).__name__}: no decoder layer list found")
    return found
