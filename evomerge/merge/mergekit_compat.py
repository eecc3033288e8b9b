"""Reading mergekit YAML configs (``models:`` and ``slices:`` forms), and writing recipes as them.

Reading follows mergekit 0.1.5's semantics: its defaults per method, its sign election on
weight-multiplied deltas, its parameter precedence (source, slice, config), its gradients
(``t = i/(n-1)`` within a slice; tensors outside the layers at ``t = 0``), and its layer
renumbering when slices stack layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.adapters import (
    ADAPTER_CONFIG,
    AdapterFolder,
    Source,
    is_adapter_folder,
    open_source,
    plan_extra,
)
from evomerge.checkpoint import ModelFolder, check_compatible
from evomerge.errors import ConfigError
from evomerge.merge.plan import MergePlan, TensorJob, TensorRef, freeze
from evomerge.merge.recipe import (
    Condition,
    ParamSetting,
    Recipe,
    evaluate_setting,
    open_recipe_models,
    plan_recipe,
    resolve_path,
)
from evomerge.merge.registry import MergeMethod, available_methods, get_method
from evomerge.merge.tensors import KIND_PATTERNS, layer_index, tensor_kind, with_layer_index
from evomerge.util import pydantic_message

_TIES_FAMILY = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
# mergekit's 'rescale' default (True means L1-norm rescaling) for methods whose masks we rescale.
_MERGEKIT_RESCALE_DEFAULT = {
    "dare_linear": True,
    "dare_ties": True,
    "della": True,
    "della_linear": True,
}
# int8_mask changes mergekit's mask dtype, never the values; mergekit's task_arithmetic
# accepts a density and ignores it.
_IGNORED_PARAMS = {"int8_mask"}
_IGNORED_BY_METHOD = {"task_arithmetic": {"density"}}


class MkInputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamSetting] | None = None


class MkInputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamSetting] | None = None


class MkOutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[MkInputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamSetting] | None = None


class MergekitConfig(BaseModel):
    """The subset of mergekit's config that evomerge reads (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[MkInputModel] | None = None
    slices: list[MkOutputSlice] | None = None
    parameters: dict[str, ParamSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    name: str | None = None


def is_mergekit_config(data: dict[str, Any]) -> bool:
    return "merge_method" in data


def parse_mergekit(data: dict[str, Any], where: str = "mergekit config") -> MergekitConfig:
    try:
        config = MergekitConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_message(exc)}") from None
    if bool(config.models) == bool(config.slices):
        raise ConfigError(f"{where}: give exactly one of 'models' or 'slices'")
    return config


def _method_for(name: str) -> MergeMethod:
    for candidate in available_methods():
        method = get_method(candidate)
        if method.mergekit_name == name:
            return method
    raise ConfigError(
        f"mergekit method '{name}' is not supported by evomerge (supported: "
        + ", ".join(
            sorted(
                get_method(m).mergekit_name or ""
                for m in available_methods()
                if get_method(m).mergekit_name
            )
        )
        + ")"
    )


def plan_mergekit(
    config: MergekitConfig, relative_to: Path | None = None, allow_pickle: bool = False
) -> MergePlan:
    """Resolve a mergekit config into a plan with mergekit's semantics."""
    method = _method_for(config.merge_method)
    paths: list[str] = []
    folders: list[Source] = []

    def folder_index(path: str, ref: str, base: int | None = None) -> int:
        key = path if base is None else f"{paths[base]}+{path}"
        if key not in paths:
            if not Path(path).exists():
                raise ConfigError(
                    f"model '{ref}' is not a local folder (evomerge never downloads models)"
                )
            if base is None and is_adapter_folder(path):
                if config.base_model is None or ref == config.base_model:
                    raise ConfigError(
                        f"model '{ref}' is a LoRA adapter: name the model it applies to as "
                        "'BASE+ADAPTER', or set base_model"
                    )
                return folder_index(path, ref, model_index(config.base_model))
            base_folder = folders[base] if base is not None else None
            folder = open_source(
                path,
                label=_label(ref, folders),
                base=base_folder if isinstance(base_folder, ModelFolder) else None,
                allow_pickle=allow_pickle,
            )
            if base is not None and not isinstance(folder, AdapterFolder):
                raise ConfigError(
                    f"model '{ref}': '{Path(path).name}' after '+' is not a LoRA adapter folder "
                    f"({ADAPTER_CONFIG} missing)"
                )
            paths.append(key)
            folders.append(folder)
        return paths.index(key)

    def model_index(ref: str) -> int:
        """A model reference: a folder, an adapter folder (over base_model), or mergekit's
        ``BASE+ADAPTER`` (the adapter applied to BASE)."""
        whole = Path(resolve_path(ref, relative_to))
        if "+" in ref and not whole.exists():
            base_ref, adapter_ref = ref.split("+", 1)
            base = folder_index(str(Path(resolve_path(base_ref, relative_to)).resolve()), base_ref)
            if isinstance(folders[base], AdapterFolder):
                raise ConfigError(f"model '{ref}': '{base_ref}' is itself a LoRA adapter")
            adapter = str(Path(resolve_path(adapter_ref, relative_to)).resolve())
            return folder_index(adapter, ref, base)
        return folder_index(str(whole.resolve()), ref)

    base_index = model_index(config.base_model) if config.base_model else None
    slices = config.slices or [_models_as_slice(config, folders, model_index, base_index)]
    resolved_slices = []
    for number, out_slice in enumerate(slices):
        slice_base = model_index(out_slice.base_model) if out_slice.base_model else base_index
        inputs = [(model_index(s.model), s) for s in out_slice.sources]
        lengths = {s.layer_range[1] - s.layer_range[0] for _, s in inputs}
        if len(lengths) != 1:
            spans = ", ".join(
                f"{s.model} (layers {start}-{end - 1}, {end - start} layers)"
                for _, s in inputs
                for start, end in [s.layer_range]
            )
            raise ConfigError(
                f"slices[{number}]: all sources must span the same number of layers "
                f"(layer_range is [first, last + 1)): {spans}"
            )
        resolved_slices.append((out_slice, slice_base, inputs, lengths.pop()))
    check_compatible(folders)  # type: ignore[arg-type]  # an adapter mirrors its base
    reference = folders[resolved_slices[0][2][0][0]]
    jobs: list[TensorJob] = []
    pre = [n for n in reference.tensors if layer_index(n) is None and tensor_kind(n) == "embedding"]
    post = [n for n in reference.tensors if layer_index(n) is None and n not in pre]
    layer_names = [n for n in reference.tensors if layer_index(n) == 0]
    for name in pre:
        jobs.append(_mk_job(config, method, resolved_slices[0], name, name, 0.0))
    out_layer = 0
    for out_slice, slice_base, inputs, length in resolved_slices:
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for name in layer_names:
                out_name = with_layer_index(name, out_layer)
                jobs.append(
                    _mk_job(
                        config,
                        method,
                        (out_slice, slice_base, inputs, length),
                        out_name,
                        name,
                        t,
                        offset,
                    )
                )
            out_layer += 1
    for name in post:
        jobs.append(_mk_job(config, method, resolved_slices[-1], name, name, 0.0))
    first = base_index if base_index is not None else resolved_slices[0][2][0][0]
    if isinstance(folders[first], AdapterFolder):  # config and tokenizer from its base
        first = folders.index(folders[first].base)  # type: ignore[union-attr]
    tokenizer = first
    if config.tokenizer_source not in (None, "base"):
        if config.tokenizer_source == "union":
            raise ConfigError(
                "tokenizer_source 'union' is not supported: models must share a vocabulary"
            )
        tokenizer = model_index(config.tokenizer_source)
    return MergePlan(
        method=method.name,
        models=tuple(str(f.path) for f in folders),
        labels=tuple(f.label for f in folders),
        jobs=tuple(jobs),
        input_dtype=_dtype(config.dtype, "dtype"),
        out_dtype=_dtype(config.out_dtype or config.dtype, "out_dtype"),
        config_model=first,
        tokenizer_model=tokenizer,
        num_layers=out_layer,
        extra=plan_extra(folders),
    )


def _label(ref: str, existing: list[Source]) -> str:
    label = Path(ref.rstrip("/")).name or ref
    taken = {f.label for f in existing}
    return label if label not in taken else f"{label}#{len(existing)}"


def _dtype(name: str | None, field: str) -> str | None:
    if name is None:
        return None
    aliases = {
        "float32": "float32",
        "fp32": "float32",
        "float16": "float16",
        "fp16": "float16",
        "bfloat16": "bfloat16",
        "bf16": "bfloat16",
    }
    if name not in aliases:
        raise ConfigError(f"{field}: '{name}' is not supported (float32, float16, bfloat16)")
    return aliases[name]


def _reference(folder: Source) -> str:
    """A model reference that :func:`plan_mergekit` resolves back to ``folder``."""
    if isinstance(folder, AdapterFolder):
        return f"{folder.base.path.as_posix()}+{folder.path.as_posix()}"
    return folder.path.as_posix()


def _models_as_slice(
    config: MergekitConfig, folders: list[Source], model_index: Any, base_index: int | None
) -> MkOutputSlice:
    """mergekit's normalization: ``models:`` is one slice over all layers, base appended."""
    sources = []
    listed = set()
    for entry in config.models or []:
        index = model_index(entry.model)
        listed.add(index)
        layers = folders[index].num_layers or 1
        sources.append(
            MkInputSlice(
                model=_reference(folders[index]),
                layer_range=(0, layers),
                parameters=entry.parameters,
            )
        )
    if base_index is not None and base_index not in listed:
        layers = folders[base_index].num_layers or 1
        sources.append(MkInputSlice(model=_reference(folders[base_index]), layer_range=(0, layers)))
    return MkOutputSlice(sources=sources)


def _mk_job(
    config: MergekitConfig,
    method: MergeMethod,
    resolved: tuple[Any, ...],
    out_name: str,
    in_name: str,
    t: float,
    offset: int = 0,
) -> TensorJob:
    out_slice, slice_base, inputs, _length = resolved

    def in_tensor(source: MkInputSlice) -> str:
        if layer_index(in_name) is None:
            return in_name
        return with_layer_index(in_name, source.layer_range[0] + offset)

    scopes = [out_slice.parameters, config.parameters]
    shared: dict[str, Any] = {}
    for name in _all_names(scopes):
        if name in _IGNORED_PARAMS:
            continue
        if name == "rescale" and method.name not in _MERGEKIT_RESCALE_DEFAULT:
            if _first_value(scopes, name, out_name, t):
                raise ConfigError(
                    f"'rescale: true' with mergekit method '{config.merge_method}' is not supported"
                )
            continue
        spec = _mk_param(method, name, config.merge_method)
        if spec is None or spec.scope != "shared":
            continue
        value = _first_value(scopes, name, out_name, t, spec.coerce)
        if value is not None:
            shared[name] = value
    _translate_shared(method, shared)
    base_ref = None
    source_entries = []
    for index, source in inputs:
        if method.uses_base and index == slice_base:
            base_ref = TensorRef(index, in_tensor(source))
            continue
        source_entries.append((index, source))
    if method.uses_base and base_ref is None and slice_base is not None:
        # mergekit refuses this too ("Base input is not present in merge inputs"); a method
        # whose base is optional would otherwise quietly merge without it.
        raise ConfigError(
            f"mergekit method '{config.merge_method}': the base_model is not among the sources "
            f"of the slice that makes {out_name}; list it there with the same layer_range"
        )
    if method.needs_base and base_ref is None:
        raise ConfigError(f"mergekit method '{config.merge_method}' needs a base_model")
    per_source = []
    for _index, source in source_entries:
        source_scopes = [source.parameters, out_slice.parameters, config.parameters]
        params = {}
        for name in _all_names(source_scopes):
            if name in _IGNORED_PARAMS:
                continue
            spec = _mk_param(method, name, config.merge_method)
            if spec is None or spec.scope != "per_source":
                continue
            value = _first_value(source_scopes, name, in_tensor(source), t, spec.coerce)
            if value is not None:
                params[name] = value
        per_source.append(params)
    bound_shared, bound_sources = method.bind(shared, per_source, out_name)
    return TensorJob(
        name=out_name,
        base=base_ref,
        sources=tuple(TensorRef(i, in_tensor(s)) for i, s in source_entries),
        shared=freeze(bound_shared),
        per_source=tuple(freeze(p) for p in bound_sources),
    )


def _all_names(scopes: list[dict[str, ParamSetting] | None]) -> list[str]:
    names: list[str] = []
    for scope in scopes:
        for name in scope or {}:
            if name not in names:
                names.append(name)
    return names


def _first_value(
    scopes: list[dict[str, ParamSetting] | None],
    name: str,
    tensor: str,
    t: float,
    coerce: Callable[[Any], Any] | None = None,
) -> Any:
    """The first scope whose setting for ``name`` yields a value for this tensor wins."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor, t, coerce)
            if value is not None:
                return value
    return None


def _mk_param(method: MergeMethod, name: str, mk_name: str) -> Any:
    if name == "rescale" and method.name in _MERGEKIT_RESCALE_DEFAULT:
        return method.param("rescale")
    if name in ("sign_election", "weighted_election"):
        raise ConfigError(f"'{name}' is an evomerge parameter, not a mergekit one")
    try:
        return method.param(name)
    except ConfigError:
        raise ConfigError(
            f"parameter '{name}' is not taken by mergekit method '{mk_name}'"
        ) from None


def _translate_shared(method: MergeMethod, shared: dict[str, Any]) -> None:
    """Turn mergekit's defaults and flags into evomerge's explicit parameters."""
    if method.name in _TIES_FAMILY:
        shared["weighted_election"] = True
        shared["sign_election"] = "mass"
    if method.name in _MERGEKIT_RESCALE_DEFAULT:
        value = shared.get("rescale", _MERGEKIT_RESCALE_DEFAULT[method.name])
        if not isinstance(value, bool):
            raise ConfigError(f"mergekit parameter 'rescale' must be true or false, got {value!r}")
        shared["rescale"] = "l1" if value else "none"


# -- writing recipes as mergekit configs -----------------------------------------------------


def recipe_to_mergekit(recipe: Recipe, relative_to: Path | None = None) -> dict[str, Any]:
    """A mergekit config that merges exactly like ``recipe``, or a ConfigError saying why not.

    Equivalence is checked, not assumed: both are resolved against the models and compared
    tensor by tensor.
    """
    if recipe.layer_methods is not None:
        from evomerge.merge.plan import layer_runs

        raise ConfigError(
            "mergekit merges with one method per config; this recipe uses "
            f"{layer_runs(recipe.layer_methods)}"
        )
    method = get_method(recipe.method)
    if method.mergekit_name is None:
        raise ConfigError(f"method '{method.name}' has no mergekit equivalent")
    models = open_recipe_models(recipe, relative_to)
    native = plan_recipe(recipe, models)
    names = list(models[0].tensors)
    shared = {
        k: _to_mk_setting(k, v, names)
        for k, v in recipe.parameters.items()
        if k not in ("sign_election", "weighted_election", "rescale")
    }
    if "rescale" in recipe.parameters:
        rescale = recipe.parameters["rescale"]
        if rescale in ("l1", "none"):
            shared["rescale"] = rescale == "l1"
    elif method.name in _MERGEKIT_RESCALE_DEFAULT:
        shared["rescale"] = False
    config: dict[str, Any] = {"merge_method": method.mergekit_name}
    if recipe.base is not None and method.uses_base:
        config["base_model"] = str(models[0].path)
    entries = []
    offset = 1 if recipe.base is not None else 0
    for index, source in enumerate(recipe.sources):
        entry: dict[str, Any] = {"model": _reference(models[index + offset])}
        if source.parameters:
            entry["parameters"] = {
                k: _to_mk_setting(k, v, names) for k, v in source.parameters.items()
            }
        entries.append(entry)
    if method.uses_base and recipe.base is not None:
        entries.insert(0, {"model": str(models[0].path)})
    config["models"] = entries
    if shared:
        config["parameters"] = shared
    if recipe.dtype:
        config["out_dtype"] = recipe.dtype
    if native.tokenizer_model != 0:
        config["tokenizer_source"] = str(models[native.tokenizer_model].path)
    exported = plan_mergekit(parse_mergekit(config))
    _check_equivalent(native, exported)
    return config


def _to_mk_setting(name: str, setting: ParamSetting, tensor_names: list[str]) -> Any:
    conditions = [setting] if isinstance(setting, Condition) else setting
    if not (isinstance(conditions, list) and conditions and isinstance(conditions[0], Condition)):
        return setting
    out = []
    for cond in conditions:
        if cond.kind is not None and cond.filter not in (None, "*"):
            raise ConfigError(
                f"parameter '{name}': a condition on both kind and filter has no mergekit form"
            )
        if cond.kind is None:
            entry = {"filter": cond.filter} if cond.filter else {}
            out.append({**entry, "value": cond.value})
            continue
        out.extend(
            {"filter": pattern, "value": cond.value}
            for pattern in kind_filters(cond.kind, tensor_names, name)
        )
    return out


def kind_filters(kind: str, tensor_names: Iterable[str], parameter: str = "") -> list[str]:
    """Name substrings that match exactly the tensors of ``kind`` among ``tensor_names``.

    mergekit filters are plain substrings, so a kind is expressed by those of its patterns
    that match no tensor of another kind (``attention`` is dropped on Llama, where it also
    matches ``post_attention_layernorm``).
    """
    names = list(tensor_names)
    members = {n for n in names if tensor_kind(n) == kind}
    filters, covered = [], set()
    for pattern in dict(KIND_PATTERNS).get(kind, ()):
        matched = {n for n in names if pattern in n}
        if matched and matched <= members:
            filters.append(pattern)
            covered |= matched
    if covered != members:
        example = sorted(members - covered)[0]
        raise ConfigError(
            f"parameter '{parameter}': no mergekit filter selects exactly the '{kind}' tensors "
            f"of these models (e.g. {example})"
        )
    return filters


def _check_equivalent(native: MergePlan, exported: MergePlan) -> None:
    exported_jobs = {job.name: job for job in exported.jobs}
    for job in native.jobs:
        other = exported_jobs.get(job.name)
        if other is None:
            raise ConfigError(f"the mergekit form would not produce tensor {job.name}")
        mine, theirs = job.shared_dict(), other.shared_dict()
        if "weighted_election" in mine and not mine["weighted_election"]:
            weights = [p["weight"] for p in job.per_source_dicts()]
            if len(set(weights)) == 1 and weights[0] > 0:
                mine["weighted_election"] = True  # equal positive weights: same election
        densities = [p.get("density", 1.0) for p in job.per_source_dicts()]
        if mine.get("rescale") in ("inverse_density", "inverse_prob") and all(
            d >= 1 for d in densities
        ):
            mine["rescale"] = theirs.get("rescale")
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise ConfigError(
                    f"no mergekit config merges like this recipe: tensor {job.name}, parameter "
                    f"'{key}' is {mine.get(key)!r} here but would be {theirs.get(key)!r} "
                    "in mergekit"
                )
        if job.per_source != other.per_source:
            raise ConfigError(
                f"no mergekit config merges like this recipe: tensor {job.name} gets per-source "
                f"parameters {job.per_source_dicts()} here but {other.per_source_dicts()} "
                "in mergekit"
            )
