"""The data-flow search space (``kind: dataflow``): which layers, in which order.

The candidate layers are the layers of the space's ``models`` (the sources, and merges such as
a study's best trial, ``study:NAME:best``), laid out in a fixed order, model after model, and
repeated ``repeats`` times (Akiba et al., "Evolutionary Optimization of Model Merging Recipes").
For each of these positions the genome holds a *use* gene (the layer is on the path when it is
above 0.5) and, when the space has two models or more, a *scale* gene: the input scaling of the
layer when the path reaches it from another model's layer (or, first on the path, from the
outer model's embeddings); elsewhere the scale is 1. The outer model's layers that open the
layout have no scale gene: only its own embeddings and layers can precede them. Constraints: a
path has at least one layer (an empty genome uses its highest use gene) and at most
``max_depth`` (the highest use genes win, ties to the earlier position). CMA-ES searches the
use genes as numbers and thresholds them; Optuna samplers suggest each as a yes/no categorical
parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.dataflow.recipe import DataflowRecipe, parse_dataflow_recipe
from evomerge.errors import ConfigError
from evomerge.merge.registry import get_method
from evomerge.util import pydantic_message

if TYPE_CHECKING:
    from evomerge.checkpoint import ModelFolder

THRESHOLD = 0.5
"""A use gene above this puts its layer on the path."""
SOURCES = "sources"


class ScaleRange(BaseModel):
    """The range of a scale gene."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bounds: tuple[float, float] = (0.5, 2.0)
    """Lowest and highest input scaling (both above 0)."""
    scale: Literal["linear", "log"] = "log"
    """How a gene in [0, 1] maps onto the bounds."""

    @model_validator(mode="after")
    def _check(self) -> ScaleRange:
        low, high = self.bounds
        if not 0 < low < high or not np.isfinite(high):
            raise ValueError(f"bounds must be finite numbers, 0 < low < high; got {low}, {high}")
        if not low <= 1.0 <= high:
            raise ValueError(f"bounds must contain 1 (no scaling); got {low}, {high}")
        return self

    def to_value(self, unit: float) -> float:
        low, high = self.bounds
        unit = min(1.0, max(0.0, float(unit)))
        if self.scale == "log":
            return float(np.exp(np.log(low) + unit * (np.log(high) - np.log(low))))
        return low + unit * (high - low)

    def to_unit(self, value: float) -> float:
        low, high = self.bounds
        if self.scale == "log":
            unit = (np.log(value) - np.log(low)) / (np.log(high) - np.log(low))
        else:
            unit = (value - low) / (high - low)
        return float(min(1.0, max(0.0, unit)))


class StudyModel(BaseModel):
    """A merge on the path: a study's trial (``study: NAME:best``), resolved to its recipe
    when the data-flow study is created, or a recipe given inline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str = Field("merge", min_length=1)
    """The name path steps use for it."""
    study: str | None = None
    """``NAME:SELECTOR``: a study in the same database, and its trial (``best``, a number or
    ``pareto:K``); kept, once resolved, to say where ``recipe`` came from."""
    recipe: dict[str, Any] | None = None
    """The merge's recipe (what ``study`` resolved to when the data-flow study was created, so a
    resumed study keeps it whatever the other study did since)."""

    @model_validator(mode="after")
    def _one(self) -> StudyModel:
        if self.study is None and self.recipe is None:
            raise ValueError(f"model '{self.label}': give 'study' or 'recipe'")
        if self.study is not None and ":" not in self.study:
            raise ValueError(f"study must be NAME:SELECTOR (NAME:best), got '{self.study}'")
        return self


class DataflowSpace(BaseModel):
    """A data-flow search space file (``kind: dataflow``); see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["dataflow"]
    """Marks a data-flow space (a parameter-space file has no ``kind``)."""
    name: str = Field(min_length=1)
    """The space's name, shown by ``evomerge space show``."""
    description: str = ""
    """Free text shown beside the name."""
    models: list[str | StudyModel] = Field(default_factory=lambda: [SOURCES], min_length=1)
    """Whose layers the path may use, in layout order: ``sources`` (every source), a source's
    label, ``study:NAME:best`` (a study's best trial in the same database, merged), or a
    mapping ``{label, study}`` / ``{label, recipe}``."""
    repeats: int = Field(2, ge=1, le=16)
    """How many times the layout of all the models' layers is repeated (the paper's r)."""
    max_depth: int | None = Field(None, ge=1)
    """Most layers a path may have; default twice the models' layer count (at most every
    position)."""
    scaling: ScaleRange = Field(default_factory=ScaleRange)
    """Range of the input scaling where the path crosses between models."""
    outer: str | None = None
    """Label of the model whose embeddings, final norm and head the path uses; default the
    first model listed."""

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        out: list[str | StudyModel] = []
        for index, entry in enumerate(value):
            if isinstance(entry, str) and entry.startswith("study:"):
                entry = {"study": entry.removeprefix("study:")}
            if isinstance(entry, dict):
                try:
                    entry = StudyModel.model_validate(entry)
                except ValidationError as exc:
                    raise ValueError(f"models[{index}]: {pydantic_message(exc)}") from None
            elif not isinstance(entry, str | StudyModel):
                raise ValueError(
                    f"models[{index}]: expected 'sources', a source label, study:NAME:SELECTOR "
                    f"or a mapping, got {entry!r}"
                )
            out.append(entry)
        labels = [e.label for e in out if isinstance(e, StudyModel)]
        if len(labels) != len(set(labels)):
            raise ValueError("two merges have one label; give each a 'label'")
        return out

    def unresolved(self) -> list[StudyModel]:
        """The merges still named by study (resolved when a study is created)."""
        return [m for m in self.models if isinstance(m, StudyModel) and m.recipe is None]

    def model_labels(self, sources: Sequence[str]) -> tuple[list[str], dict[str, StudyModel]]:
        """The labels of the models whose layers a path may use, in layout order (``sources``
        expanded to these source labels), and the merges among them by label."""
        where = f"search space '{self.name}'"
        labels: list[str] = []
        merges: dict[str, StudyModel] = {}
        for entry in self.models:
            if isinstance(entry, StudyModel):
                found = [entry.label]
                merges[entry.label] = entry
            elif entry == SOURCES:
                found = list(sources)
            elif entry in sources:
                found = [entry]
            else:
                raise ConfigError(
                    f"{where}: models: '{entry}' is not 'sources', a source label "
                    f"({', '.join(sources)}) or study:NAME:SELECTOR"
                )
            for label in found:
                if label in labels:
                    raise ConfigError(f"{where}: models: '{label}' is listed twice")
                labels.append(label)
        return labels, merges

    def bind(self, base: ModelFolder, sources: Sequence[str]) -> BoundDataflowSpace:
        """The genes of this space for ``base``'s architecture and these source labels."""
        from evomerge.dataflow.recipe import fold_problem

        where = f"search space '{self.name}'"
        num_layers = base.num_layers or 0
        if num_layers == 0:
            raise ConfigError(f"{where}: {base.path} has no layers to build a path of")
        labels, merges = self.model_labels(sources)
        outer = self.outer or labels[0]
        if outer not in labels:
            raise ConfigError(
                f"{where}: outer '{outer}' is none of the models ({', '.join(labels)})"
            )
        positions = [
            (repeat, label, layer)
            for repeat in range(self.repeats)
            for label in labels
            for layer in range(num_layers)
        ]
        max_depth = self.max_depth or min(2 * num_layers, len(positions))
        if max_depth > len(positions):
            raise ConfigError(
                f"{where}: max_depth {max_depth} exceeds the {len(positions)} positions "
                f"({self.repeats} repeats x {len(labels)} models x {num_layers} layers)"
            )
        if len(labels) > 1:
            problem = fold_problem(base.path)
            if problem is not None:
                raise ConfigError(f"{where}: input scalings cannot be applied exactly: {problem}")
        return BoundDataflowSpace(
            self, labels, merges, outer, positions, max_depth, num_layers, list(sources)
        )


@dataclass(frozen=True, eq=False)
class DataflowGene:
    """One coordinate: a position's use gene, or its scale gene."""

    role: Literal["use", "scale"]
    position: int
    repeat: int
    model: str
    layer: int
    scaling: ScaleRange
    choice: None = None
    """Never a method choice (read by code shared with parameter spaces)."""

    @property
    def name(self) -> str:
        return f"{self.role}/r{self.repeat}/{self.model}/L{self.layer}"

    @property
    def searched(self) -> GeneRange:
        """The gene's range (as a parameter space's genes give it): a use gene's coordinate
        in [0, 1], a scale gene's scaling."""
        if self.role == "use":
            return GeneRange((0.0, 1.0), "linear")
        return GeneRange(self.scaling.bounds, self.scaling.scale)


@dataclass(frozen=True)
class GeneRange:
    bounds: tuple[float, float]
    scale: Literal["linear", "log"]


class BoundDataflowSpace:
    """A data-flow space bound to a base model and source labels: genes, decode, encode."""

    def __init__(
        self,
        space: DataflowSpace,
        labels: list[str],
        merges: dict[str, StudyModel],
        outer: str,
        positions: list[tuple[int, str, int]],
        max_depth: int,
        num_layers: int,
        source_labels: list[str],
    ) -> None:
        self.space = space
        self.source_labels = source_labels
        """The study's source labels, in the order of its source folders."""
        self.labels = labels
        self.merges = merges
        self.outer = outer
        self.positions = positions
        self.max_depth = max_depth
        self.num_layers = num_layers
        self.method = get_method("passthrough")
        """What preflight checks read of a space's method (a path copies layers)."""
        self.scaled = len(labels) > 1
        self.genes: list[DataflowGene] = [
            DataflowGene("use", p, r, m, layer, space.scaling)
            for p, (r, m, layer) in enumerate(positions)
        ]
        self.scale_genes: dict[int, int] = {}
        """Position -> index of its scale gene, for the positions a path can reach from
        another model's layer (not the outer model's first layers: only its own embeddings
        and layers come before them)."""
        if self.scaled:
            for p, (r, m, layer) in enumerate(positions):
                if m == outer and all(q[1] == m for q in positions[:p]):
                    continue
                self.scale_genes[p] = len(self.genes)
                self.genes.append(DataflowGene("scale", p, r, m, layer, space.scaling))

    @property
    def dimension(self) -> int:
        return len(self.genes)

    @property
    def use_count(self) -> int:
        return len(self.positions)

    def shape_text(self) -> str:
        """The size and shape of the space, for ``evomerge space show``."""
        scales = len(self.scale_genes)
        genes = f"{self.use_count} use genes" + (
            f" + {scales} scale genes" if self.scaled else " (one model: no scalings)"
        )
        return (
            f"{self.space.repeats} repeats x {len(self.labels)} models "
            f"({', '.join(self.labels)}) x {self.num_layers} layers = {self.use_count} "
            f"positions; {genes}; paths of 1 to {self.max_depth} layers; embeddings, final "
            f"norm and head of '{self.outer}'"
        )

    def categorical_groups(self) -> list[tuple[list[int], list[str]]]:
        """Each use gene is a yes/no choice (a group of one coordinate)."""
        return [([p], ["unused", "used"]) for p in range(self.use_count)]

    def chosen(self, unit: np.ndarray) -> list[int]:
        """The positions on the path: use genes above the threshold, at least one, at most
        ``max_depth`` (highest first, ties to the earlier position), in layout order."""
        use = unit[: self.use_count]
        chosen = [p for p in range(self.use_count) if use[p] > THRESHOLD]
        if not chosen:
            chosen = [int(np.argmax(use))]
        if len(chosen) > self.max_depth:
            ranked = sorted(chosen, key=lambda p: (-use[p], p))
            chosen = sorted(ranked[: self.max_depth])
        return chosen

    def decode(
        self,
        genome: Sequence[float],
        base: str,
        sources: Sequence[str],
        fisher: Sequence[str] | None = None,
    ) -> DataflowRecipe:
        """The path recipe a genome stands for; ``sources`` are the folders, by label order."""
        unit = np.asarray(genome, dtype=np.float64)
        if unit.shape != (self.dimension,):
            raise ConfigError(
                f"a genome for space '{self.space.name}' has {self.dimension} entries, "
                f"got shape {list(unit.shape)}"
            )
        folders = self._folders(sources)
        steps = []
        previous = self.outer
        for p in self.chosen(unit):
            _, model, layer = self.positions[p]
            scale = 1.0
            if model != previous and p in self.scale_genes:
                scale = self.space.scaling.to_value(unit[self.scale_genes[p]])
            steps.append({"model": model, "layer": layer, "scale": scale})
            previous = model
        used = {step["model"] for step in steps} | {self.outer}
        models: list[dict[str, Any]] = []
        for label in self.labels:
            if label not in used:
                continue
            if label in self.merges:
                recipe = self.merges[label].recipe
                if recipe is None:
                    raise ConfigError(
                        f"space '{self.space.name}': merge '{label}' (study "
                        f"{self.merges[label].study}) is resolved when the study is created"
                    )
                models.append({"label": label, "recipe": recipe})
            else:
                models.append({"label": label, "model": folders[label]})
        return parse_dataflow_recipe(
            {"models": models, "outer": self.outer, "path": steps},
            where=f"recipe decoded from space '{self.space.name}'",
        )

    def _folders(self, sources: Sequence[str]) -> dict[str, str]:
        if len(sources) != len(self.source_labels):
            raise ConfigError(
                f"expected {len(self.source_labels)} source folders, got {len(sources)}"
            )
        return dict(zip(self.source_labels, sources, strict=True))

    def encode(self, recipe: DataflowRecipe) -> np.ndarray:
        """A genome that decodes to ``recipe``'s path: each step takes the first unused
        position of its layer after the previous step's; refused when the space cannot
        express the path."""
        unit = self._unscaled()
        if recipe.outer != self.outer:
            raise ConfigError(
                f"the recipe's outer model is '{recipe.outer}', the space's '{self.outer}'"
            )
        if len(recipe.path) > self.max_depth:
            raise ConfigError(
                f"the path has {len(recipe.path)} layers; max_depth is {self.max_depth}"
            )
        position = 0
        previous = self.outer
        for index, step in enumerate(recipe.path):
            while position < self.use_count and self.positions[position][1:] != (
                step.model,
                step.layer,
            ):
                position += 1
            if position == self.use_count:
                raise ConfigError(
                    f"path[{index}] (layer {step.layer} of '{step.model}') has no position left "
                    "in this space's layout"
                )
            unit[position] = 1.0
            if step.model != previous and position in self.scale_genes:
                unit[self.scale_genes[position]] = self.space.scaling.to_unit(step.scale)
            elif step.scale != 1.0:
                raise ConfigError(
                    f"path[{index}] scales a layer that does not cross between models; this "
                    "space cannot express it"
                )
            previous = step.model
            position += 1
        return unit

    def uniform_baselines(self) -> list[tuple[str, np.ndarray]]:
        """The outer model alone, as a path (its layers in order): the reference a path must
        beat, and a check that a path builds the same model."""
        unit = self._unscaled()
        for p, (repeat, model, _) in enumerate(self.positions):
            if repeat == 0 and model == self.outer:
                unit[p] = 1.0
        return [(f"path: {self.outer} alone", unit)]

    def _unscaled(self) -> np.ndarray:
        """No layer used, every scale gene at 1 (no scaling)."""
        unit = np.zeros(self.dimension, dtype=np.float64)
        unit[self.use_count :] = self.space.scaling.to_unit(1.0)
        return unit

    def uniform_genomes(self) -> list[np.ndarray]:
        return [genome for _, genome in self.uniform_baselines()]

    def start_genome(self) -> np.ndarray:
        """Where CMA-ES starts: the outer model alone, its use genes at 0.75 on its path and
        0.25 elsewhere: a first sample switches about one use gene in six at the default sigma0
        (0.25), one in ten at 0.2, exploring paths near the start (0.6 / 0.4 switched one in
        three, and on the toy zoo no path found over a merge then scored as well as the merge:
        scripts/bench_dfs.py)."""
        unit = self.uniform_genomes()[0].copy()
        unit[: self.use_count] = np.where(unit[: self.use_count] > THRESHOLD, 0.75, 0.25)
        return unit

    def table(self) -> list[tuple[str, str, str, str]]:
        """(name, scope, bounds, scale) per gene, for ``evomerge space show``."""
        rows = []
        for gene in self.genes:
            where = f"position {gene.position}: layer {gene.layer} of {gene.model}"
            if gene.role == "use":
                rows.append((gene.name, where, "{no, yes}", f"binary (> {THRESHOLD})"))
            else:
                low, high = gene.scaling.bounds
                rows.append(
                    (
                        gene.name,
                        where + ", when reached from another model",
                        f"[{low:g}, {high:g}]",
                        gene.scaling.scale,
                    )
                )
        return rows


def parse_dataflow_space(data: Mapping[str, Any], where: str) -> DataflowSpace:
    try:
        return DataflowSpace.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_message(exc)}") from None
