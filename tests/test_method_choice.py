"""A merge method per layer: recipes with ``layer_methods``, and spaces that choose the method per
layer group (one-of-k genes; categorical parameters in Optuna)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from optuna.distributions import CategoricalDistribution

from evomerge.checkpoint import ModelFolder
from evomerge.cli import main
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.plan import MergePlan
from evomerge.merge.tensors import layer_index
from evomerge.optimize import build_proposer
from evomerge.space import BoundSpace, build_space_proposer, load_space, parse_space
from tests.helpers import load_folder, write_yaml

LAYERS = ["task_arithmetic", "ties", "dare_ties", "ties"]
ONE = [{"metric": "score"}]


def _recipe(family: dict[str, Path], method: str, **extra: Any) -> dict[str, Any]:
    """Two sources, a weight each; density for the methods that take it."""
    parameters: dict[str, Any] = {"normalize": False}
    if method != "task_arithmetic" or "layer_methods" in extra:
        parameters["density"] = 0.6
    return {
        "method": method,
        "base": str(family["base"]),
        "sources": [
            {"model": str(family["ft_0"]), "parameters": {"weight": 0.7}},
            {"model": str(family["ft_1"]), "parameters": {"weight": [0.4, 1.1]}},
        ],
        "parameters": parameters,
        "seed": 3,
        **extra,
    }


def _merge(recipe: dict[str, Any], tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    path = write_yaml(tmp_path / f"{name}.yaml", recipe)
    assert main(["merge", str(path), str(tmp_path / name), "--quiet"]) == 0
    return load_folder(tmp_path / name)


def test_layer_methods_merge_each_layer_like_its_own_method(family, tmp_path):
    mixed = _merge(_recipe(family, "ties", layer_methods=LAYERS), tmp_path, "mixed")
    oracles = {m: _merge(_recipe(family, m), tmp_path, m) for m in set(LAYERS)}
    layered = 0
    for name, tensor in mixed.items():
        layer = layer_index(name)
        method = "ties" if layer is None else LAYERS[layer]
        torch.testing.assert_close(tensor, oracles[method][name], rtol=0, atol=0, msg=name)
        layered += layer is not None
    assert layered > 0
    # The oracles differ in the layers, so the comparison above told them apart.
    name = "model.layers.2.mlp.up_proj.weight"
    assert not torch.equal(oracles["ties"][name], oracles["dare_ties"][name])


def test_plans_without_layer_methods_keep_their_canonical_text(family, tmp_path):
    plain = _plan(_recipe(family, "ties"), tmp_path, "plain")
    assert all("method" not in job for job in json.loads(plain.canonical())["jobs"])
    assert all(job.method is None for job in plain.jobs)
    same = _plan(_recipe(family, "ties", layer_methods=["ties"] * 4), tmp_path, "same")
    assert same.canonical() == plain.canonical()
    mixed = _plan(_recipe(family, "ties", layer_methods=LAYERS), tmp_path, "mixed")
    assert mixed.fingerprint() != plain.fingerprint()
    assert mixed.methods_used() == ("ties", "task_arithmetic", "dare_ties")
    assert mixed.describe_methods() == (
        "ties outside the layers; task_arithmetic in layer 0, ties in layer 1, dare_ties in "
        "layer 2 and ties in layer 3"
    )
    by_name = {job.name: job for job in mixed.jobs}
    assert by_name["model.layers.0.mlp.up_proj.weight"].method == "task_arithmetic"
    assert "density" not in by_name["model.layers.0.mlp.up_proj.weight"].per_source_dicts()[0]
    assert by_name["model.layers.1.mlp.up_proj.weight"].method is None


def _plan(recipe: dict[str, Any], tmp_path: Path, name: str) -> MergePlan:
    plan, _ = plan_from_file(write_yaml(tmp_path / f"{name}.yaml", recipe))
    return plan


@pytest.mark.parametrize(
    ("layers", "parameters", "message"),
    [
        (["ties"] * 3, {}, "lists 3 method(s) but the model has 4 layers: give exactly 4"),
        (["ties", "ties", "nope", "ties"], {}, "unknown merge method 'nope'"),
        (["ties"] * 4, {"t": 0.5}, "no method in use (task_arithmetic, ties) takes 't'"),
        (["ties", "fisher", "ties", "ties"], {}, "'fisher' needs fisher for every source"),
    ],
    ids=["length", "unknown", "unused_parameter", "aux"],
)
def test_bad_layer_methods_are_one_line_errors(
    family, tmp_path, capsys, layers, parameters, message
):
    recipe = _recipe(family, "task_arithmetic", layer_methods=layers)
    recipe["parameters"].update(parameters)
    path = write_yaml(tmp_path / "bad.yaml", recipe)
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("evomerge: error:"), err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_to_mergekit_refuses_layer_methods(family, tmp_path, capsys):
    recipe = _recipe(family, "ties", layer_methods=["ties", "ties", "dare_ties", "dare_ties"])
    path = write_yaml(tmp_path / "mixed.yaml", recipe)
    assert main(["recipe", "to-mergekit", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith(
        "mergekit merges with one method per config; this recipe uses ties in layers 0-1 and "
        "dare_ties in layers 2-3"
    )


def test_recipe_show_names_the_methods_per_layer(family, tmp_path, capsys):
    path = write_yaml(tmp_path / "mixed.yaml", _recipe(family, "ties", layer_methods=LAYERS))
    assert main(["recipe", "show", str(path)]) == 0
    assert "methods: ties outside the layers; task_arithmetic in layer 0" in capsys.readouterr().out


# -- spaces ------------------------------------------------------------------------------------

SPACE = {
    "name": "choice",
    "method": "ties",
    "method_choice": {"methods": ["ties", "dare_ties", "della"], "layers": {"groups": 2}},
    "layers": "global",
    "parameters": {
        "weight": {"bounds": [0.0, 1.5], "scope": ["source"], "uniform": [0.5, 1.0]},
        "density": {"bounds": [0.2, 0.8], "scope": []},
    },
    "fixed": {"normalize": False},
}


def _bound(family: dict[str, Path], **changes: Any) -> BoundSpace:
    return parse_space({**SPACE, **changes}).bind(ModelFolder(family["base"]), ["a", "b"])


def _folders(family: dict[str, Path]) -> tuple[str, list[str]]:
    return str(family["base"]), [str(family["ft_0"]), str(family["ft_1"])]


def test_space_genes_decode_encode_and_groups(family):
    space = _bound(family)
    names = [gene.name for gene in space.genes]
    assert names[3:] == [
        "method/L0-1=ties",
        "method/L0-1=dare_ties",
        "method/L0-1=della",
        "method/L2-3=ties",
        "method/L2-3=dare_ties",
        "method/L2-3=della",
    ]
    assert space.categorical_groups() == [
        ([3, 4, 5], ["ties", "dare_ties", "della"]),
        ([6, 7, 8], ["ties", "dare_ties", "della"]),
    ]
    base, sources = _folders(family)
    genome = np.array([0.2, 0.4, 0.5, 0.1, 0.9, 0.3, 0.6, 0.2, 0.6])
    recipe = space.decode(genome, base, sources)
    assert recipe.method == "ties"
    # argmax per group; a tie goes to the method listed first
    assert recipe.layer_methods == ["dare_ties", "dare_ties", "ties", "ties"]
    expected = genome.copy()
    expected[3:] = [0, 1, 0, 1, 0, 0]
    np.testing.assert_allclose(space.encode(recipe), expected, atol=1e-12)
    np.testing.assert_allclose(space.encode(space.decode(expected, base, sources)), expected)
    # a recipe without layer_methods encodes its method everywhere
    plain = recipe.model_copy(update={"layer_methods": None, "method": "della"})
    np.testing.assert_array_equal(space.encode(plain)[3:], [0, 0, 1, 0, 0, 1])


def test_space_baselines_one_per_method(family):
    space = _bound(family)
    baselines = space.uniform_baselines()
    assert [label for label, _ in baselines] == [
        f"uniform method={m}, weight={w}, density=0.5"
        for m in ("ties", "dare_ties", "della")
        for w in ("0.5", "1")
    ]
    base, sources = _folders(family)
    for (label, genome), method in zip(baselines, ["ties"] * 2 + ["dare_ties"] * 2 + ["della"] * 2):
        assert space.decode(genome, base, sources).layer_methods == [method] * 4, label


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "slerp"}, "must be one of method_choice.methods"),
        ({"method_choice": {"methods": ["ties"]}}, "at least 2"),
        ({"method_choice": {"methods": ["ties", "ties"]}}, "listed twice"),
        ({"method_choice": {"methods": ["ties", "nope"]}}, "unknown merge method 'nope'"),
        ({"method_choice": {"methods": ["ties", "fisher"]}}, "cannot be chosen per layer group"),
        ({"method_choice": {"methods": ["ties", "slerp"]}}, "no parameter 'normalize'"),
    ],
)
def test_bad_method_choices(changes, message):
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_space({**SPACE, **changes})


def test_tpe_proposes_one_hot_groups_and_resumes_exactly(family):
    space = _bound(family)
    settings = {"kind": "tpe", "n_startup_trials": 3, "seed": 5}
    proposer = build_space_proposer(settings, space, ONE)
    for _ in range(5):
        proposal = proposer.ask()
        for indices, _ in space.categorical_groups():
            assert sorted(proposal.genome[indices]) == [0.0, 0.0, 1.0]
        proposer.tell(proposal.id, [float(proposal.genome[:3].sum())])
    trial = proposer.study.get_trials()[0]
    assert isinstance(trial.distributions["c000"], CategoricalDistribution)
    assert isinstance(trial.distributions["c001"], CategoricalDistribution)
    assert "g0003" not in trial.distributions
    restored = build_space_proposer(settings, space, ONE, proposer.state_dict())
    for _ in range(3):
        a, b = proposer.ask(), restored.ask()
        np.testing.assert_array_equal(a.genome, b.genome)
        proposer.tell(a.id, [0.5])
        restored.tell(b.id, [0.5])


def test_restore_with_other_groups_is_refused():
    from evomerge.errors import ConfigError
    from evomerge.optimize import restore_proposer

    proposer = build_proposer({"kind": "random"}, 4, ONE, categorical=[[0, 1]])
    with pytest.raises(ConfigError, match="categorical"):
        restore_proposer({"kind": "random"}, 4, ONE, proposer.state_dict())
    with pytest.raises(ConfigError, match="disjoint"):
        build_proposer({"kind": "random"}, 4, ONE, categorical=[[0, 1], [1, 2]])


def test_cma_runs_on_a_choice_space(family):
    space = _bound(family)
    proposer = build_space_proposer({"kind": "cma", "popsize": 4, "seed": 1}, space, ONE)
    assert proposer.categorical == ((3, 4, 5), (6, 7, 8))
    base, sources = _folders(family)
    seen = set()
    for _ in range(8):
        proposal = proposer.ask()
        recipe = space.decode(proposal.genome, base, sources)
        seen.add(tuple(recipe.layer_methods or ()))
        proposer.tell(proposal.id, [float(proposal.genome[4] + proposal.genome[7])])
    assert len(seen) > 1
    restored = build_space_proposer(
        {"kind": "cma", "popsize": 4, "seed": 1}, space, ONE, proposer.state_dict()
    )
    np.testing.assert_array_equal(restored.ask().genome, proposer.ask().genome)


def test_space_show_lists_the_choice_genes(family, capsys):
    assert main(["space", "show", "ties_family_choice", "--base", str(family["base"])]) == 0
    out = capsys.readouterr().out
    assert "method/L0-1=breadcrumbs_ties  layers 0-1" in out
    assert "categorical" in out
    assert load_space("ties_family_choice").method_choice is not None
