"""Search spaces: which merge coefficients a search may set, and how a genome becomes a recipe.

A space (``search_spaces/*.yaml``) names a merge method and, for each searched parameter, its
bounds, scale and scope. Bound to concrete models (:meth:`SearchSpace.bind`) it becomes a list
of genes. A genome is a vector in the unit cube, one entry per gene; :meth:`BoundSpace.decode`
turns it into an ordinary :class:`~evomerge.merge.recipe.Recipe` (the same file ``evomerge
merge`` takes) and :meth:`BoundSpace.encode` reads a recipe back into a genome.

Scopes. A parameter's ``scope`` lists what gets its own gene:

- ``source``: one gene per source model (per-source parameters only, e.g. ``weight``);
- ``group``: one gene per layer group (``layers: per_layer``, ``{groups: N}``, ``{group_size:
  N}`` or ``global``); tensors outside the layers (embeddings, head, final norm) have no group;
- ``kind``: one gene per tensor kind listed in ``kinds`` (attention, mlp, norm, embedding, head);
  tensors of unlisted kinds share one ``rest`` gene.

In a recipe, a group-scoped value is a per-layer list (one entry per layer, so each layer gets its
group's value exactly), or with ``smoothing: true`` the group genes are the anchors of a gradient
interpolated across the layers. Tensors outside the layers take a layer list's first entry, as in
any recipe (the final norm therefore shares the first group's ``norm`` or ``rest`` gene).

Method choice. With ``method_choice``, each layer group of ``method_choice.layers`` also gets a
one-of-k block of genes, one per method (``method/L0-1=ties``); the highest wins (ties to the
first listed) and the recipe gets ``layer_methods``. :meth:`BoundSpace.categorical_groups` lists
the blocks, which Optuna proposers suggest as categorical parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.bundled import bundled_folder
from evomerge.checkpoint import ModelFolder, path_labels
from evomerge.dataflow.space import BoundDataflowSpace, DataflowSpace
from evomerge.errors import ConfigError
from evomerge.merge.recipe import Recipe, evaluate_setting, parse_recipe
from evomerge.merge.registry import MergeMethod, ParamSpec, get_method
from evomerge.merge.tensors import layer_index, layer_position, tensor_kind
from evomerge.util import load_yaml

if TYPE_CHECKING:
    from evomerge.optimize import Objective, Proposer


SEARCH_SPACES_DIR = bundled_folder("search_spaces")
GeneKind = Literal["attention", "mlp", "norm", "embedding", "head"]
Scope = Literal["source", "group", "kind"]
REST = "rest"


class SearchedParameter(BaseModel):
    """One searched parameter: bounds, scale, scope, and its value in uniform baselines."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bounds: tuple[float, float]
    """Lowest and highest value, in the parameter's own units; a gene's 0 maps to the first,
    its 1 to the second."""
    scale: Literal["linear", "log"] = "linear"
    """How a gene in [0, 1] maps onto the bounds: ``linear`` evenly, ``log`` evenly in the
    logarithm (for ranges spanning orders of magnitude; needs positive bounds)."""
    scope: list[Scope] = Field(default_factory=lambda: ["source", "group", "kind"])
    """What gets its own gene: ``source`` (each source model; per-source parameters only),
    ``group`` (each layer group of ``layers``), ``kind`` (each tensor kind in ``kinds``).
    Left out, one gene is shared across that axis; ``[]`` searches a single value."""
    uniform: float | list[float] | None = None
    """Value(s) of this parameter in the uniform baselines; default the middle of the bounds
    (their geometric mean on a log scale). A list gives one baseline per value."""

    @model_validator(mode="after")
    def _check(self) -> SearchedParameter:
        low, high = self.bounds
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ValueError(f"bounds must be two finite numbers, low < high; got {low}, {high}")
        if self.scale == "log" and low <= 0:
            raise ValueError(f"a log scale needs positive bounds; got {low}, {high}")
        if len(set(self.scope)) != len(self.scope):
            raise ValueError("scope lists an entry twice")
        for value in self.uniform_values():
            if not low <= value <= high:
                raise ValueError(f"uniform value {value} is outside the bounds [{low}, {high}]")
        return self

    def uniform_values(self) -> list[float]:
        if self.uniform is None:
            low, high = self.bounds
            return [math.sqrt(low * high) if self.scale == "log" else (low + high) / 2]
        return list(self.uniform) if isinstance(self.uniform, list) else [self.uniform]

    def to_value(self, unit: float) -> float:
        low, high = self.bounds
        if self.scale == "log":
            return math.exp(math.log(low) + unit * (math.log(high) - math.log(low)))
        return low + unit * (high - low)

    def to_unit(self, value: float) -> float:
        low, high = self.bounds
        if self.scale == "log":
            unit = (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
        else:
            unit = (value - low) / (high - low)
        return min(1.0, max(0.0, unit))


class LayerGroups(BaseModel):
    """Contiguous layer groups that share genes; give exactly one of the two fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    groups: int | None = Field(default=None, ge=1)
    """Split the layers into this many contiguous groups of (nearly) equal size; at most the
    model's layer count."""
    group_size: int | None = Field(default=None, ge=1)
    """Layers per group, from the first layer on; the last group holds the remainder."""

    @model_validator(mode="after")
    def _one(self) -> LayerGroups:
        if (self.groups is None) == (self.group_size is None):
            raise ValueError("give exactly one of 'groups' or 'group_size'")
        return self


class MethodChoice(BaseModel):
    """A categorical gene per layer group: which merge method that group's layers use."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    methods: list[str] = Field(min_length=2)
    """The methods to choose among (at least two, no repeats; none that needs Fisher
    diagonals). Each must take every ``fixed`` parameter and, for each searched parameter it
    takes, take it with the same scope (per source or shared); every searched parameter must be
    taken by at least one of them. A group's genes form a one-of-k block, one coordinate per
    method (gene ``method/L0-1=ties``): the highest coordinate wins, a tie going to the method
    listed first. Uniform baselines are made once per method."""
    layers: Literal["per_layer", "global"] | LayerGroups = "global"
    """Which layers share a choice: ``per_layer``, ``global``, ``{groups: N}`` or
    ``{group_size: N}`` (independent of the space's ``layers``)."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        return _parse_layers(value)

    @field_validator("methods")
    @classmethod
    def _unique(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        return methods


class SearchSpace(BaseModel):
    """A search space file (``search_spaces/*.yaml``), before it is bound to models."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    """The space's name, shown by ``evomerge space show`` and in error messages."""
    description: str = ""
    """Free text shown beside the name by ``evomerge space show``."""
    method: str
    """The merge method every decoded recipe uses (see ``evomerge methods``); with
    ``method_choice``, the method of the tensors outside the layers (one of its ``methods``)."""
    layers: Literal["per_layer", "global"] | LayerGroups = "per_layer"
    """``per_layer``, ``global``, ``{groups: N}`` (N contiguous groups) or ``{group_size: N}``."""
    kinds: list[GeneKind] = Field(default_factory=list)
    """Tensor kinds that get their own genes for parameters scoped by ``kind``; tensors of
    other kinds share one ``rest`` gene. Empty: no per-kind genes."""
    parameters: dict[str, SearchedParameter] = Field(min_length=1)
    """The method's numeric parameters to search, by name."""
    fixed: dict[str, Any] = Field(default_factory=dict)
    """Method parameters set to one value in every recipe, not searched."""
    smoothing: bool = False
    """False: every layer takes its group's gene (steps between groups). True: the group genes
    are evenly spaced anchors of a gradient, interpolated linearly across the layers."""
    seed: int = 0
    """Seed of random masks (DARE, DELLA) in every recipe of the space."""
    method_choice: MethodChoice | None = None
    """Search the merge method too: ``{methods: [ties, dare_ties, ...], layers: {groups:
    2}}`` adds a one-of-k categorical gene per layer group of ``method_choice.layers``, and
    decoded recipes carry ``layer_methods``. None: ``method`` everywhere."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        return _parse_layers(value)

    @field_validator("kinds")
    @classmethod
    def _unique_kinds(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise ValueError("a kind is listed twice")
        return kinds

    def methods(self) -> list[MergeMethod]:
        """The methods decoded recipes may use: ``method``, then the other choices."""
        names = [self.method]
        if self.method_choice is not None:
            names += [m for m in self.method_choice.methods if m != self.method]
        return [get_method(name) for name in names]

    def check_method(self) -> MergeMethod:
        """The method, after checking every parameter against it (names, scopes, ranges);
        with ``method_choice``, against each method that takes it."""
        if self.method_choice is not None:
            return self._check_choice()
        return self._check_parameters(get_method(self.method), self.parameters, self.fixed)

    def _check_choice(self) -> MergeMethod:
        assert self.method_choice is not None
        where = f"search space '{self.name}'"
        choices = self.method_choice.methods
        if self.method not in choices:
            raise ConfigError(
                f"{where}: method '{self.method}' (used outside the layers) must be one of "
                f"method_choice.methods ({', '.join(choices)})"
            )
        methods = self.methods()
        for method in methods:
            if method.aux:
                raise ConfigError(
                    f"{where}: method_choice: '{method.name}' needs {', '.join(method.aux)} "
                    "for every source and cannot be chosen per layer group"
                )
            taken = {n: p for n, p in self.parameters.items() if _takes(method, n)}
            self._check_parameters(method, taken, self.fixed)
            missing = [
                spec.name
                for spec in method.params
                if spec.required
                and spec.name not in self.parameters
                and spec.name not in self.fixed
            ]
            if missing:
                raise ConfigError(
                    f"{where}: method_choice: '{method.name}' needs {', '.join(missing)}; "
                    "search or fix it"
                )
        for name in self.parameters:
            if not any(_takes(method, name) for method in methods):
                raise ConfigError(
                    f"{where}: no method of method_choice ({', '.join(choices)}) takes '{name}'"
                )
            scopes = {method.param(name).scope for method in methods if _takes(method, name)}
            if len(scopes) > 1:
                raise ConfigError(
                    f"{where}: method_choice: '{name}' is per source in some methods and "
                    "shared in others"
                )
        return methods[0]

    def _check_parameters(
        self,
        method: MergeMethod,
        parameters: Mapping[str, SearchedParameter],
        fixed: Mapping[str, Any],
    ) -> MergeMethod:
        where = f"search space '{self.name}'"
        for name, searched in parameters.items():
            spec = _param(method, name, where)
            if spec.kind not in (int, float):
                raise ConfigError(
                    f"{where}: parameter '{name}' of {method.name} is not numeric; "
                    "put it under 'fixed'"
                )
            for bound in searched.bounds:
                try:
                    spec.check(bound)
                except ValueError as exc:
                    raise ConfigError(
                        f"{where}: bounds of '{name}' {list(searched.bounds)}: {name} {exc}"
                    ) from None
            if "source" in searched.scope and spec.scope == "shared":
                raise ConfigError(
                    f"{where}: '{name}' is one value for all sources in {method.name}; "
                    "remove 'source' from its scope"
                )
        for name, value in fixed.items():
            spec = _param(method, name, where)
            if name in self.parameters:
                raise ConfigError(f"{where}: '{name}' is both searched and fixed")
            try:
                spec.check(spec.coerce(value))
            except ValueError as exc:
                raise ConfigError(f"{where}: fixed {name}: {exc}") from None
        return method

    def bind(self, base: ModelFolder, sources: Sequence[str]) -> BoundSpace:
        """The genes of this space for ``base``'s architecture and these source labels."""
        method = self.check_method()
        where = f"search space '{self.name}'"
        for used in self.methods():
            if used.max_sources is not None and len(sources) > used.max_sources:
                raise ConfigError(
                    f"{where}: {used.name} merges at most {used.max_sources} source(s) "
                    f"besides the base; got {len(sources)}"
                )
            if len(sources) < used.min_sources:
                raise ConfigError(f"{where}: {used.name} needs at least {used.min_sources} sources")
        num_layers = base.num_layers or 0
        layer_kinds, outer_kinds = _kinds_present(base)
        present = layer_kinds | outer_kinds
        for kind in self.kinds:
            if kind not in present:
                raise ConfigError(
                    f"{where}: kind '{kind}' does not occur in {base.path} "
                    f"(it has: {', '.join(sorted(present))})"
                )
        groups = _layer_groups(self.layers, num_layers, where)
        genes: list[Gene] = []
        for name, searched in self.parameters.items():
            spec = _spec(self.methods(), name)
            owners = list(sources) if "source" in searched.scope else [None]
            for owner in owners:
                for bucket in self._buckets(searched, layer_kinds | outer_kinds):
                    if bucket is None:
                        in_layers = bool(layer_kinds)
                    elif bucket == REST:
                        in_layers = bool(layer_kinds - set(self.kinds))
                    else:
                        in_layers = bucket in layer_kinds
                    group_count = len(groups) if "group" in searched.scope and in_layers else 1
                    for group in range(group_count):
                        genes.append(
                            Gene(
                                parameter=name,
                                source=owner,
                                kind=bucket,
                                group=group if group_count > 1 else None,
                                layers=groups[group] if group_count > 1 else None,
                                searched=searched,
                                per_source=spec.scope == "per_source",
                            )
                        )
        genes += self._choice_genes(num_layers, where)
        return BoundSpace(self, method, base, list(sources), groups, num_layers, genes)

    def _choice_genes(self, num_layers: int, where: str) -> list[Gene]:
        """The one-of-k genes of ``method_choice``, group by group."""
        if self.method_choice is None:
            return []
        if num_layers == 0:
            raise ConfigError(f"{where}: method_choice needs a model with layers")
        genes = []
        groups = _layer_groups(self.method_choice.layers, num_layers, f"{where}: method_choice")
        for group, layers in enumerate(groups):
            for choice in self.method_choice.methods:
                genes.append(
                    Gene(
                        parameter="method",
                        source=None,
                        kind=None,
                        group=group,
                        layers=layers,
                        searched=_UNIT,
                        per_source=False,
                        choice=choice,
                    )
                )
        return genes

    def _buckets(self, searched: SearchedParameter, present: set[str]) -> list[str | None]:
        if "kind" not in searched.scope or not self.kinds:
            return [None]
        rest = present - set(self.kinds)
        return [*self.kinds, *([REST] if rest else [])]


@dataclass(frozen=True, eq=False)
class Gene:
    """One coordinate of the genome (compared and hashed by identity)."""

    parameter: str
    source: str | None
    kind: str | None
    group: int | None
    layers: tuple[int, ...] | None
    searched: SearchedParameter
    per_source: bool
    choice: str | None = None
    """For a ``method_choice`` gene: the method this coordinate votes for (the group's highest
    coordinate wins); None for a numeric parameter."""

    @property
    def name(self) -> str:
        text = self.parameter + (f"[{self.source}]" if self.source is not None else "")
        if self.kind is not None:
            text += f"/{self.kind}"
        if self.layers is not None:
            first, last = self.layers[0], self.layers[-1]
            text += f"/L{first}" if first == last else f"/L{first}-{last}"
        if self.choice is not None:
            text += f"={self.choice}"
        return text

    @property
    def scope_text(self) -> str:
        parts = [
            f"source {self.source}" if self.source is not None else "all sources",
            f"kind {self.kind}" if self.kind is not None else "all kinds",
            f"layers {self.layers[0]}-{self.layers[-1]}" if self.layers else "all layers",
        ]
        return ", ".join(parts)


class BoundSpace:
    """A search space bound to a base model and source labels: genes, decode, encode."""

    def __init__(
        self,
        space: SearchSpace,
        method: MergeMethod,
        base: ModelFolder,
        sources: list[str],
        groups: list[tuple[int, ...]],
        num_layers: int,
        genes: list[Gene],
    ) -> None:
        self.space = space
        self.method = method
        self.base = base
        self.sources = sources
        self.groups = groups
        self.num_layers = num_layers
        self.genes = genes
        self._examples = _example_tensors(base)

    @property
    def dimension(self) -> int:
        return len(self.genes)

    def decode(
        self,
        genome: Sequence[float],
        base: str,
        sources: Sequence[str],
        fisher: Sequence[str] | None = None,
    ) -> Recipe:
        """The recipe a genome stands for; ``base`` and ``sources`` are the model folders,
        ``fisher`` each source's Fisher-diagonal folder (for a space whose method needs it)."""
        unit = np.asarray(genome, dtype=np.float64)
        if unit.shape != (self.dimension,):
            raise ConfigError(
                f"a genome for space '{self.space.name}' has {self.dimension} entries, "
                f"got shape {list(unit.shape)}"
            )
        if len(sources) != len(self.sources):
            raise ConfigError(f"expected {len(self.sources)} source folders, got {len(sources)}")
        if fisher is not None and len(fisher) != len(sources):
            raise ConfigError(f"expected {len(sources)} Fisher folders, got {len(fisher)}")
        values = {
            gene: gene.searched.to_value(float(min(1.0, max(0.0, u))))
            for gene, u in zip(self.genes, unit, strict=True)
            if gene.choice is None
        }
        shared: dict[str, Any] = {}
        per_source: list[dict[str, Any]] = [{} for _ in self.sources]
        for name, value in self.space.fixed.items():
            shared[name] = value
        for name in self.space.parameters:
            owners = {gene.source for gene in self.genes if gene.parameter == name}
            for owner in owners:
                setting = self._setting(name, owner, values)
                if owner is None:
                    shared[name] = setting
                else:
                    per_source[self.sources.index(owner)][name] = setting
        return parse_recipe(
            {
                "method": self.method.name,
                "base": base,
                "sources": [
                    {"model": folder, "label": label, "parameters": params}
                    | ({"fisher": fisher[index]} if fisher else {})
                    for index, (folder, label, params) in enumerate(
                        zip(sources, self.sources, per_source, strict=True)
                    )
                ],
                "parameters": shared,
                "seed": self.space.seed,
            }
            | ({"layer_methods": self._layer_methods(unit)} if self.space.method_choice else {}),
            where=f"recipe decoded from space '{self.space.name}'",
        )

    def categorical_groups(self) -> list[tuple[list[int], list[str]]]:
        """(coordinate indices, method names) of each ``method_choice`` group, in order."""
        groups: dict[int, tuple[list[int], list[str]]] = {}
        for index, gene in enumerate(self.genes):
            if gene.choice is not None:
                indices, names = groups.setdefault(gene.group or 0, ([], []))
                indices.append(index)
                names.append(gene.choice)
        return [groups[g] for g in sorted(groups)]

    def _layer_methods(self, unit: np.ndarray) -> list[str]:
        """The method of each layer: per group, the highest coordinate's (ties: the first)."""
        chosen = [self.space.method] * self.num_layers
        for indices, names in self.categorical_groups():
            winner = names[int(np.argmax(unit[indices]))]
            for layer in self.genes[indices[0]].layers or ():
                chosen[layer] = winner
        return chosen

    def _setting(self, name: str, owner: str | None, values: dict[Gene, float]) -> Any:
        genes = [g for g in self.genes if g.parameter == name and g.source == owner]
        by_bucket: dict[str | None, list[Gene]] = {}
        for gene in genes:
            by_bucket.setdefault(gene.kind, []).append(gene)

        def bucket_value(bucket_genes: list[Gene]) -> float | list[float]:
            if bucket_genes[0].layers is None:
                return values[bucket_genes[0]]
            anchors = [values[g] for g in bucket_genes]
            if self.space.smoothing:
                return anchors
            per_layer = [0.0] * self.num_layers
            for gene, value in zip(bucket_genes, anchors, strict=True):
                for layer in gene.layers or ():
                    per_layer[layer] = value
            return per_layer

        if list(by_bucket) == [None]:
            return bucket_value(by_bucket[None])
        conditions = []
        for bucket, bucket_genes in by_bucket.items():
            entry: dict[str, Any] = {"value": bucket_value(bucket_genes)}
            if bucket != REST:
                entry["kind"] = bucket
            conditions.append(entry)
        return conditions

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe: each gene's value read at a tensor it governs, then scaled.

        Exact for recipes this space decoded; for other recipes, values outside a gene's
        bounds are clipped and values that vary inside one gene's scope are sampled at its first
        layer.
        """
        defaults = path_labels([s.model for s in recipe.sources])
        labels = [s.label or d for s, d in zip(recipe.sources, defaults, strict=True)]
        unit = np.empty(self.dimension, dtype=np.float64)
        for index, gene in enumerate(self.genes):
            if gene.choice is not None:
                unit[index] = float(self._chosen(recipe, gene) == gene.choice)
                continue
            tensor, t = self._probe(gene)
            spec = _spec(self.space.methods(), gene.parameter)
            value = None
            if gene.source is not None:
                if gene.source not in labels:
                    raise ConfigError(f"the recipe has no source labelled '{gene.source}'")
                source = recipe.sources[labels.index(gene.source)]
                value = evaluate_setting(
                    source.parameters.get(gene.parameter), tensor, t, spec.coerce
                )
            if value is None:
                value = evaluate_setting(
                    recipe.parameters.get(gene.parameter), tensor, t, spec.coerce
                )
            if value is None:
                value = None if spec.required else spec.default
            if value is None:
                raise ConfigError(f"the recipe sets no value for gene {gene.name}")
            unit[index] = gene.searched.to_unit(float(value))
        return unit

    def _chosen(self, recipe: Recipe, gene: Gene) -> str:
        """The method a recipe uses in the first layer of a choice gene's group."""
        layer = (gene.layers or (0,))[0]
        if recipe.layer_methods is None:
            chosen = recipe.method
        elif layer < len(recipe.layer_methods):
            chosen = recipe.layer_methods[layer]
        else:
            raise ConfigError(
                f"the recipe's layer_methods has {len(recipe.layer_methods)} entries; "
                f"gene {gene.name} needs layer {layer}"
            )
        assert self.space.method_choice is not None
        if chosen not in self.space.method_choice.methods:
            raise ConfigError(
                f"the recipe uses '{chosen}' in layer {layer}, not one of the space's methods "
                f"({', '.join(self.space.method_choice.methods)})"
            )
        return chosen

    def _probe(self, gene: Gene) -> tuple[str, float]:
        """A tensor name and layer position at which ``gene`` alone decides the value."""
        if gene.kind is None or gene.kind == REST:
            excluded = set(self.space.kinds) if gene.kind == REST else set()
            candidates = [
                (name, layer)
                for (kind, layer), name in self._examples.items()
                if kind not in excluded and (gene.layers is None or layer == gene.layers[0])
            ]
        else:
            candidates = [
                (name, layer)
                for (kind, layer), name in self._examples.items()
                if kind == gene.kind and (gene.layers is None or layer == gene.layers[0])
            ]
        if gene.layers is not None:
            candidates = [c for c in candidates if c[1] is not None]
        if not candidates:
            raise ConfigError(f"no tensor of the base model is governed by gene {gene.name}")
        name = sorted(candidates, key=lambda c: (c[1] is None, c[1] or 0, c[0]))[0][0]
        if gene.layers is not None and self.space.smoothing and gene.group is not None:
            count = len(self.groups)
            return name, gene.group / (count - 1) if count > 1 else 0.0
        return name, layer_position(name, self.num_layers)

    def uniform_baselines(self) -> list[tuple[str, np.ndarray]]:
        """(label, genome) of each uniform baseline: every gene of a parameter at one value.

        A parameter with several ``uniform`` values gives several baselines; parameters with
        fewer values repeat their last one. With ``method_choice``, each of these once per
        method (every layer group choosing it).
        """
        values = {name: p.uniform_values() for name, p in self.space.parameters.items()}
        count = max(len(v) for v in values.values())
        choice = self.space.method_choice
        baselines = []
        for method in choice.methods if choice is not None else [None]:
            for index in range(count):
                chosen = {name: v[min(index, len(v) - 1)] for name, v in values.items()}
                genome = np.array(
                    [
                        float(gene.choice == method)
                        if gene.choice is not None
                        else gene.searched.to_unit(chosen[gene.parameter])
                        for gene in self.genes
                    ]
                )
                settings = [f"{name}={value:g}" for name, value in chosen.items()]
                if method is not None:
                    settings.insert(0, f"method={method}")
                baselines.append(("uniform " + ", ".join(settings), genome))
        return baselines

    def uniform_genomes(self) -> list[np.ndarray]:
        """Genomes of the uniform baselines (see :meth:`uniform_baselines`)."""
        return [genome for _, genome in self.uniform_baselines()]

    def start_genome(self) -> np.ndarray:
        """Where CMA-ES starts: the mean of the uniform baselines."""
        return np.mean(self.uniform_genomes(), axis=0)

    def table(self) -> list[tuple[str, str, str, str]]:
        """(name, scope, bounds, scale) per gene, for ``evomerge space show``."""
        rows = []
        for gene in self.genes:
            if gene.choice is not None:
                count = len(self.space.method_choice.methods) if self.space.method_choice else 0
                first, last = (gene.layers or (0,))[0], (gene.layers or (0,))[-1]
                rows.append((gene.name, f"layers {first}-{last}", f"one of {count}", "categorical"))
                continue
            bounds = f"[{gene.searched.bounds[0]:g}, {gene.searched.bounds[1]:g}]"
            rows.append((gene.name, gene.scope_text, bounds, gene.searched.scale))
        return rows


AnySpace = SearchSpace | DataflowSpace
"""A parameter space or a data-flow space (``kind: dataflow``)."""
AnyBoundSpace = BoundSpace | BoundDataflowSpace


def load_space(path_or_name: str | Path) -> AnySpace:
    """A space from a YAML file, or a ready one by name (``task_arithmetic_per_layer``)."""
    path = Path(path_or_name)
    if not path.exists() and not path.suffix:
        candidate = SEARCH_SPACES_DIR / f"{path_or_name}.yaml"
        if candidate.exists():
            path = candidate
        else:
            ready = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
            raise ConfigError(
                f"no search space file {path_or_name}; ready spaces: {', '.join(ready)}"
            )
    return parse_space(load_yaml(path), where=str(path))


def space_from_setting(setting: str | dict[str, Any], folder: Path | None = None) -> AnySpace:
    """A config's ``space`` value: an inline mapping, a file (relative to ``folder``), or the
    name of a ready space."""
    if isinstance(setting, dict):
        return parse_space(setting, where="space")
    candidate = Path(setting).expanduser()
    if folder is not None and not candidate.is_absolute() and (folder / candidate).exists():
        candidate = folder / candidate
    return load_space(candidate if candidate.exists() else setting)


def parse_space(data: dict[str, Any], where: str = "search space") -> AnySpace:
    """A parameter space, or with ``kind: dataflow`` a data-flow space
    (:mod:`evomerge.dataflow.space`)."""
    from evomerge.util import pydantic_message

    if isinstance(data, dict) and data.get("kind") == "dataflow":
        from evomerge.dataflow.space import parse_dataflow_space

        return parse_dataflow_space(data, where)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_message(exc)}") from None
    try:
        space.check_method()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return space


_UNIT = SearchedParameter(bounds=(0.0, 1.0), scope=[])
"""The stand-in bounds of a ``method_choice`` gene (its coordinate is a vote in [0, 1])."""


def _parse_layers(value: Any) -> Any:
    if isinstance(value, dict):
        return LayerGroups.model_validate(value)
    if value not in ("per_layer", "global"):
        raise ValueError(
            f"must be per_layer, global, {{groups: N}} or {{group_size: N}}; got {value!r}"
        )
    return value


def _takes(method: MergeMethod, name: str) -> bool:
    return any(spec.name == name for spec in method.params)


def _spec(methods: Sequence[MergeMethod], name: str) -> ParamSpec:
    """Parameter ``name`` of the first method that takes it (the space's ``method`` first)."""
    for method in methods:
        if _takes(method, name):
            return method.param(name)
    return methods[0].param(name)


def _param(method: MergeMethod, name: str, where: str) -> ParamSpec:
    try:
        return method.param(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _kinds_present(base: ModelFolder) -> tuple[set[str], set[str]]:
    """Kinds of floating-point tensors inside the layers, and outside them."""
    inside: set[str] = set()
    outside: set[str] = set()
    for name, info in base.tensors.items():
        if not info.dtype.is_floating_point:
            continue
        (inside if layer_index(name) is not None else outside).add(tensor_kind(name))
    return inside, outside


def _example_tensors(base: ModelFolder) -> dict[tuple[str, int | None], str]:
    """One tensor name per (kind, layer), the first in name order."""
    examples: dict[tuple[str, int | None], str] = {}
    for name in sorted(base.tensors):
        if base.tensors[name].dtype.is_floating_point:
            examples.setdefault((tensor_kind(name), layer_index(name)), name)
    return examples


def _layer_groups(layers: str | LayerGroups, num_layers: int, where: str) -> list[tuple[int, ...]]:
    """Contiguous layer groups."""
    if num_layers == 0:
        return [()]
    if layers == "global":
        return [tuple(range(num_layers))]
    if layers == "per_layer":
        return [(i,) for i in range(num_layers)]
    assert isinstance(layers, LayerGroups)
    if layers.groups is not None:
        if layers.groups > num_layers:
            raise ConfigError(
                f"{where}: {layers.groups} layer groups but the model has {num_layers} layers"
            )
        count = layers.groups
        return [
            tuple(i for i in range(num_layers) if i * count // num_layers == g)
            for g in range(count)
        ]
    size = layers.group_size or 1
    if size > num_layers:
        raise ConfigError(
            f"{where}: group_size {size} is larger than the model's {num_layers} layers"
        )
    return [tuple(range(s, min(s + size, num_layers))) for s in range(0, num_layers, size)]


def build_space_proposer(
    settings: Mapping[str, Any],
    space: AnyBoundSpace,
    objectives: Sequence[Objective],
    state: bytes | None = None,
) -> Proposer:
    """The proposer a search config asks for (restored from ``state`` if given); CMA-ES
    starts from the mean of the space's uniform baselines unless ``x0`` is given. The
    ``method_choice`` groups are passed as ``categorical`` (Optuna kinds suggest them natively;
    CMA-ES searches the one-of-k coordinates as numbers, decoded by argmax)."""
    from evomerge.optimize import build_proposer, parse_proposer_config, restore_proposer

    settings = dict(settings)
    if settings.get("kind", "cma") == "cma" and settings.get("x0") is None:
        settings["x0"] = space.start_genome().tolist()
    config = parse_proposer_config(settings)
    categorical = [indices for indices, _ in space.categorical_groups()]
    if state is not None:
        return restore_proposer(
            config, space.dimension, list(objectives), state, categorical=categorical
        )
    return build_proposer(config, space.dimension, list(objectives), categorical=categorical)
