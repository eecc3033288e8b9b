"""Parity with mergekit 0.1.5, used as an oracle.

The same mergekit YAML is merged by evomerge (``evomerge merge``) and by mergekit (in process,
``mergekit.merge.run_merge``); the two checkpoints must hold the same tensor names and shapes,
and agree to 1e-5 on every tensor (the families are float32). In the other direction, native
evomerge recipes are written out with ``evomerge recipe to-mergekit`` and merged by mergekit,
and mergekit's output must equal ``evomerge merge`` of the native recipe.

mergekit treats relative model paths as Hugging Face hub ids, so every config names its models
by absolute path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from evomerge.cli import main as evomerge_main
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.mergekit_compat import recipe_to_mergekit
from evomerge.merge.recipe import parse_recipe
from evomerge.util import load_yaml
from tests.helpers import run_mergekit

pytest.importorskip("mergekit.merge")

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[1]

Models = dict[str, str]
ConfigBuilder = Callable[[Models], "dict[str, Any] | str"]  # a config, or a YAML file's text


# --- running both tools and comparing their checkpoints -------------------------------------


def paths_of(family: dict[str, Path]) -> Models:
    return {name: str(path.resolve()) for name, path in family.items()}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_evomerge(config_file: Path, out: Path) -> Path:
    assert evomerge_main(["merge", str(config_file), str(out), "--quiet"]) == 0
    return out


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in ``folder``."""
    shards = sorted(folder.glob("*.safetensors"))
    assert shards, f"no safetensors in {folder}: {sorted(p.name for p in folder.iterdir())}"
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                assert name not in state, f"{name} is in two shards of {folder}"
                state[name] = handle.get_tensor(name)
    return state


def assert_same_checkpoint(ours: Path, theirs: Path, atol: float = ATOL) -> dict[str, torch.Tensor]:
    """Same names, shapes and dtypes; max |a - b| <= atol for every tensor. Returns ours."""
    mine, oracle = load_state(ours), load_state(theirs)
    assert sorted(mine) == sorted(oracle), (
        f"only evomerge: {sorted(set(mine) - set(oracle))}; "
        f"only mergekit: {sorted(set(oracle) - set(mine))}"
    )
    problems = []
    for name, tensor in mine.items():
        other = oracle[name]
        if tensor.shape != other.shape or tensor.dtype != other.dtype:
            problems.append(
                f"{name}: {tensor.dtype}{list(tensor.shape)} vs {other.dtype}{list(other.shape)}"
            )
            continue
        diff = (tensor.double() - other.double()).abs().max().item() if tensor.numel() else 0.0
        if not diff <= atol:  # NaN fails too
            problems.append(f"{name}: max |diff| {diff:.3g}")
    assert not problems, "evomerge and mergekit disagree:\n" + "\n".join(problems)
    return mine


def assert_is_a_merge(merged: dict[str, torch.Tensor], family: dict[str, Path]) -> None:
    """The output is not a plain copy of any input model (so the comparison means something)."""
    for label, path in family.items():
        source = load_state(path)
        common = [n for n in merged if n in source and merged[n].shape == source[n].shape]
        assert common
        worst = max((merged[n].double() - source[n].double()).abs().max().item() for n in common)
        assert worst > 1e-4, f"the merge is a copy of {label}"


def config_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


# --- mergekit configs, fed unchanged to both tools ------------------------------------------

ATTN_MLP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def full(model: str, layers: int = 4, **parameters: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": model, "layer_range": [0, layers]}
    if parameters:
        entry["parameters"] = parameters
    return entry


def linear_gradient(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 1.0}},
            {"model": m["ft_1"], "parameters": {"weight": [0.2, 0.8]}},
            {"model": m["ft_2"], "parameters": {"weight": 0.5}},
        ],
    }


def linear_no_normalize(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 0.3}},
            {"model": m["ft_1"], "parameters": {"weight": [0.1, 0.6, 0.2]}},
            {"model": m["ft_2"], "parameters": {"weight": 0.4}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }


def linear_base_and_global_weight(m: Models) -> dict[str, Any]:
    # The base is not listed: mergekit appends it as one more input, weighted by the global weight.
    return {
        "merge_method": "linear",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 2.0}},
            {"model": m["ft_1"]},
        ],
        "parameters": {"weight": 0.5},
    }


def slerp_models(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["base"]}, {"model": m["ft_0"]}],
        "parameters": {"t": ATTN_MLP_T},
    }


def slerp_slices(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "slices": [{"sources": [full(m["base"]), full(m["ft_0"])]}],
        "parameters": {"t": ATTN_MLP_T},
    }


def slerp_base_second(m: Models) -> dict[str, Any]:
    # The base listed after the other model, and t from the slice.
    return {
        "merge_method": "slerp",
        "base_model": m["ft_1"],
        "slices": [
            {"sources": [full(m["ft_2"]), full(m["ft_1"])], "parameters": {"t": [0.9, 0.1]}}
        ],
    }


def task_arithmetic_negative(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 1.0}},
            {"model": m["ft_1"], "parameters": {"weight": -0.5}},
        ],
    }


def task_arithmetic_analogy(m: Models) -> dict[str, Any]:
    # ft_0 - ft_1 + ft_2, scaled by lambda.
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": m["base"]},
            {"model": m["ft_0"], "parameters": {"weight": 1.0}},
            {"model": m["ft_1"], "parameters": {"weight": -1.0}},
            {"model": m["ft_2"], "parameters": {"weight": 1.0}},
        ],
        "parameters": {"lambda": 0.7},
    }


def task_arithmetic_normalize(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 0.6}},
            {"model": m["ft_1"], "parameters": {"weight": [0.2, 1.0]}},
            {"model": m["ft_2"], "parameters": {"weight": -0.3}},
        ],
        "parameters": {"normalize": True, "lambda": 1.5},
    }


def ties_gradients(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 1.0, "density": [0.3, 0.7]}},
            {"model": m["ft_1"], "parameters": {"weight": -0.5, "density": [0.7, 0.3]}},
            {"model": m["ft_2"], "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
        ],
        "parameters": {"lambda": 0.9},
    }


def ties_int8_mask(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 0.8, "density": 0.3}},
            {"model": m["ft_1"], "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"int8_mask": True, "normalize": False},
    }


def breadcrumbs_fixed(method: str) -> ConfigBuilder:
    def build(m: Models) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": m["base"],
            "models": [
                {"model": m["ft_0"], "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}},
                {"model": m["ft_1"], "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
            ],
        }

    return build


def breadcrumbs_gradient(method: str) -> ConfigBuilder:
    def build(m: Models) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": m["base"],
            "models": [
                {"model": m["ft_0"], "parameters": {"weight": 0.7, "density": [0.5, 0.9]}},
                {"model": m["ft_1"], "parameters": {"weight": -0.4, "density": [0.9, 0.6, 0.8]}},
                {"model": m["ft_2"], "parameters": {"weight": 0.6}},
            ],
            "parameters": {"gamma": 0.05, "density": 0.8, "lambda": 1.2},
        }

    return build


def model_stock(sources: int, filter_wise: bool) -> ConfigBuilder:
    def build(m: Models) -> dict[str, Any]:
        return {
            "merge_method": "model_stock",
            "base_model": m["base"],
            "models": [{"model": m[f"ft_{i}"]} for i in range(sources)],
            "parameters": {"filter_wise": filter_wise},
        }

    return build


def density_one(method: str, **shared: Any) -> ConfigBuilder:
    def build(m: Models) -> dict[str, Any]:
        config: dict[str, Any] = {
            "merge_method": method,
            "base_model": m["base"],
            "models": [
                {"model": m["ft_0"], "parameters": {"weight": 0.6, "density": 1.0}},
                {"model": m["ft_1"], "parameters": {"weight": [0.2, 0.9], "density": 1.0}},
                {"model": m["ft_2"], "parameters": {"weight": -0.3, "density": 1.0}},
            ],
        }
        if shared:
            config["parameters"] = shared
        return config

    return build


def passthrough_frankenmerge(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": m["ft_0"], "layer_range": [0, 3]}]},
            {"sources": [{"model": m["ft_1"], "layer_range": [1, 4]}]},
        ],
    }


def passthrough_scaled(m: Models) -> dict[str, Any]:
    # scale only the MLPs; every other tensor falls through to no scale.
    return {
        "merge_method": "passthrough",
        "models": [
            {"model": m["ft_2"], "parameters": {"scale": [{"filter": "mlp", "value": 0.5}]}}
        ],
    }


def ties_slices(m: Models) -> dict[str, Any]:
    # Two slices with their own parameters; the second has its own base model.
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    {"model": m["base"], "layer_range": [0, 2]},
                    {
                        "model": m["ft_0"],
                        "layer_range": [0, 2],
                        "parameters": {"weight": 1.0, "density": 0.4},
                    },
                    {"model": m["ft_1"], "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                ],
                "parameters": {"density": [0.6, 0.9], "lambda": 1.3},
            },
            {
                "base_model": m["ft_2"],
                "sources": [
                    {"model": m["ft_2"], "layer_range": [2, 4]},
                    {"model": m["ft_0"], "layer_range": [2, 4], "parameters": {"weight": -0.6}},
                    {
                        "model": m["ft_1"],
                        "layer_range": [2, 4],
                        "parameters": {"weight": 0.9, "density": 0.3},
                    },
                ],
                "parameters": {"density": 0.5, "normalize": False},
            },
        ],
    }


def ties_slices_shifted(m: Models) -> dict[str, Any]:
    # Sources read different layers in one slice; gradients run over each slice.
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    {"model": m["base"], "layer_range": [1, 4]},
                    {
                        "model": m["ft_0"],
                        "layer_range": [0, 3],
                        "parameters": {"weight": [1.0, 0.2], "density": 0.5},
                    },
                    {
                        "model": m["ft_1"],
                        "layer_range": [1, 4],
                        "parameters": {"weight": 0.7, "density": [0.3, 0.8]},
                    },
                ],
            },
        ],
    }


def tied_task_arithmetic(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 0.8}},
            {"model": m["ft_1"], "parameters": {"weight": [-0.3, 0.6]}},
        ],
        "parameters": {"lambda": 1.1},
    }


def tied_slerp(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["base"]}, {"model": m["ft_1"]}],
        "parameters": {"t": [0.2, 0.8]},
    }


def filters_fall_through(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            # matches no tensor: every tensor takes the global gradient
            {
                "model": m["ft_0"],
                "parameters": {"weight": [{"filter": "no_such_tensor", "value": 9.0}]},
            },
            # only the MLPs take 0.2; everything else falls back to the global gradient
            {"model": m["ft_1"], "parameters": {"weight": [{"filter": "mlp", "value": 0.2}]}},
        ],
        "parameters": {
            "weight": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": [0.6, 0.3]}],
            "lambda": [{"filter": "no_such_tensor", "value": 5.0}],  # -> default 1
        },
    }


def filters_fall_through_slices(m: Models) -> dict[str, Any]:
    # Source level -> slice level -> config level, each a filter list that may not match.
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    full(m["base"]),
                    full(
                        m["ft_0"],
                        weight=[{"filter": "down_proj", "value": 2.0}],
                        density=[{"filter": "nothing", "value": 0.1}],
                    ),
                    full(m["ft_1"], density=[{"filter": "q_proj", "value": 0.2}]),
                ],
                "parameters": {
                    "weight": [{"filter": "mlp", "value": [0.3, 0.9]}],
                    "density": [{"filter": "layernorm", "value": 0.9}],
                },
            },
        ],
        "parameters": {
            "weight": 0.5,
            "density": [{"filter": "embed", "value": 0.6}, {"value": [0.4, 0.7]}],
        },
    }


def slerp_one_layer_slice(m: Models) -> dict[str, Any]:
    # A one-layer slice sits at t = 1; the second slice's gradient restarts at t = 0.
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    {"model": m["base"], "layer_range": [0, 1]},
                    {"model": m["ft_0"], "layer_range": [0, 1]},
                ]
            },
            {
                "sources": [
                    {"model": m["base"], "layer_range": [1, 4]},
                    {"model": m["ft_0"], "layer_range": [1, 4]},
                ],
                "parameters": {"t": [{"filter": "*", "value": [0.1, 0.6]}]},
            },
        ],
        "parameters": {"t": [0.2, 0.8]},
    }


def slerp_base_not_listed(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["ft_2"]}],
        "parameters": {"t": 0.35},
    }


def task_arithmetic_bool_gradient(m: Models) -> dict[str, Any]:
    # A gradient of booleans picks an anchor per layer instead of interpolating.
    return {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": 0.6}},
            {"model": m["ft_1"], "parameters": {"weight": 0.3}},
        ],
        "parameters": {"normalize": [False, True]},
    }


def passthrough_frankenmerge_scaled(m: Models) -> dict[str, Any]:
    # Per-source filters see the source's own layer numbers: ft_1's layer 1 is output layer 3.
    return {
        "merge_method": "passthrough",
        "slices": [
            {
                "sources": [
                    {"model": m["ft_0"], "layer_range": [0, 3], "parameters": {"scale": [1.0, 0.5]}}
                ]
            },
            {
                "sources": [
                    {
                        "model": m["ft_1"],
                        "layer_range": [1, 4],
                        "parameters": {
                            "scale": [
                                {"filter": "layers.1.", "value": -1.0},
                                {"filter": "mlp", "value": 0.5},
                            ]
                        },
                    }
                ]
            },
        ],
    }


def scientific_notation(m: Models) -> str:
    # PyYAML reads 5e-1 (no dot) as a string; mergekit turns such strings into numbers.
    return f"""merge_method: task_arithmetic
base_model: {m["base"]}
models:
  - model: {m["ft_0"]}
    parameters:
      weight: 5e-1
  - model: {m["ft_1"]}
    parameters:
      weight: [1e-1, 0.9]
parameters:
  lambda: 2e0
"""


def layer_filter_on_shared_parameter(m: Models) -> dict[str, Any]:
    # A filter naming one layer, on a parameter that is the same for every input (slerp's t).
    return {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["base"]}, {"model": m["ft_0"]}],
        "parameters": {"t": [{"filter": "layers.2.", "value": 0.9}, {"value": 0.2}]},
    }


CASES: dict[str, tuple[str, ConfigBuilder]] = {
    "linear-gradient": ("family", linear_gradient),
    "linear-no-normalize": ("family", linear_no_normalize),
    "linear-base-global-weight": ("family", linear_base_and_global_weight),
    "slerp-models": ("family", slerp_models),
    "slerp-slices": ("family", slerp_slices),
    "slerp-base-second": ("family", slerp_base_second),
    "slerp-base-not-listed": ("family", slerp_base_not_listed),
    "slerp-one-layer-slice": ("family", slerp_one_layer_slice),
    "task_arithmetic-negative": ("family", task_arithmetic_negative),
    "task_arithmetic-analogy-lambda": ("family", task_arithmetic_analogy),
    "task_arithmetic-normalize": ("family", task_arithmetic_normalize),
    "task_arithmetic-bool-gradient": ("family", task_arithmetic_bool_gradient),
    "ties-gradients": ("family", ties_gradients),
    "ties-int8_mask": ("family", ties_int8_mask),
    "breadcrumbs": ("family", breadcrumbs_fixed("breadcrumbs")),
    "breadcrumbs_ties": ("family", breadcrumbs_fixed("breadcrumbs_ties")),
    "breadcrumbs-density-gradient": ("family", breadcrumbs_gradient("breadcrumbs")),
    "breadcrumbs_ties-density-gradient": ("family", breadcrumbs_gradient("breadcrumbs_ties")),
    "model_stock-2": ("family", model_stock(2, False)),
    "model_stock-2-filter_wise": ("family", model_stock(2, True)),
    "model_stock-3": ("family", model_stock(3, False)),
    "model_stock-3-filter_wise": ("family", model_stock(3, True)),
    "dare_linear-density1": ("family", density_one("dare_linear")),
    "dare_linear-density1-no-rescale": ("family", density_one("dare_linear", rescale=False)),
    "dare_ties-density1": ("family", density_one("dare_ties", **{"lambda": 0.8})),
    "dare_ties-density1-no-rescale": ("family", density_one("dare_ties", rescale=False)),
    "della-density1": ("family", density_one("della", epsilon=0.1)),
    "della_linear-density1": ("family", density_one("della_linear", epsilon=0.1, rescale=False)),
    "passthrough-frankenmerge": ("family", passthrough_frankenmerge),
    "passthrough-frankenmerge-scaled": ("family", passthrough_frankenmerge_scaled),
    "passthrough-scale-filter": ("family", passthrough_scaled),
    "ties-slices-slice-base": ("family", ties_slices),
    "ties-slices-shifted-layers": ("family", ties_slices_shifted),
    "tied-task_arithmetic": ("tied_family", tied_task_arithmetic),
    "tied-slerp": ("tied_family", tied_slerp),
    "filters-fall-through": ("family", filters_fall_through),
    "filters-fall-through-slices": ("family", filters_fall_through_slices),
    "layer-filter-on-shared-parameter": ("family", layer_filter_on_shared_parameter),
    "scientific-notation-strings": ("family", scientific_notation),
}

# --- mergekit configs of nuslerp, multislerp, karcher and nearswap ---------------------------


def nuslerp_base_gradients(m: Models) -> dict[str, Any]:
    # Task vectors slerped as whole flat tensors; t = w1 / (w0 + w1) per layer and per filter.
    return {
        "merge_method": "nuslerp",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": [0.2, 0.8]}},
            {
                "model": m["ft_1"],
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.3}]},
            },
        ],
    }


def nuslerp_no_base_row_wise(m: Models) -> dict[str, Any]:
    # The weights themselves, column by column (row_wise transposes before slerping rows).
    return {
        "merge_method": "nuslerp",
        "models": [
            {"model": m["ft_1"], "parameters": {"weight": 1.0}},
            {"model": m["ft_2"], "parameters": {"weight": [0.5, 2.0, 1.0]}},
        ],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    }


def nuslerp_slices_rows(m: Models) -> dict[str, Any]:
    # slices: form with the base listed, row by row; weights summing to 0 on the MLPs (t = 0.5).
    return {
        "merge_method": "nuslerp",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [
                    full(m["base"]),
                    full(m["ft_0"], weight=[{"filter": "mlp", "value": 1.0}, {"value": 0.4}]),
                    full(m["ft_2"], weight=[{"filter": "mlp", "value": -1.0}, {"value": 0.9}]),
                ],
                "parameters": {"nuslerp_flatten": False},
            }
        ],
    }


def multislerp_base_three(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "multislerp",
        "base_model": m["base"],
        "models": [
            {"model": m["ft_0"], "parameters": {"weight": [0.2, 0.9]}},
            {
                "model": m["ft_1"],
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.1}, {"value": 0.5}]},
            },
            {"model": m["ft_2"], "parameters": {"weight": 0.3}},
        ],
    }


def multislerp_no_base_slices(m: Models) -> dict[str, Any]:
    # No base: the weights themselves; weights not normalized, eps from the config.
    return {
        "merge_method": "multislerp",
        "slices": [
            {
                "sources": [
                    {"model": m["ft_0"], "layer_range": [0, 3], "parameters": {"weight": 0.4}},
                    {
                        "model": m["ft_2"],
                        "layer_range": [1, 4],
                        "parameters": {"weight": [0.8, 0.1]},
                    },
                ],
            }
        ],
        "parameters": {"normalize_weights": False, "eps": 1e-7},
    }


def karcher_three(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "karcher",
        "models": [{"model": m["ft_0"]}, {"model": m["ft_1"]}, {"model": m["ft_2"]}],
        "parameters": {
            "max_iter": [{"filter": "mlp", "value": 2}, {"value": 10}],
            "tol": [{"filter": "self_attn", "value": 1e-7}, {"value": 1e-5}],
        },
    }


def karcher_base_appended(m: Models) -> dict[str, Any]:
    # karcher ignores the base as such: the models: form appends it as one more input.
    return {
        "merge_method": "karcher",
        "base_model": m["base"],
        "models": [{"model": m["ft_0"]}, {"model": m["ft_2"]}],
    }


def karcher_slices(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "karcher",
        "slices": [
            {
                "sources": [
                    {"model": m["ft_1"], "layer_range": [0, 2]},
                    {"model": m["ft_2"], "layer_range": [2, 4]},
                ],
                "parameters": {"max_iter": 3},
            },
            {"sources": [full(m["ft_0"]), full(m["base"])], "parameters": {"tol": 1e-6}},
        ],
    }


def nearswap_models(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "nearswap",
        "base_model": m["base"],
        "models": [{"model": m["ft_1"]}],
        "parameters": {"t": 0.02},
    }


def nearswap_slices_gradient(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "nearswap",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [full(m["ft_2"]), full(m["base"])],
                "parameters": {
                    "t": [{"filter": "self_attn", "value": [0.001, 0.05]}, {"value": 0.03}]
                },
            }
        ],
    }


CASES.update(
    {
        "nuslerp-base-gradients": ("family", nuslerp_base_gradients),
        "nuslerp-no-base-row_wise": ("family", nuslerp_no_base_row_wise),
        "nuslerp-slices-rows-zero-sum": ("family", nuslerp_slices_rows),
        "multislerp-base-three": ("family", multislerp_base_three),
        "multislerp-no-base-slices": ("family", multislerp_no_base_slices),
        "karcher-three-filters": ("family", karcher_three),
        "karcher-base-appended": ("family", karcher_base_appended),
        "karcher-slices": ("family", karcher_slices),
        "nearswap-models": ("family", nearswap_models),
        "nearswap-slices-gradient": ("family", nearswap_slices_gradient),
        "tied-nuslerp": ("tied_family", nuslerp_base_gradients),
    }
)

# --- mergekit configs of sce, ram, ramplus_tl and arcee_fusion ------------------------------


def sce_gradients(m: Models) -> dict[str, Any]:
    # select_topk: a per-layer gradient on the MLPs, a fixed share elsewhere; int8_mask changes
    # mergekit's mask dtype only.
    return {
        "merge_method": "sce",
        "base_model": m["base"],
        "models": [
            {"model": m["base"]},
            {"model": m["ft_0"]},
            {"model": m["ft_1"]},
            {"model": m["ft_2"]},
        ],
        "parameters": {
            "select_topk": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.5}],
            "int8_mask": True,
        },
    }


def sce_slices(m: Models) -> dict[str, Any]:
    # Two slices: the first keeps every entry (select_topk 1, the default), the second
    # selects by a gradient set on the slice; the second slice has its own base model.
    return {
        "merge_method": "sce",
        "base_model": m["base"],
        "slices": [
            {"sources": [full(m["base"], 2), full(m["ft_0"], 2), full(m["ft_1"], 2)]},
            {
                "base_model": m["ft_2"],
                "sources": [
                    {"model": m["ft_2"], "layer_range": [2, 4]},
                    {"model": m["ft_0"], "layer_range": [2, 4]},
                    {"model": m["ft_1"], "layer_range": [2, 4]},
                ],
                "parameters": {
                    "select_topk": [{"filter": "self_attn", "value": [0.1, 0.6]}, {"value": 0.3}]
                },
            },
        ],
        "parameters": {"select_topk": 1.0},
    }


def ram_thresholds(m: Models) -> dict[str, Any]:
    # The toy task vectors' entries are about 0.014 in size: epsilon near that leaves entries
    # set in none, one (unique) and several (overlap) of the sources.
    return {
        "merge_method": "ram",
        "base_model": m["base"],
        "models": [{"model": m["ft_0"]}, {"model": m["ft_1"]}, {"model": m["ft_2"]}],
        "parameters": {"epsilon": [{"filter": "mlp", "value": [0.01, 0.03]}, {"value": 0.02}]},
    }


def ram_slices(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "ram",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [full(m["base"]), full(m["ft_0"]), full(m["ft_2"])],
                "parameters": {"epsilon": [0.005, 0.025]},
            }
        ],
    }


def ram_default_epsilon(m: Models) -> dict[str, Any]:
    # The default epsilon (1e-5): almost every entry is set in both sources.
    return {
        "merge_method": "ram",
        "base_model": m["base"],
        "models": [{"model": m["ft_1"]}, {"model": m["ft_2"]}],
    }


def ramplus_gradients(m: Models) -> dict[str, Any]:
    return {
        "merge_method": "ramplus_tl",
        "base_model": m["base"],
        "models": [
            {"model": m["base"]},
            {"model": m["ft_0"]},
            {"model": m["ft_1"]},
            {"model": m["ft_2"]},
        ],
        "parameters": {
            "epsilon": [{"filter": "mlp", "value": [0.01, 0.03]}, {"value": 0.02}],
            "r": [{"filter": "self_attn", "value": [0.5, 2.0]}, {"value": 0.3}],
            "alpha": [{"filter": "mlp", "value": 0.5}, {"value": [0.1, 3.0]}],
        },
    }


def ramplus_slices(m: Models) -> dict[str, Any]:
    # Defaults for r and alpha; epsilon from the slice, with a filter.
    return {
        "merge_method": "ramplus_tl",
        "base_model": m["base"],
        "slices": [
            {
                "sources": [full(m["base"]), full(m["ft_1"]), full(m["ft_2"])],
                "parameters": {"epsilon": [{"filter": "mlp", "value": 0.03}, {"value": 0.015}]},
            }
        ],
    }


def arcee_fusion_models(base: str, source: str) -> ConfigBuilder:
    def build(m: Models) -> dict[str, Any]:
        return {
            "merge_method": "arcee_fusion",
            "base_model": m[base],
            "models": [{"model": m[base]}, {"model": m[source]}],
        }

    return build


def arcee_fusion_slices(m: Models) -> dict[str, Any]:
    # Each slice fuses another model into its own base, with shifted layers in the second.
    return {
        "merge_method": "arcee_fusion",
        "base_model": m["base"],
        "slices": [
            {"sources": [full(m["base"], 2), full(m["ft_0"], 2)]},
            {
                "base_model": m["ft_1"],
                "sources": [
                    {"model": m["ft_1"], "layer_range": [2, 4]},
                    {"model": m["ft_2"], "layer_range": [1, 3]},
                ],
            },
        ],
    }


CASES.update(
    {
        "sce-select_topk-filters": ("family", sce_gradients),
        "sce-slices-slice-base": ("family", sce_slices),
        "ram-epsilon-filters": ("family", ram_thresholds),
        "ram-slices-gradient": ("family", ram_slices),
        "ram-default-epsilon": ("family", ram_default_epsilon),
        "ramplus_tl-gradients-filters": ("family", ramplus_gradients),
        "ramplus_tl-slices-defaults": ("family", ramplus_slices),
        "arcee_fusion": ("family", arcee_fusion_models("base", "ft_0")),
        "arcee_fusion-other-base": ("family", arcee_fusion_models("ft_2", "ft_1")),
        "arcee_fusion-slices": ("family", arcee_fusion_slices),
    }
)

COPIES = {"passthrough-frankenmerge"}  # outputs that are layer copies by design


def _params() -> list[Any]:
    return [pytest.param(case_id, id=case_id) for case_id in CASES]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity")


_MERGED: dict[str, tuple[Path, Path]] = {}


def merged_pair(case_id: str, request: pytest.FixtureRequest, work: Path) -> tuple[Path, Path]:
    """(evomerge output, mergekit output) of one case, merged once per module."""
    if case_id in _MERGED and all(p.exists() for p in _MERGED[case_id]):
        return _MERGED[case_id]
    family_name, build = CASES[case_id]
    built = build(paths_of(request.getfixturevalue(family_name)))
    folder = work / case_id
    folder.mkdir()
    config_file = folder / "config.yaml"
    if isinstance(built, str):
        config_file.write_text(built)
        config = yaml.safe_load(built)
    else:
        config = built
        write_yaml(config_file, config)
    _plan, kind = plan_from_file(config_file)
    assert kind == "mergekit"
    theirs = run_mergekit(config, folder / "mergekit")
    ours = run_evomerge(config_file, folder / "evomerge")
    _MERGED[case_id] = (ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("case_id", _params())
def test_mergekit_config_matches_mergekit(
    case_id: str, request: pytest.FixtureRequest, work: Path
) -> None:
    ours, theirs = merged_pair(case_id, request, work)
    merged = assert_same_checkpoint(ours, theirs)
    assert config_json(ours)["num_hidden_layers"] == config_json(theirs)["num_hidden_layers"]
    if case_id not in COPIES:
        assert_is_a_merge(merged, request.getfixturevalue(CASES[case_id][0]))


def test_frankenmerge_stacks_six_layers(
    request: pytest.FixtureRequest, work: Path, family: dict[str, Path]
) -> None:
    ours, theirs = merged_pair("passthrough-frankenmerge", request, work)
    assert config_json(ours)["num_hidden_layers"] == 6
    assert config_json(theirs)["num_hidden_layers"] == 6
    merged = load_state(ours)
    layers = {int(n.split(".")[2]) for n in merged if n.startswith("model.layers.")}
    assert layers == set(range(6))
    ft_0, ft_1 = load_state(family["ft_0"]), load_state(family["ft_1"])
    name = "model.layers.{}.mlp.down_proj.weight"
    for out_layer, (source, in_layer) in enumerate(
        [(ft_0, 0), (ft_0, 1), (ft_0, 2), (ft_1, 1), (ft_1, 2), (ft_1, 3)]
    ):
        assert torch.equal(merged[name.format(out_layer)], source[name.format(in_layer)])


def test_tied_embeddings_write_no_lm_head(
    request: pytest.FixtureRequest, work: Path, tied_family: dict[str, Path]
) -> None:
    assert "lm_head.weight" not in load_state(tied_family["base"])
    for case_id in ("tied-task_arithmetic", "tied-slerp"):
        ours, theirs = merged_pair(case_id, request, work)
        assert "lm_head.weight" not in load_state(ours)
        assert "lm_head.weight" not in load_state(theirs)
        assert config_json(ours)["tie_word_embeddings"] is True
        assert "model.embed_tokens.weight" in load_state(ours)


# --- native recipes written out as mergekit configs -----------------------------------------


def native_slerp(m: Models) -> dict[str, Any]:
    # 'kind: norm' first, so that the attention filters cannot catch post_attention_layernorm.
    return {
        "method": "slerp",
        "base": m["base"],
        "sources": [{"model": m["ft_0"]}],
        "parameters": {
            "t": [
                {"kind": "norm", "value": 0.4},
                {"kind": "attention", "value": [0.0, 1.0]},
                {"kind": "mlp", "value": [1.0, 0.5, 0.2]},
                {"value": 0.3},
            ]
        },
    }


def native_ties_weighted(m: Models) -> dict[str, Any]:
    return {
        "method": "ties",
        "base": m["base"],
        "sources": [
            {
                "model": m["ft_0"],
                "parameters": {"weight": [{"kind": "mlp", "value": [0.4, 1.0]}], "density": 0.5},
            },
            {"model": m["ft_1"], "parameters": {"weight": -0.5, "density": [0.3, 0.8]}},
            {"model": m["ft_2"], "parameters": {"weight": 0.8}},
        ],
        "parameters": {"weight": 0.7, "density": 0.6, "weighted_election": True, "lambda": 1.2},
    }


def native_ties_equal(m: Models) -> dict[str, Any]:
    # Equal positive weights: the paper's election and mergekit's agree.
    return {
        "method": "ties",
        "base": m["base"],
        "sources": [
            {"model": m["ft_0"], "parameters": {"density": [{"kind": "mlp", "value": [0.2, 0.9]}]}},
            {"model": m["ft_1"], "parameters": {"density": 0.5}},
        ],
        "parameters": {"weight": 0.5, "density": 0.7},
    }


def native_task_arithmetic(m: Models) -> dict[str, Any]:
    return {
        "method": "task_arithmetic",
        "base": m["base"],
        "sources": [
            {"model": m["ft_0"], "parameters": {"weight": 1.0}},
            {"model": m["ft_1"], "parameters": {"weight": -1.0}},
            {
                "model": m["ft_2"],
                "parameters": {
                    "weight": [
                        {"filter": "down_proj", "value": [0.5, 1.5]},
                        {"kind": "embedding", "value": 0.2},
                        {"value": 1.0},
                    ]
                },
            },
        ],
        "parameters": {"lambda": 0.9},
    }


def native_linear(m: Models) -> dict[str, Any]:
    return {
        "method": "linear",
        "sources": [
            {
                "model": m["ft_0"],
                "parameters": {
                    "weight": [
                        {"kind": "embedding", "value": 0.1},
                        {"kind": "mlp", "value": [0.2, 0.8]},
                    ]
                },
            },
            {"model": m["ft_1"], "parameters": {"weight": 1.0}},
        ],
        "parameters": {"weight": 0.5, "normalize": False},
    }


def native_model_stock(m: Models) -> dict[str, Any]:
    return {
        "method": "model_stock",
        "base": m["base"],
        "sources": [{"model": m["ft_0"]}, {"model": m["ft_1"]}, {"model": m["ft_2"]}],
        "parameters": {"filter_wise": True},
    }


def native_dare_linear(m: Models) -> dict[str, Any]:
    return {
        "method": "dare_linear",
        "base": m["base"],
        "sources": [
            {"model": m["ft_0"], "parameters": {"weight": [0.3, 0.9]}},
            {"model": m["ft_1"], "parameters": {"weight": [{"kind": "mlp", "value": 0.4}]}},
        ],
        "parameters": {"weight": 0.6, "density": 1.0},
    }


def native_passthrough(m: Models) -> dict[str, Any]:
    return {
        "method": "passthrough",
        "sources": [
            {
                "model": m["ft_2"],
                "parameters": {
                    "scale": [{"kind": "mlp", "value": [0.5, 1.5]}, {"kind": "norm", "value": -1.0}]
                },
            }
        ],
    }


def native_slerp_attention_first(m: Models) -> dict[str, Any]:
    # The README's order: attention, then mlp, then a default.
    return {
        "method": "slerp",
        "base": m["base"],
        "sources": [{"model": m["ft_0"]}],
        "parameters": {
            "t": [
                {"kind": "attention", "value": [0.0, 1.0]},
                {"kind": "mlp", "value": [1.0, 0.0]},
                {"value": 0.5},
            ]
        },
    }


def native_linear_with_base(m: Models) -> dict[str, Any]:
    # linear takes no base tensors; the base only supplies config and tokenizer.
    return {
        "method": "linear",
        "base": m["base"],
        "sources": [
            {"model": m["ft_0"], "parameters": {"weight": 0.3}},
            {"model": m["ft_1"], "parameters": {"weight": 0.7}},
        ],
    }


NATIVE: dict[str, tuple[Callable[[Models], dict[str, Any]], bool]] = {
    # name: (recipe builder, model paths relative to the recipe file)
    "slerp-kinds": (native_slerp, False),
    "ties-weighted-election": (native_ties_weighted, False),
    "ties-equal-weights-relative-paths": (native_ties_equal, True),
    "task_arithmetic-analogy-filters": (native_task_arithmetic, False),
    "linear-kinds": (native_linear, True),
    "model_stock-filter_wise": (native_model_stock, False),
    "dare_linear-density1": (native_dare_linear, False),
    "passthrough-scale-kinds": (native_passthrough, False),
    "slerp-kind-attention-first": (native_slerp_attention_first, False),
    "linear-with-base": (native_linear_with_base, False),
}

# --- native recipes of nuslerp, multislerp, karcher and nearswap -----------------------------


def native_nuslerp(m: Models) -> dict[str, Any]:
    return {
        "method": "nuslerp",
        "base": m["base"],
        "sources": [
            {"model": m["ft_0"], "parameters": {"weight": [{"kind": "mlp", "value": [0.2, 0.8]}]}},
            {"model": m["ft_1"], "parameters": {"weight": 0.6}},
        ],
        "parameters": {"weight": 0.5, "nuslerp_flatten": False},
    }


def native_nuslerp_no_base(m: Models) -> dict[str, Any]:
    return {
        "method": "nuslerp",
        "sources": [
            {"model": m["ft_0"], "parameters": {"weight": 0.3}},
            {"model": m["ft_2"], "parameters": {"weight": 0.7}},
        ],
    }


def native_multislerp(m: Models) -> dict[str, Any]:
    return {
        "method": "multislerp",
        "base": m["base"],
        "sources": [
            {"model": m["ft_0"], "parameters": {"weight": [0.1, 0.9]}},
            {"model": m["ft_1"], "parameters": {"weight": [{"kind": "attention", "value": 0.2}]}},
            {"model": m["ft_2"]},
        ],
        "parameters": {"weight": 0.4},
    }


def native_karcher(m: Models) -> dict[str, Any]:
    return {
        "method": "karcher",
        "sources": [{"model": m["ft_0"]}, {"model": m["ft_1"]}, {"model": m["ft_2"]}],
        "parameters": {"max_iter": [{"kind": "mlp", "value": 4}, {"value": 20}], "tol": 1e-6},
    }


def native_nearswap(m: Models) -> dict[str, Any]:
    return {
        "method": "nearswap",
        "base": m["base"],
        "sources": [{"model": m["ft_0"]}],
        "parameters": {"t": [{"kind": "attention", "value": [0.005, 0.04]}, {"value": 0.01}]},
    }


NATIVE.update(
    {
        "nuslerp-kinds": (native_nuslerp, False),
        "nuslerp-no-base-relative-paths": (native_nuslerp_no_base, True),
        "multislerp-kinds": (native_multislerp, False),
        "karcher-kinds": (native_karcher, False),
        "nearswap-kinds": (native_nearswap, False),
    }
)

# --- native recipes of sce, ram, ramplus_tl and arcee_fusion ---------------------------------


def native_sce(m: Models) -> dict[str, Any]:
    return {
        "method": "sce",
        "base": m["base"],
        "sources": [{"model": m["ft_0"]}, {"model": m["ft_1"]}, {"model": m["ft_2"]}],
        "parameters": {
            "select_topk": [
                {"kind": "mlp", "value": [0.3, 0.8]},
                {"filter": "q_proj", "value": 0.1},
                {"value": 0.6},
            ]
        },
    }


def native_ram(m: Models) -> dict[str, Any]:
    return {
        "method": "ram",
        "base": m["base"],
        "sources": [{"model": m["ft_0"]}, {"model": m["ft_1"]}, {"model": m["ft_2"]}],
        "parameters": {"epsilon": [{"kind": "attention", "value": [0.01, 0.03]}, {"value": 0.02}]},
    }


def native_ramplus_tl(m: Models) -> dict[str, Any]:
    return {
        "method": "ramplus_tl",
        "base": m["base"],
        "sources": [{"model": m["ft_1"]}, {"model": m["ft_2"]}],
        "parameters": {
            "epsilon": 0.02,
            "r": [{"kind": "mlp", "value": [0.2, 1.5]}, {"value": 0.4}],
            "alpha": [0.1, 2.0],
        },
    }


def native_arcee_fusion(m: Models) -> dict[str, Any]:
    return {"method": "arcee_fusion", "base": m["base"], "sources": [{"model": m["ft_2"]}]}


NATIVE.update(
    {
        "sce-kinds": (native_sce, False),
        "ram-kinds": (native_ram, False),
        "ramplus_tl-gradients": (native_ramplus_tl, True),
        "arcee_fusion": (native_arcee_fusion, False),
    }
)


def _native_params() -> list[Any]:
    return [pytest.param(name, id=name) for name in NATIVE]


def relative_models(recipe: dict[str, Any], folder: Path) -> dict[str, Any]:
    def rel(path: str) -> str:
        return os.path.relpath(path, folder)

    recipe = dict(recipe)
    if recipe.get("base"):
        recipe["base"] = rel(recipe["base"])
    recipe["sources"] = [{**s, "model": rel(s["model"])} for s in recipe["sources"]]
    return recipe


@pytest.mark.parametrize("name", _native_params())
def test_native_recipe_exported_to_mergekit_matches(
    name: str, work: Path, family: dict[str, Path]
) -> None:
    build, relative = NATIVE[name]
    folder = work / f"native-{name}"
    folder.mkdir()
    recipe = build(paths_of(family))
    if relative:
        recipe = relative_models(recipe, folder)
        assert not Path(recipe["sources"][0]["model"]).is_absolute()
    recipe_file = write_yaml(folder / "recipe.yaml", recipe)
    exported_file = folder / "mergekit.yaml"
    assert evomerge_main(["recipe", "to-mergekit", str(recipe_file), "-o", str(exported_file)]) == 0
    exported = yaml.safe_load(exported_file.read_text())
    assert exported["merge_method"] == recipe["method"]
    listed = [entry["model"] for entry in exported["models"]]
    listed += [exported["base_model"]] if "base_model" in exported else []
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in listed), listed
    # The library call gives the same config as the command line.
    assert recipe_to_mergekit(parse_recipe(load_yaml(recipe_file)), folder) == exported
    theirs = run_mergekit(exported, folder / "mergekit")
    ours = run_evomerge(recipe_file, folder / "evomerge")
    assert plan_from_file(recipe_file)[1] == "evomerge"
    merged = assert_same_checkpoint(ours, theirs)
    assert_is_a_merge(merged, family)


def evomerge_command() -> list[str]:
    script = Path(sys.executable).parent / "evomerge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "evomerge.cli"]


def native_fisher(m: Models) -> dict[str, Any]:
    return {
        "method": "fisher",
        "sources": [
            {"model": m["ft_0"], "fisher": m["ft_0"]},
            {"model": m["ft_1"], "fisher": m["ft_1"]},
        ],
    }


def native_ties_count(m: Models) -> dict[str, Any]:
    return {
        "method": "ties",
        "base": m["base"],
        "sources": [
            {"model": m["ft_0"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": m["ft_1"], "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "parameters": {"sign_election": "count", "weighted_election": True},
    }


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        pytest.param(native_fisher, "fisher", id="fisher"),
        pytest.param(native_ties_count, "sign_election", id="ties-count-unequal-weights"),
    ],
)
def test_recipe_without_mergekit_form_is_refused(
    build: Callable[[Models], dict[str, Any]], expected: str, work: Path, family: dict[str, Path]
) -> None:
    folder = work / f"refused-{build.__name__}"
    folder.mkdir()
    recipe_file = write_yaml(folder / "recipe.yaml", build(paths_of(family)))
    output = folder / "out.yaml"
    done = subprocess.run(
        [*evomerge_command(), "recipe", "to-mergekit", str(recipe_file), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("evomerge: error: ")
    assert expected in lines[0]
    assert done.stdout == ""
    assert not output.exists()
