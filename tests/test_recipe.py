"""Recipe resolution: gradients, conditions, precedence, kinds, and canonical fingerprints."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.recipe import Condition, evaluate_setting, interpolate
from evomerge.merge.tensors import layer_index, layer_position, tensor_kind, with_layer_index
from tests.helpers import write_yaml

ATTN = "model.layers.2.self_attn.q_proj.weight"
MLP = "model.layers.1.mlp.down_proj.weight"


def test_interpolation_by_hand():
    assert interpolate([0.0, 1.0], 0.5) == pytest.approx(0.5)
    # t = 0.75 over three anchors: 1.5 anchors in, halfway between 0.8 and 0.4.
    assert interpolate([0.2, 0.8, 0.4], 0.75) == pytest.approx(0.6)
    assert interpolate([0.2, 0.8, 0.4], 1.0) == pytest.approx(0.4)
    assert interpolate(["a", "b"], 0.9) == "a"  # non-numeric anchors are picked, not mixed
    assert interpolate([], 0.3) is None


def test_layer_positions_follow_mergekit():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_position(ATTN, 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 4) == 0.0
    assert layer_position("lm_head.weight", 4) == 0.0
    assert with_layer_index(ATTN, 7) == "model.layers.7.self_attn.q_proj.weight"
    assert layer_index("model.norm.weight") is None


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.embed_tokens.weight", "embedding"),
        ("lm_head.weight", "head"),
        ("model.norm.weight", "norm"),
        ("model.layers.0.input_layernorm.weight", "norm"),
        ("model.layers.0.post_attention_layernorm.weight", "norm"),
        (ATTN, "attention"),
        (MLP, "mlp"),
        ("transformer.h.3.attn.c_attn.weight", "attention"),
        ("model.layers.0.rotary.inv_freq", "other"),
    ],
)
def test_tensor_kinds(name, kind):
    assert tensor_kind(name) == kind


def test_conditions_first_match_wins_and_fall_through():
    setting = [
        Condition(kind="attention", value=0.9),
        Condition(filter="down_proj", value=[0.0, 1.0]),
    ]
    assert evaluate_setting(setting, ATTN, 0.5) == 0.9
    assert evaluate_setting(setting, MLP, 0.25) == pytest.approx(0.25)
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", 0.25) is None
    both = [Condition(kind="mlp", filter="up_proj", value=3.0), Condition(value=1.0)]
    assert evaluate_setting(both, "model.layers.1.mlp.up_proj.weight", 0) == 3.0
    assert evaluate_setting(both, MLP, 0) == 1.0


def _recipe(family, **overrides):
    recipe = {
        "method": "ties",
        "base": str(family["base"]),
        "sources": [
            {
                "model": str(family["ft_0"]),
                "parameters": {
                    "weight": [
                        {"kind": "attention", "value": 0.9},
                        {"filter": "nothing-matches", "value": 5.0},
                    ],
                    "density": [0.1, 0.4, 0.7, 1.0],
                },
            },
            {"model": str(family["ft_1"]), "parameters": {"weight": [0.2, 0.8]}},
        ],
        "parameters": {"weight": 0.5, "density": 0.6, "lambda": 1.1},
    }
    recipe.update(overrides)
    return recipe


def test_plan_resolves_precedence_per_tensor(family, tmp_path):
    plan, kind = plan_from_file(write_yaml(tmp_path / "r.yaml", _recipe(family)))
    assert kind == "evomerge"
    attn = plan.job("model.layers.2.self_attn.q_proj.weight").per_source_dicts()
    mlp = plan.job("model.layers.3.mlp.up_proj.weight").per_source_dicts()
    embed = plan.job("model.embed_tokens.weight").per_source_dicts()
    # Source 0: its own condition for attention, the recipe-level 0.5 elsewhere.
    assert attn[0]["weight"] == 0.9 and mlp[0]["weight"] == 0.5
    # A per-layer list (4 anchors, 4 layers) gives each layer its own value.
    assert attn[0]["density"] == pytest.approx(0.7) and mlp[0]["density"] == pytest.approx(1.0)
    # Source 1: a gradient over layers; density falls back to the recipe's.
    assert attn[1]["weight"] == pytest.approx(0.2 + 0.6 * 2 / 3)
    assert mlp[1]["density"] == 0.6
    # Outside the layers a gradient takes its first anchor.
    assert embed[0]["density"] == pytest.approx(0.1) and embed[1]["weight"] == pytest.approx(0.2)
    shared = plan.job(MLP).shared_dict()
    assert shared["lambda"] == 1.1 and shared["sign_election"] == "mass"  # default filled


def test_fingerprint_is_canonical(family, tmp_path):
    first, _ = plan_from_file(write_yaml(tmp_path / "a.yaml", _recipe(family)))
    reordered = _recipe(family)
    reordered["parameters"] = dict(reversed(list(reordered["parameters"].items())))
    (tmp_path / "b.yaml").write_text(
        "# the same recipe, keys in another order\n"
        + write_yaml(tmp_path / "tmp.yaml", reordered).read_text()
    )
    second, _ = plan_from_file(tmp_path / "b.yaml")
    assert first.fingerprint() == second.fingerprint()
    assert hash(first) == hash(second) and first == second
    changed = _recipe(family)
    changed["parameters"]["lambda"] = 1.2
    third, _ = plan_from_file(write_yaml(tmp_path / "c.yaml", changed))
    assert third.fingerprint() != first.fingerprint()


def test_explicit_default_gives_the_same_plan(family, tmp_path):
    """Defaults are filled in, so spelling one out changes nothing."""
    plain, _ = plan_from_file(write_yaml(tmp_path / "a.yaml", _recipe(family)))
    spelled = _recipe(family)
    spelled["parameters"]["normalize"] = True
    explicit, _ = plan_from_file(write_yaml(tmp_path / "b.yaml", spelled))
    assert plain.fingerprint() == explicit.fingerprint()


def test_shared_parameter_on_a_source_is_refused(family, tmp_path):
    recipe = _recipe(family)
    recipe["sources"][1]["parameters"]["lambda"] = 2.0
    with pytest.raises(ConfigError, match=r"sources\[1\]\.parameters\.lambda"):
        plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))


def test_out_of_range_gradient_names_the_layer(family, tmp_path):
    recipe = _recipe(family)
    recipe["sources"][0]["parameters"]["density"] = [0.5, 0.5, 0.5, 1.5]
    with pytest.raises(ConfigError, match=r"'density' of source 0 .*model\.layers\.3\."):
        plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))


def test_numbers_written_as_yaml_strings_are_numbers(family, tmp_path):
    """PyYAML reads 5e-1 (no decimal point) as a string; it is still a number here."""
    (tmp_path / "r.yaml").write_text(
        f"method: task_arithmetic\nbase: {family['base']}\nsources:\n"
        f"  - model: {family['ft_0']}\n    parameters: {{weight: [1e-1, 9e-1]}}\n"
        "parameters: {lambda: 2e0}\n"
    )
    plan, _ = plan_from_file(tmp_path / "r.yaml")
    job = plan.job("model.layers.3.mlp.up_proj.weight")
    assert job.shared_dict()["lambda"] == 2.0
    assert job.per_source_dicts()[0]["weight"] == pytest.approx(0.9)


def test_mergekit_slices_of_unequal_length_name_each_source_and_its_layers(family, tmp_path):
    config = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(family["ft_0"]), "layer_range": [0, 4]},
                    {"model": str(family["ft_1"]), "layer_range": [0, 2]},
                ]
            }
        ],
        "parameters": {"weight": 0.5},
    }
    with pytest.raises(ConfigError) as info:
        plan_from_file(write_yaml(tmp_path / "mk.yaml", config))
    message = str(info.value)
    assert "slices[0]: all sources must span the same number of layers" in message
    assert f"{family['ft_0']} (layers 0-3, 4 layers)" in message
    assert f"{family['ft_1']} (layers 0-1, 2 layers)" in message
