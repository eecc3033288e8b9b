"""Search spaces: genes, decode/encode, the recipes they produce, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from evomerge.checkpoint import ModelFolder, source_labels
from evomerge.cli import main
from evomerge.dataflow.space import DataflowSpace
from evomerge.errors import ConfigError
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.engine import merge_to_folder
from evomerge.merge.recipe import open_recipe_models, plan_recipe
from evomerge.merge.registry import get_method
from evomerge.space import SEARCH_SPACES_DIR, load_space, parse_space
from tests.helpers import copy_model, load_folder, write_random_fisher

ALL_READY = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
READY = [name for name in ALL_READY if not isinstance(load_space(name), DataflowSpace)]
"""The ready parameter spaces (the data-flow ones are tested in test_dataflow_space.py)."""


def _sources(space_name: str) -> list[str]:
    one = get_method(load_space(space_name).method).max_sources == 1  # slerp, nearswap
    return ["ft_1"] if one else ["ft_0", "ft_1"]


def test_every_kind_of_ready_space_exists():
    methods = ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp"]
    expected = [f"{m}_{v}" for m in methods for v in ("global", "per_layer")]
    issue_19 = ["multislerp", "sce", "tsv", "iso_c", "iso_cts", "nearswap"]
    expected += [f"{m}_per_layer" for m in issue_19]
    assert READY == sorted([*expected, "fisher_per_layer", "ties_family_choice"])
    assert sorted(set(ALL_READY) - set(READY)) == ["dfs"]


@pytest.mark.parametrize("name", READY)
def test_decode_encode_round_trip_and_the_recipe_merges(name, family, tmp_path):
    """A decoded genome is an ordinary recipe: `evomerge merge` takes it; encode inverts decode."""
    space = load_space(name).bind(ModelFolder(family["base"]), _sources(name))
    genome = np.random.default_rng(1).random(space.dimension)
    folders = [str(family[s]) for s in _sources(name)]
    fisher = None
    if "fisher" in get_method(space.method.name).aux:
        fisher = [
            str(write_random_fisher(family[s], tmp_path / f"fisher_{s}", i))
            for i, s in enumerate(_sources(name))
        ]
    recipe = space.decode(genome, str(family["base"]), folders, fisher)
    for indices, _ in space.categorical_groups():  # a method choice encodes one-hot
        genome[indices] = np.eye(len(indices))[np.argmax(genome[indices])]
    np.testing.assert_allclose(space.encode(recipe), genome, atol=1e-12)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(exclude_defaults=True)))
    plan, flavour = plan_from_file(recipe_file)
    assert flavour == "evomerge"
    assert len(load_folder(merge_to_folder(plan, tmp_path / "out"))) == len(plan.jobs)


def test_per_layer_genes_land_on_their_layers_and_kinds(family):
    """Set one gene at a time and check which tensors' weights it moves (from the plan)."""
    space = load_space("task_arithmetic_per_layer").bind(ModelFolder(family["base"]), ["a", "b"])
    assert space.dimension == 2 * (
        4 * 3 + 2
    )  # per source: 4 layers x (attn, mlp, rest) + emb, head
    folders = [str(family["ft_0"]), str(family["ft_1"])]
    models = open_recipe_models(
        space.decode(np.zeros(space.dimension), str(family["base"]), folders)
    )
    names = [gene.name for gene in space.genes]
    genome = np.zeros(space.dimension)
    genome[names.index("weight[b]/mlp/L2")] = 1.0  # weight 1.5 at the top of the bounds
    plan = plan_recipe(space.decode(genome, str(family["base"]), folders), models)
    moved = {
        job.name
        for job in plan.jobs
        if job.sources and dict(job.per_source[1]).get("weight") == pytest.approx(1.5)
    }
    assert moved == {n for n in ModelFolder(family["base"]).tensors if "layers.2.mlp." in n}
    for job in plan.jobs:
        if job.sources:
            assert dict(job.per_source[0])["weight"] == 0.0


def test_groups_smoothing_and_log_scale(family):
    base = ModelFolder(family["base"])
    data = {
        "name": "grouped",
        "method": "breadcrumbs",
        "layers": {"groups": 2},
        "parameters": {
            "weight": {"bounds": [0, 1], "scope": ["source", "group"]},
            "gamma": {"bounds": [0.001, 0.1], "scale": "log", "scope": []},
        },
        "smoothing": True,
    }
    space = parse_space(data).bind(base, ["a", "b"])
    assert [g.name for g in space.genes] == [
        "weight[a]/L0-1",
        "weight[a]/L2-3",
        "weight[b]/L0-1",
        "weight[b]/L2-3",
        "gamma",
    ]
    recipe = space.decode([0.0, 1.0, 0.5, 0.5, 0.5], str(family["base"]), ["x", "y"])
    assert recipe.sources[0].parameters["weight"] == [0.0, 1.0]  # anchors of a gradient
    assert recipe.parameters["gamma"] == pytest.approx(0.01)  # geometric middle of the bounds
    unsmoothed = parse_space({**data, "smoothing": False}).bind(base, ["a", "b"])
    recipe = unsmoothed.decode([0.0, 1.0, 0.5, 0.5, 0.5], str(family["base"]), ["x", "y"])
    assert recipe.sources[0].parameters["weight"] == [0.0, 0.0, 1.0, 1.0]  # one value per layer
    sized = parse_space({**data, "layers": {"group_size": 3}}).bind(base, ["a", "b"])
    assert [g.layers for g in sized.genes[:2]] == [(0, 1, 2), (3,)]


def test_uniform_genomes_decode_to_uniform_recipes(family):
    space = load_space("task_arithmetic_per_layer").bind(ModelFolder(family["base"]), ["a", "b"])
    genomes = space.uniform_genomes()
    assert len(genomes) == 3
    for genome, weight in zip(genomes, (0.6, 0.8, 1.0), strict=True):
        recipe = space.decode(genome, str(family["base"]), [str(family["ft_0"])] * 2)
        plan = plan_recipe(recipe, open_recipe_models(recipe))
        weights = [dict(p)["weight"] for job in plan.jobs for p in job.per_source]
        assert weights == pytest.approx([weight] * len(weights))


BAD = [
    ({"parameters": {"colour": {"bounds": [0, 1]}}}, "no parameter 'colour'"),
    ({"parameters": {"density": {"bounds": [0.0, 1.5]}}}, "bounds of 'density'"),
    ({"parameters": {"weight": {"bounds": [1, 0]}}}, "low < high"),
    ({"parameters": {"lambda": {"bounds": [0, 2], "scope": ["source"]}}}, "remove 'source'"),
    ({"parameters": {"weight": {"bounds": [0, 1], "scale": "log"}}}, "log scale"),
    ({"parameters": {"weight": {"bounds": [0, 1], "uniform": 2}}}, "outside the bounds"),
    ({"fixed": {"lambda": "big"}}, "fixed lambda"),
    ({"method": "frankenstein"}, "frankenstein"),
    ({"layers": {"groups": 2, "group_size": 2}}, "exactly one"),
    ({"surprise": 1}, "surprise"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_space_is_named(change, message):
    data = {"name": "bad", "method": "ties", "parameters": {"weight": {"bounds": [0, 1]}}, **change}
    with pytest.raises(ConfigError, match=message):
        parse_space(data)


def test_bad_binding_is_named(family):
    base = ModelFolder(family["base"])
    data = {"name": "b", "method": "ties", "parameters": {"weight": {"bounds": [0, 1]}}}
    with pytest.raises(ConfigError, match="5 layer groups but the model has 4"):
        parse_space({**data, "layers": {"groups": 5}}).bind(base, ["a"])
    with pytest.raises(ConfigError, match="group_size 9"):
        parse_space({**data, "layers": {"group_size": 9}}).bind(base, ["a"])
    with pytest.raises(ConfigError, match="at most 1 source"):
        load_space("slerp_per_layer").bind(base, ["a", "b"])


def test_kind_missing_from_the_architecture(tied_family):
    data = {
        "name": "b",
        "method": "ties",
        "kinds": ["head"],
        "parameters": {"weight": {"bounds": [0, 1]}},
    }
    with pytest.raises(ConfigError, match="kind 'head' does not occur"):
        parse_space(data).bind(ModelFolder(tied_family["base"]), ["a"])


def test_space_show_prints_the_genes(family, capsys):
    code = main(
        [
            "space",
            "show",
            "task_arithmetic_per_layer",
            "--base",
            str(family["base"]),
            "--source",
            str(family["ft_0"]),
            "--source",
            str(family["ft_1"]),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "dimension 28" in out
    assert "weight[ft_0]/attention/L0" in out and "[0, 1.5]" in out
    assert main(["space", "show", "nope", "--base", str(family["base"])]) == 1
    assert "ready spaces" in capsys.readouterr().err


def test_same_named_source_folders_each_get_their_genes(family, tmp_path, capsys):
    math_ = copy_model(family["ft_0"], tmp_path / "runs" / "math" / "final")
    code = copy_model(family["ft_1"], tmp_path / "runs" / "code" / "final")
    args = ["space", "show", "task_arithmetic_global", "--base", str(family["base"])]
    assert main([*args, "--source", str(math_), "--source", str(code)]) == 0
    out = capsys.readouterr().out
    assert "weight[math/final]" in out and "weight[code/final]" in out
    assert "dimension 2" in out and "sources math/final, code/final" in out
    labels = source_labels([math_, code])
    assert labels == ["math/final", "code/final"]
    assert source_labels([family["ft_0"], code]) == ["ft_0", "final"]
    space = load_space("task_arithmetic_global").bind(ModelFolder(family["base"]), labels)
    genome = np.array([0.2, 0.6])
    recipe = space.decode(genome, str(family["base"]), [str(math_), str(code)])
    assert [s.parameters for s in recipe.sources] == [
        {"weight": pytest.approx(0.3)},
        {"weight": pytest.approx(0.9)},
    ]
    # Encoding finds each source by its label, also in a recipe that gives none.
    unlabelled = recipe.model_copy(
        update={"sources": [s.model_copy(update={"label": None}) for s in recipe.sources]}
    )
    np.testing.assert_allclose(space.encode(unlabelled), genome)
    # A second path to the same folder is refused, naming both paths.
    again = tmp_path / "runs" / "code" / ".." / "math" / "final"
    with pytest.raises(ConfigError) as info:
        source_labels([math_, again])
    assert f"sources {math_} and {again} are the same folder" in str(info.value)


def test_genome_of_the_wrong_length_is_refused(family):
    space = load_space("ties_global").bind(ModelFolder(family["base"]), ["a", "b"])
    with pytest.raises(ConfigError, match="has 4 entries"):
        space.decode(np.zeros(3), str(family["base"]), ["x", "y"])
