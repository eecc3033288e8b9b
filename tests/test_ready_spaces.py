"""Every gene of every ready search space moves the merge, on the toy zoo.

For each parameter space in ``search_spaces/`` (found by glob, so a new space is covered without
an edit; the data-flow spaces, ``kind: dataflow``, are covered by ``test_dataflow_space.py``),
bound to the toy zoo (``ft_a`` and ``ft_b``; SLERP: ``ft_b`` alone), starting from its first
uniform baseline:

- each gene alone, stepped by 0.1 in the unit cube, changes some merged tensor;
- the genes of one parameter that differ only by source, stepped together, change it too (a
  space whose merge divides by the sum of the weights fails this: scaling every source's weight
  alike leaves such a merge as it was, so that direction of the search does nothing);
- the merge is continuous in each weight near weight 0 (moving a weight from 0 by 2h changes
  the merge about twice as much as by h): a normalized merge jumps there instead;
- a ``method_choice`` coordinate (one of a one-of-k group) moves the merge when set to 1.0, the
  rest of its group at 0.0, from a uniform baseline that chooses another method.

Only the tensors whose parameters a genome changes are merged (the plan says which), from
tensors loaded once. ``EVOMERGE_SPACES_UNDER_TEST`` points the tests at another folder of space
files (used once to show that the spaces before the redesign fail).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.checkpoint import ModelFolder, parse_dtype
from evomerge.dataflow.space import DataflowSpace
from evomerge.merge.engine import merge_job
from evomerge.merge.plan import MergePlan, TensorJob
from evomerge.merge.recipe import plan_recipe
from evomerge.merge.registry import get_method
from evomerge.space import SEARCH_SPACES_DIR, BoundSpace, Gene, load_space
from tests.helpers import write_random_fisher

SPACES_DIR = Path(os.environ.get("EVOMERGE_SPACES_UNDER_TEST", SEARCH_SPACES_DIR))
SPACE_FILES = sorted(
    p for p in SPACES_DIR.glob("*.yaml") if not isinstance(load_space(p), DataflowSpace)
)
CHOICE_FILES = [p for p in SPACE_FILES if load_space(p).method_choice is not None]
STEP = 0.1  # in the unit cube
ROUNDING = 16  # changes up to this many float32 epsilons of a tensor's scale are rounding
SMALL = 0.02  # the unit step h of the continuity check (a weight of 0.03 in [0, 1.5])


def moved(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether ``after`` differs from ``before`` by more than float32 rounding."""
    scale = float(before.abs().max()) * torch.finfo(torch.float32).eps
    return float((after - before).abs().max()) > ROUNDING * scale


class Probe:
    """A space bound to the toy zoo and the merge of its reference genome, tensor by tensor."""

    def __init__(
        self, path: Path, zoo: dict[str, Path], tensors: Callable, fisher: dict[str, Path]
    ) -> None:
        self.space = load_space(path)
        one_source = get_method(self.space.method).max_sources == 1  # slerp, nearswap, ...
        labels = ["ft_b"] if one_source else ["ft_a", "ft_b"]
        self.base = str(zoo["base"])
        self.sources = [str(zoo[label]) for label in labels]
        self.folders = [
            ModelFolder(zoo["base"], label="base"),
            *(ModelFolder(zoo[label], label=label) for label in labels),
        ]
        self.fisher: list[str] | None = None
        if "fisher" in get_method(self.space.method).aux:  # stand-in diagonals, one per source
            self.fisher = [str(fisher[label]) for label in labels]
        self.bound: BoundSpace = self.space.bind(self.folders[0], labels)
        self.tensors = tensors
        self.reference = self.bound.uniform_genomes()[0]
        self.jobs = {job.name: job for job in self.plan(self.reference).jobs}
        self.cache: dict[str, torch.Tensor] = {}

    def plan(self, genome: np.ndarray) -> MergePlan:
        recipe = self.bound.decode(genome, self.base, self.sources, self.fisher)
        aux = {
            index: ModelFolder(path, label=f"fisher {index}", require_config=False)
            for index, path in enumerate(self.fisher or [])
        }
        return plan_recipe(recipe, self.folders, aux)

    def merge(self, plan: MergePlan, job: TensorJob) -> torch.Tensor:
        return merge_job(
            job,
            get_method(plan.method_of(job)),
            lambda ref: self.tensors(plan.models[ref.model])[ref.tensor],
            seed=plan.seed,
            input_dtype=parse_dtype(plan.input_dtype),
        )

    def merged(self, genome: np.ndarray, names: set[str]) -> dict[str, torch.Tensor]:
        plan = self.plan(genome)
        return {job.name: self.merge(plan, job) for job in plan.jobs if job.name in names}

    def moves(self, genome: np.ndarray, start: np.ndarray | None = None) -> bool:
        """Whether some merged entry differs from the merge of ``start`` (default the
        reference) by more than rounding (tensors are merged one at a time, until one has
        moved; only those whose job differs)."""
        plan = self.plan(genome)
        reference = self.plan(self.reference if start is None else start)
        before = {job.name: job for job in reference.jobs}
        for job in plan.jobs:
            if job == before[job.name]:
                continue
            if start is not None:
                if moved(self.merge(reference, before[job.name]), self.merge(plan, job)):
                    return True
                continue
            if job.name not in self.cache:
                self.cache[job.name] = self.merge(reference, before[job.name])
            if moved(self.cache[job.name], self.merge(plan, job)):
                return True
        return False

    def chosen(self, gene: Gene) -> tuple[np.ndarray, np.ndarray]:
        """(start, genome) for a method-choice coordinate: a uniform baseline whose group
        chooses another method, and the same with this coordinate alone at 1.0 in its group."""
        indices = next(
            i for i, _ in self.bound.categorical_groups() if self.bound.genes.index(gene) in i
        )
        index = self.bound.genes.index(gene)
        start = next(g for g in self.bound.uniform_genomes() if g[index] == 0.0)
        genome = start.copy()
        genome[indices] = 0.0
        genome[index] = 1.0
        return start, genome

    def stepped(self, genes: list[Gene]) -> np.ndarray:
        """The reference with these genes moved by STEP, up where they can, else down."""
        genome = self.reference.copy()
        index = [self.bound.genes.index(gene) for gene in genes]
        direction = 1.0 if all(genome[i] + STEP <= 1.0 for i in index) else -1.0
        genome[index] += direction * STEP
        return genome


@pytest.fixture(scope="module")
def tensors(toy_zoo: dict[str, Path]):  # type: ignore[no-untyped-def]
    """Every model folder's tensors, read once; one torch thread (the tensors are tiny, and a
    second thread competing with another process on 2 CPUs only slows them)."""
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(path: str) -> dict[str, torch.Tensor]:
        if path not in loaded:
            folder = ModelFolder(path, require_config=(Path(path) / "config.json").is_file())
            loaded[path] = {name: folder.read(name, "cpu") for name in folder.tensors}
            folder.close()
        return loaded[path]

    yield get
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probe_of(
    toy_zoo: dict[str, Path], tensors: Callable, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Path], Probe]:
    """The probe of a space file, built once per module (with stand-in Fisher diagonals)."""
    probes: dict[Path, Probe] = {}
    root = tmp_path_factory.mktemp("fisher")
    fisher = {
        label: write_random_fisher(toy_zoo[label], root / label, seed)
        for seed, label in enumerate(("ft_a", "ft_b"))
    }

    def get(path: Path) -> Probe:
        if path not in probes:
            probes[path] = Probe(path, toy_zoo, tensors, fisher)
        return probes[path]

    return get


def test_the_ready_spaces_are_found():
    assert len(SPACE_FILES) >= 10, SPACES_DIR


@pytest.mark.parametrize("path", SPACE_FILES, ids=[p.stem for p in SPACE_FILES])
def test_each_gene_alone_moves_the_merge(path, probe_of):
    probe = probe_of(path)
    still = [
        gene.name
        for gene in probe.bound.genes
        if gene.choice is None and not probe.moves(probe.stepped([gene]))
    ]
    assert not still, f"{path.stem}: these genes do not move the merge: {still}"


@pytest.mark.parametrize("path", CHOICE_FILES, ids=[p.stem for p in CHOICE_FILES])
def test_each_method_choice_moves_the_merge(path, probe_of):
    """Choosing a method for a layer group (its coordinate 1.0, the group's others 0.0) from a
    baseline that chose another changes the merge (spaces with ``method_choice`` only)."""
    probe = probe_of(path)
    genes = [gene for gene in probe.bound.genes if gene.choice is not None]
    still = []
    for gene in genes:
        start, genome = probe.chosen(gene)
        if not probe.moves(genome, start):
            still.append(gene.name)
    assert not still, f"{path.stem}: choosing these methods does not move the merge: {still}"


@pytest.mark.parametrize("path", SPACE_FILES, ids=[p.stem for p in SPACE_FILES])
def test_the_sources_genes_together_move_the_merge(path, probe_of):
    """Stepping every source's gene of one parameter, kind and layer group alike is a direction
    of the search too; a merge normalized by the sum of the weights ignores it."""
    probe = probe_of(path)
    together: dict[tuple, list[Gene]] = {}
    for gene in probe.bound.genes:
        if gene.source is not None:
            together.setdefault((gene.parameter, gene.kind, gene.group), []).append(gene)
    still = [
        f"{parameter}/{kind}/{group}"
        for (parameter, kind, group), genes in together.items()
        if len(genes) > 1 and not probe.moves(probe.stepped(genes))
    ]
    assert not still, f"{path.stem}: stepping all sources alike does not move the merge: {still}"


WEIGHT_SPACES = [p for p in SPACE_FILES if "weight" in load_space(p).parameters]


@pytest.mark.parametrize("path", WEIGHT_SPACES, ids=[p.stem for p in WEIGHT_SPACES])
def test_the_merge_is_continuous_at_weight_zero(path, probe_of):
    """From weight 0, a step of 2h moves the merge about twice as far as a step of h (within
    25%: exactly twice for the linear merges, to first order for smooth ones such as
    multislerp), rather than jumping as soon as the weight leaves 0 (a ratio near 1)."""
    probe = probe_of(path)
    genes = [g for g in probe.bound.genes if g.parameter == "weight" and g.searched.bounds[0] == 0]
    if not genes:
        pytest.skip(f"{path.stem} searches no weight from 0")
    broken = []
    for gene in genes:
        index = probe.bound.genes.index(gene)
        genomes = []
        for unit in (0.0, SMALL, 2 * SMALL):
            genome = probe.reference.copy()
            genome[index] = unit
            genomes.append(genome)
        plans = [probe.plan(genome) for genome in genomes]
        at_zero = {job.name: job for job in plans[0].jobs}
        # The first tensor the gene governs (the merge is per tensor, so one tells).
        job = next(job for job in plans[2].jobs if job != at_zero[job.name])
        zero, one, two = (probe.merge(plan, plan.job(job.name)) for plan in plans)
        ratio = float((two - zero).abs().max()) / max(float((one - zero).abs().max()), 1e-30)
        if not moved(zero, two) or not 1.5 <= ratio <= 2.5:
            broken.append(f"{gene.name} ({job.name}: ratio {ratio:.2f})")
    assert not broken, f"{path.stem}: not continuous in the weight near 0: {broken}"
