"""The data-flow space: its genes, its constraints, and what the proposers make of it.

Every gene of every ready data-flow space moves the model (a use gene puts its layer on the path
or takes it off; a scale gene changes the scaling where its position is reached from another
model); paths hold 1 to ``max_depth`` layers; scalings apply only where a path crosses between
models; encode inverts decode; Optuna samplers give the use genes as yes/no values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evomerge.checkpoint import ModelFolder
from evomerge.cli import main
from evomerge.dataflow.space import THRESHOLD, BoundDataflowSpace, DataflowSpace
from evomerge.errors import ConfigError
from evomerge.optimize import Objective
from evomerge.space import SEARCH_SPACES_DIR, build_space_proposer, load_space, parse_space

DATAFLOW_FILES = sorted(
    p for p in SEARCH_SPACES_DIR.glob("*.yaml") if isinstance(load_space(p), DataflowSpace)
)
ONE = [Objective(metric="m")]


def _bind(zoo: dict[str, Path], space: str | dict = "dfs") -> BoundDataflowSpace:
    loaded = load_space(space) if isinstance(space, str) else parse_space(space, "test")
    bound = loaded.bind(ModelFolder(zoo["base"]), ["ft_a", "ft_b"])
    assert isinstance(bound, BoundDataflowSpace)
    return bound


def _path(bound: BoundDataflowSpace, genome: np.ndarray, zoo: dict[str, Path]) -> list:
    recipe = bound.decode(genome, str(zoo["base"]), [str(zoo["ft_a"]), str(zoo["ft_b"])])
    return [(s.model, s.layer, s.scale) for s in recipe.path]


def test_the_ready_dataflow_space_is_found():
    assert [p.stem for p in DATAFLOW_FILES] == ["dfs"]


@pytest.mark.parametrize("path", DATAFLOW_FILES, ids=[p.stem for p in DATAFLOW_FILES])
def test_each_gene_alone_moves_the_path(path, toy_zoo):
    bound = _bind(toy_zoo, str(path))
    n = bound.use_count
    # repeats x models x layers use genes; a scale gene each but ft_a's first 4 (the outer
    # model's layers that open the layout: only its own embeddings and layers precede them)
    assert n == 2 * 2 * 4 and bound.dimension == n + n - 4
    rng = np.random.default_rng(0)
    still = []
    for index, gene in enumerate(bound.genes):
        genome = rng.random(bound.dimension)
        genome[:n] *= 0.45  # few layers on the path, so max_depth does not cut the one added
        genome[rng.choice(n, 3, replace=False)] = 0.9
        if gene.role == "use":
            genome[index] = 0.2
            before = _path(bound, genome, toy_zoo)
            genome[index] = 0.8
        else:  # its layer on the path, reached from the other model's layer (or embeddings)
            genome[:n] = 0.0
            other = (
                next(
                    q
                    for q in range(gene.position - 1, -1, -1)
                    if bound.positions[q][1] != gene.model
                )
                if gene.model == bound.outer
                else None
            )
            genome[gene.position] = 1.0
            if other is not None:
                genome[other] = 1.0
            genome[index] = 0.3
            before = _path(bound, genome, toy_zoo)
            genome[index] = 0.6
        if _path(bound, genome, toy_zoo) == before:
            still.append(gene.name)
    assert not still, f"these genes do not move the path: {still}"


def test_paths_hold_one_to_max_depth_layers_and_scale_only_at_crossings(toy_zoo):
    bound = _bind(toy_zoo)
    n = bound.use_count
    genome = np.full(bound.dimension, 0.25)
    genome[1] = 0.4  # none above the threshold: the highest use gene alone (ft_a layer 1, r0)
    assert _path(bound, genome, toy_zoo) == [("ft_a", 1, 1.0)]  # no crossing: no scaling
    genome[:n] = 0.9  # every layer wanted: the 8 highest, ties to the earlier position
    genome[n - 1] = 0.95  # ... but this one ranks first (ft_b's layer 3, second repeat)
    path = _path(bound, genome, toy_zoo)
    assert len(path) == bound.max_depth == 8
    assert [(m, layer) for m, layer, _ in path] == [
        *(("ft_a", i) for i in range(4)),
        *(("ft_b", i) for i in range(3)),
        ("ft_b", 3),
    ]
    scale = bound.space.scaling.to_value(0.25)
    assert [s for _, _, s in path] == [1.0, 1.0, 1.0, 1.0, scale, 1.0, 1.0, 1.0]
    # A path that starts in another model than the outer one is scaled at its first layer.
    genome[:n] = 0.0
    genome[4 + 2] = 1.0  # ft_b layer 2, first repeat
    genome[bound.scale_genes[4 + 2]] = 1.0
    assert _path(bound, genome, toy_zoo) == [("ft_b", 2, bound.space.scaling.bounds[1])]


def test_encode_inverts_decode(toy_zoo):
    bound = _bind(toy_zoo)
    rng = np.random.default_rng(3)
    for _ in range(20):
        genome = rng.random(bound.dimension)
        recipe = bound.decode(genome, str(toy_zoo["base"]), [str(toy_zoo["ft_a"]), "b"])
        assert any(s.scale != 1.0 for s in recipe.path)
        folders = [str(toy_zoo["ft_a"]), "b"]
        again = bound.decode(bound.encode(recipe), str(toy_zoo["base"]), folders)
        assert [(s.model, s.layer) for s in again.path] == [(s.model, s.layer) for s in recipe.path]
        np.testing.assert_allclose(  # equal to float rounding of the log map
            [s.scale for s in again.path], [s.scale for s in recipe.path], rtol=1e-12
        )
    baseline = bound.uniform_baselines()[0][1]
    assert _path(bound, baseline, toy_zoo) == [("ft_a", i, 1.0) for i in range(4)]
    assert np.all(bound.start_genome()[: bound.use_count] != THRESHOLD)


def test_one_model_once_has_paths_of_at_most_its_layers(toy_zoo):
    space = {"kind": "dataflow", "name": "prune_a", "models": ["ft_a"], "repeats": 1}
    bound = _bind(toy_zoo, space)  # the default depth (8) is capped at the 4 positions
    assert bound.max_depth == 4 and bound.dimension == 4
    assert _path(bound, np.array([1, 0, 1, 1.0]), toy_zoo) == [("ft_a", i, 1.0) for i in (0, 2, 3)]


def test_one_model_repeats_its_layers_without_scale_genes(toy_zoo):
    space = {"kind": "dataflow", "name": "repeat_a", "models": ["ft_a"], "repeats": 2}
    bound = _bind(toy_zoo, space)
    assert bound.dimension == 8 and {g.role for g in bound.genes} == {"use"}
    genome = np.array([1, 1, 1, 1, 0, 0, 1, 1], dtype=float)
    assert _path(bound, genome, toy_zoo) == [("ft_a", i, 1.0) for i in (0, 1, 2, 3, 2, 3)]


@pytest.mark.parametrize("kind", ["tpe", "random", "cma"])
def test_proposers_search_the_use_genes_as_yes_no_or_thresholded(toy_zoo, kind):
    bound = _bind(toy_zoo)
    settings = {"kind": kind, "seed": 0} | ({"popsize": 4} if kind == "cma" else {})
    proposer = build_space_proposer(settings, bound, ONE)
    use = []
    for _ in range(6):
        proposal = proposer.ask()
        use.append(proposal.genome[: bound.use_count])
        proposer.tell(proposal.id, [float(len(_path(bound, proposal.genome, toy_zoo)))])
    values = np.concatenate(use)
    if kind == "cma":
        assert not set(np.unique(values)) <= {0.0, 1.0}  # numbers, thresholded by decode
        np.testing.assert_allclose(proposer.config.x0, bound.start_genome())
    else:
        assert set(np.unique(values)) == {0.0, 1.0}  # native yes/no parameters


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"models": ["sources", "nope"]}, "'nope' is not 'sources', a source label"),
        ({"models": ["sources", "ft_a"]}, "'ft_a' is listed twice"),
        ({"max_depth": 17}, "max_depth 17 exceeds the 16 positions"),
        ({"outer": "ft_c"}, "outer 'ft_c' is none of the models"),
        ({"scaling": {"bounds": [1.5, 2.0]}}, "bounds must contain 1"),
        ({"repeats": 0}, "repeats"),
        ({"models": ["study:ps"]}, "NAME:SELECTOR"),
    ],
)
def test_bad_dataflow_spaces_are_refused_with_the_field(toy_zoo, changes, match):
    with pytest.raises(ConfigError, match=match):
        _bind(toy_zoo, {"kind": "dataflow", "name": "bad", **changes})


def test_space_show_documents_size_and_shape(toy_zoo, capsys):
    args = ["--base", toy_zoo["base"], "--source", toy_zoo["ft_a"], "--source", toy_zoo["ft_b"]]
    assert main(["space", "show", "dfs", *map(str, args)]) == 0
    out = capsys.readouterr().out
    assert "dimension 28: 2 repeats x 2 models (ft_a, ft_b) x 4 layers = 16 positions" in out
    assert "paths of 1 to 8 layers" in out and "use/r1/ft_b/L3" in out
    assert "scale/r0/ft_b/L0" in out and "scale/r0/ft_a/" not in out
