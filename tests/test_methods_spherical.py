"""nuslerp, multislerp, karcher and nearswap: numbers computed by hand or with NumPy, their
properties, parameter errors, and (where mergekit is installed) mergekit's own kernels called on
the same tensors."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError, MethodError
from evomerge.merge.mergekit_compat import parse_mergekit, plan_mergekit
from evomerge.merge.registry import TensorContext, get_method, merge_tensor

F64 = torch.float64
NAME = "model.layers.1.self_attn.q_proj.weight"
CTX = TensorContext(name=NAME)
METHODS = ("nuslerp", "multislerp", "karcher", "nearswap")


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected: Any, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=0), (actual, expected)


def weights(*values: float) -> list[dict[str, Any]]:
    return [{"weight": v} for v in values]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- registry entries -----------------------------------------------------------------------


def test_registered_with_mergekit_names_and_defaults() -> None:
    expected = {
        "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
        "multislerp": {"normalize_weights": True, "eps": 1e-8},
        "karcher": {"max_iter": 10, "tol": 1e-5},
        "nearswap": {},
    }
    for name, defaults in expected.items():
        method = get_method(name)
        assert method.mergekit_name == name
        shared = {p.name: p.default for p in method.shared_params if not p.required}
        assert shared == defaults, name
    assert [p.name for p in get_method("nuslerp").per_source_params] == ["weight"]
    assert [p.name for p in get_method("multislerp").per_source_params] == ["weight"]
    assert get_method("nearswap").param("t").required
    assert get_method("nuslerp").base_optional and get_method("multislerp").base_optional
    assert get_method("nearswap").needs_base
    assert not get_method("karcher").uses_base
    assert (get_method("nuslerp").min_sources, get_method("nuslerp").max_sources) == (2, 2)
    assert (get_method("nearswap").min_sources, get_method("nearswap").max_sources) == (1, 1)


# --- nuslerp --------------------------------------------------------------------------------


def test_nuslerp_orthogonal_task_vectors_at_half() -> None:
    base = vec(1.0, -2.0, 0.5)
    a, b = vec(3.0, 0.0, 0.0), vec(0.0, 4.0, 0.0)  # orthogonal task vectors
    out = merge_tensor("nuslerp", base, [base + a, base + b], {}, weights(1.0, 1.0), CTX)
    # theta = pi/2: sin(pi/4) a + sin(pi/4) b over sin(pi/2)
    close(out, base + (a + b) * math.sin(math.pi / 4))


def test_nuslerp_t_is_second_weight_over_sum() -> None:
    a, b = vec(2.0, 0.0), vec(0.0, 1.0)
    out = merge_tensor("nuslerp", None, [a, b], {}, weights(1.0, 3.0), CTX)  # t = 0.75
    close(out, math.sin(0.25 * math.pi / 2) * a + math.sin(0.75 * math.pi / 2) * b)
    half = merge_tensor("nuslerp", None, [a, b], {}, weights(1.0, -1.0), CTX)  # sum 0 -> t=.5
    close(half, math.sin(math.pi / 4) * (a + b))
    # t = 0 and t = 1 are the endpoints
    close(merge_tensor("nuslerp", None, [a, b], {}, weights(1.0, 0.0), CTX), a)
    close(merge_tensor("nuslerp", None, [a, b], {}, weights(0.0, 2.0), CTX), b)


def test_nuslerp_colinear_falls_back_to_lerp() -> None:
    a = vec(1.0, 2.0, -1.0)
    for b in (3 * a, -0.5 * a, a):
        out = merge_tensor("nuslerp", None, [a, b], {}, weights(0.6, 0.4), CTX)
        close(out, 0.6 * a + 0.4 * b)
        assert torch.isfinite(out).all()


def _slerp_np(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    cos = float(np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1)))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


@pytest.mark.parametrize(
    ("shared", "axis"),
    [
        ({}, None),
        ({"nuslerp_flatten": False}, 1),
        ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, 0),
    ],
    ids=["flatten", "rows", "row_wise-columns"],
)
def test_nuslerp_layouts_match_numpy(shared: dict[str, Any], axis: int | None) -> None:
    base, x, y = randn(5, 7, seed=1), randn(5, 7, seed=2), randn(5, 7, seed=3)
    out = merge_tensor("nuslerp", base, [x, y], shared, weights(0.7, 0.3), CTX).numpy()
    v0, v1 = (x - base).numpy(), (y - base).numpy()
    t = 0.3
    if axis is None:
        want = _slerp_np(t, v0.ravel(), v1.ravel()).reshape(5, 7)
    elif axis == 1:  # each row (last dim) is one vector
        want = np.stack([_slerp_np(t, v0[i], v1[i]) for i in range(5)])
    else:  # each column
        want = np.stack([_slerp_np(t, v0[:, j], v1[:, j]) for j in range(7)], axis=1)
    np.testing.assert_allclose(out, base.numpy() + want, atol=1e-10, rtol=0)


def test_nuslerp_one_dimensional_tensors_in_every_layout() -> None:
    base, x, y = randn(6, seed=4), randn(6, seed=5), randn(6, seed=6)
    flat = merge_tensor("nuslerp", base, [x, y], {}, weights(1.0, 1.0), CTX)
    for shared in (
        {"nuslerp_flatten": False},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ):
        close(merge_tensor("nuslerp", base, [x, y], shared, weights(1.0, 1.0), CTX), flat)


def test_nuslerp_takes_exactly_two_sources() -> None:
    x = vec(1.0, 2.0)
    with pytest.raises(MethodError, match=rf"nuslerp.*exactly 2.*got 3.*{NAME}"):
        merge_tensor("nuslerp", None, [x, x, x], {}, weights(1, 1, 1), CTX)
    with pytest.raises(MethodError, match=r"nuslerp.*exactly 2.*got 1"):
        merge_tensor("nuslerp", x, [x], {}, weights(1), CTX)
    with pytest.raises(MethodError, match=r"nuslerp.*'weight' of source 1 is required"):
        merge_tensor("nuslerp", None, [x, x], {}, [{"weight": 1.0}, {}], CTX)
    with pytest.raises(MethodError, match=r"nuslerp_flatten.*true or false"):
        merge_tensor("nuslerp", None, [x, x], {"nuslerp_flatten": 1}, weights(1, 1), CTX)


# --- multislerp -----------------------------------------------------------------------------


def test_multislerp_one_source_is_returned() -> None:
    x = randn(3, 4, seed=7)
    close(merge_tensor("multislerp", None, [x], {}, weights(0.3), CTX), x)
    close(merge_tensor("multislerp", randn(3, 4, seed=8), [x], {}, weights(2.0), CTX), x)


def test_multislerp_two_orthogonal_unit_vectors_give_the_midpoint() -> None:
    base = vec(0.5, 0.5, 0.5)
    e1, e2 = vec(1.0, 0.0, 0.0), vec(0.0, 1.0, 0.0)
    out = merge_tensor("multislerp", base, [base + e1, base + e2], {}, weights(2.0, 2.0), CTX)
    close(out, base + (e1 + e2) / math.sqrt(2), atol=1e-7)


def _multislerp_np(vectors: list[np.ndarray], w: list[float]) -> np.ndarray:
    """Barycentric slerp written from the description: tangent space at the weighted mean."""
    w_arr = np.array(w) / sum(w)
    norms = np.array([np.linalg.norm(v) for v in vectors])
    units = np.stack([v / n for v, n in zip(vectors, norms)])
    mean = (units * w_arr[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = ((units - (units @ mean)[:, None] * mean) * w_arr[:, None]).sum(0)
    length = np.linalg.norm(tangent)
    direction = mean * math.cos(length) + tangent * (math.sin(length) / length)
    return direction * float((norms * w_arr).sum())


def test_multislerp_three_task_vectors_match_numpy() -> None:
    base = randn(4, 5, seed=9)
    xs = [randn(4, 5, seed=10 + i) for i in range(3)]
    w = [0.2, 0.5, 0.8]
    out = merge_tensor("multislerp", base, xs, {}, weights(*w), CTX)
    want = _multislerp_np([(x - base).numpy().ravel() for x in xs], w).reshape(4, 5)
    np.testing.assert_allclose(out.numpy(), base.numpy() + want, atol=1e-7, rtol=0)


def test_multislerp_unnormalized_weights_scale_the_norm() -> None:
    x, y = vec(3.0, 0.0), vec(0.0, 3.0)
    once = merge_tensor("multislerp", None, [x, y], {}, weights(0.5, 0.5), CTX)
    twice = merge_tensor(
        "multislerp", None, [x, y], {"normalize_weights": False}, weights(1.0, 1.0), CTX
    )
    close(once, vec(3.0, 3.0) / math.sqrt(2), atol=1e-7)
    # weights (1, 1): mean direction the same, tangent sum zero, norm scale doubled
    close(twice, 2 * once, atol=1e-7)


def test_multislerp_zero_mean_two_sources_is_linear_more_is_an_error() -> None:
    base = vec(1.0, 1.0, 1.0)
    a = vec(1.0, -2.0, 0.5)
    out = merge_tensor("multislerp", base, [base + a, base - a], {}, weights(1.0, 1.0), CTX)
    close(out, base)  # 0.5 a - 0.5 a
    same = merge_tensor("multislerp", base, [base, base], {}, weights(1.0, 3.0), CTX)
    close(same, base)  # both task vectors zero
    with pytest.raises(MethodError, match=rf"multislerp.*zero.*{NAME}"):
        merge_tensor("multislerp", base, [base, base, base], {}, weights(1, 1, 1), CTX)
    with pytest.raises(MethodError, match=rf"multislerp.*zero.*{NAME}"):
        merge_tensor("multislerp", None, [a, -a, 2 * a, -2 * a], {}, weights(1, 1, 1, 1), CTX)


def test_multislerp_parameter_errors() -> None:
    x, y = vec(1.0, 0.0), vec(0.0, 1.0)
    with pytest.raises(MethodError, match=rf"multislerp.*weights sum to 0.*{NAME}"):
        merge_tensor("multislerp", None, [x, y], {}, weights(1.0, -1.0), CTX)
    merge_tensor("multislerp", None, [x, y], {"normalize_weights": False}, weights(1.0, -1.0), CTX)
    with pytest.raises(MethodError, match=r"multislerp.*'eps'"):
        merge_tensor("multislerp", None, [x, y], {"eps": 0.0}, weights(1, 1), CTX)
    with pytest.raises(MethodError, match=r"multislerp.*at least 1"):
        merge_tensor("multislerp", None, [], {}, [], CTX)
    with pytest.raises(MethodError, match=r"multislerp.*'weight' of source 0 is required"):
        merge_tensor("multislerp", None, [x, y], {}, [{}, {"weight": 1.0}], CTX)


# --- karcher --------------------------------------------------------------------------------


def test_karcher_of_one_tensor_is_that_tensor() -> None:
    x = randn(3, 3, seed=20)
    close(merge_tensor("karcher", None, [x], {}, [{}], CTX), x)


def test_karcher_of_two_vectors_is_the_normalized_midpoint_times_the_mean_norm() -> None:
    a, b = vec(2.0, 0.0, 0.0), vec(0.0, 4.0, 0.0)
    out = merge_tensor("karcher", None, [a, b], {}, [{}, {}], CTX)
    close(out, 3.0 * vec(1.0, 1.0, 0.0) / math.sqrt(2), atol=1e-9)
    # the same direction twice: that direction, mean norm
    close(merge_tensor("karcher", None, [a, 3 * a], {}, [{}, {}], CTX), 2 * a)


def test_karcher_three_directions_satisfy_the_mean_condition() -> None:
    xs = [randn(10, seed=30 + i) for i in range(3)]
    out = merge_tensor("karcher", None, xs, {"max_iter": 100, "tol": 1e-12}, [{}] * 3, CTX)
    mean = out / out.norm()
    # the Karcher mean zeroes the sum of log maps: sum_i theta_i / sin theta_i (u_i - cos_i m)
    grad = torch.zeros_like(mean)
    for x in xs:
        u = x / x.norm()
        cos = torch.dot(mean, u).clamp(-1, 1)
        theta = torch.arccos(cos)
        grad += theta / torch.sin(theta) * (u - cos * mean)
    assert grad.norm() < 1e-9
    close(out.norm(), sum(x.norm() for x in xs) / 3)
    # few iterations: not yet there, but a unit direction times the same norm
    rough = merge_tensor("karcher", None, xs, {"max_iter": 0}, [{}] * 3, CTX)
    close(rough.norm(), out.norm())


def test_karcher_zero_tensors() -> None:
    zero, x = vec(0.0, 0.0), vec(3.0, 4.0)
    close(merge_tensor("karcher", None, [zero, zero], {}, [{}, {}], CTX), zero)
    # a zero input takes no part in the direction but halves the mean norm
    close(merge_tensor("karcher", None, [zero, x], {}, [{}, {}], CTX), x / 2)


def test_karcher_parameter_errors() -> None:
    x = vec(1.0, 2.0)
    with pytest.raises(MethodError, match=rf"karcher.*'max_iter'.*{NAME}"):
        merge_tensor("karcher", None, [x, x], {"max_iter": -1}, [{}, {}], CTX)
    with pytest.raises(MethodError, match=r"karcher.*'tol'"):
        merge_tensor("karcher", None, [x, x], {"tol": -1e-5}, [{}, {}], CTX)
    with pytest.raises(MethodError, match=r"karcher.*'weight'"):
        merge_tensor("karcher", None, [x, x], {}, weights(1, 1), CTX)


# --- nearswap -------------------------------------------------------------------------------


def test_nearswap_swaps_near_entries_and_interpolates_the_rest() -> None:
    a = vec(0.0, 1.0, 2.0, -1.0, 5.0, 3.0)
    b = vec(0.05, 1.1, 2.5, -3.0, 5.0, 3.2)  # |a - b| = .05, .1, .5, 2, 0, .2
    t = 0.1
    out = merge_tensor("nearswap", a, [b], {"t": t}, [{}], CTX)
    diff = (a - b).abs()
    near = diff <= t + 1e-12
    assert torch.equal(out[near], b[near])  # exactly the source's value
    w = t / diff[~near]
    close(out[~near], a[~near] + w * (b[~near] - a[~near]))


def test_nearswap_matches_numpy_and_t_zero_keeps_the_base() -> None:
    a, b = randn(8, 8, seed=40), randn(8, 8, seed=41)
    t = 0.7
    out = merge_tensor("nearswap", a, [b], {"t": t}, [{}], CTX).numpy()
    an, bn = a.numpy(), b.numpy()
    w = np.clip(t / np.maximum(np.abs(an - bn), 1e-6), 0, 1)
    np.testing.assert_allclose(out, w * bn + (1 - w) * an, atol=1e-12, rtol=0)
    close(merge_tensor("nearswap", a, [b], {"t": 0.0}, [{}], CTX), a)


def test_nearswap_parameter_errors() -> None:
    a, b = vec(1.0, 2.0), vec(1.5, 2.5)
    with pytest.raises(MethodError, match=rf"nearswap.*needs a base.*{NAME}"):
        merge_tensor("nearswap", None, [b], {"t": 0.1}, [{}], CTX)
    with pytest.raises(MethodError, match=r"nearswap.*exactly 1.*got 2"):
        merge_tensor("nearswap", a, [b, b], {"t": 0.1}, [{}, {}], CTX)
    with pytest.raises(MethodError, match=r"nearswap.*'t' is required"):
        merge_tensor("nearswap", a, [b], {}, [{}], CTX)
    with pytest.raises(MethodError, match=r"nearswap.*'t' must be in \[0, inf\]"):
        merge_tensor("nearswap", a, [b], {"t": -0.1}, [{}], CTX)


# --- every method, every dtype --------------------------------------------------------------


def _call(method: str, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    if method == "nuslerp":
        return merge_tensor(method, base, xs[:2], {}, weights(0.4, 0.6), CTX)
    if method == "multislerp":
        return merge_tensor(method, base, xs, {}, weights(0.2, 0.3, 0.5), CTX)
    if method == "karcher":
        return merge_tensor(method, None, xs, {}, [{}] * 3, CTX)
    return merge_tensor(method, base, xs[:1], {"t": 0.01}, [{}], CTX)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("method", METHODS)
def test_shape_dtype_and_finite(method: str, dtype: torch.dtype) -> None:
    base = randn(16, 8, seed=50, dtype=torch.float32)
    xs = [base + 0.02 * (i + 1) * randn(16, 8, seed=51 + i, dtype=torch.float32) for i in range(3)]
    out = _call(method, base.to(dtype), [x.to(dtype) for x in xs])
    assert out.shape == base.shape
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    assert torch.isfinite(out).all()
    reference = _call(method, base.to(dtype).double(), [x.to(dtype).double() for x in xs])
    assert (out.double() - reference).abs().max() < 1e-4  # computed in float32 at least


# --- against mergekit's own kernels ---------------------------------------------------------


def _mergekit_kernel(method: str) -> Any:
    pytest.importorskip("mergekit")
    module = importlib.import_module(f"mergekit.merge_methods.{method}")
    name = {
        "nuslerp": "nuslerp_merge_method",
        "multislerp": "multislerp",
        "karcher": "karcher_merge_method",
        "nearswap": "nearswap_merge",
    }[method]
    return getattr(module, name)


def _mergekit(
    method: str,
    base: torch.Tensor | None,
    xs: list[torch.Tensor],
    shared: dict[str, Any],
    per_source: list[dict[str, Any]] | None = None,
) -> torch.Tensor:
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    tensors = ([base] if base is not None else []) + [x.clone() for x in xs]
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    params = dict(shared)
    if per_source is not None:
        params["weight"] = PerInputValues(
            [(entry.id, p["weight"]) for entry, p in zip(group.non_base, per_source)]
        )
    return _mergekit_kernel(method).merge_group(group, **params)  # type: ignore[no-any-return]


CASES = [
    ("nuslerp", True, {}, [0.3, 0.9]),
    ("nuslerp", False, {"nuslerp_flatten": False}, [1.0, 0.2]),
    ("nuslerp", True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [0.5, -0.5]),
    ("multislerp", True, {}, [0.2, 0.9, 0.4]),
    ("multislerp", False, {"normalize_weights": False, "eps": 1e-6}, [0.6, 0.3]),
    ("karcher", False, {}, None),
    ("karcher", False, {"max_iter": 2, "tol": 1e-7}, None),
    ("nearswap", True, {"t": 0.03}, None),
]


@pytest.mark.parametrize(("method", "with_base", "shared", "w"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_same_as_mergekit_kernel(
    method: str, with_base: bool, shared: dict[str, Any], w: list[float] | None, dtype: torch.dtype
) -> None:
    base = randn(12, 6, seed=60, dtype=dtype)
    count = len(w) if w is not None else (1 if method == "nearswap" else 3)
    xs = [base + 0.02 * (i + 1) * randn(12, 6, seed=61 + i, dtype=dtype) for i in range(count)]
    per_source = weights(*w) if w is not None else [{}] * count
    ours = merge_tensor(method, base if with_base else None, xs, shared, per_source, CTX)
    theirs = _mergekit(method, base if with_base else None, xs, shared, per_source if w else None)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.allclose(ours, theirs, atol=1e-7 if dtype == torch.float32 else 1e-12, rtol=0)


# --- reading mergekit configs ---------------------------------------------------------------


def test_mergekit_slice_without_its_base_is_refused(family: dict[str, Path]) -> None:
    # mergekit: "Base input is not present in merge inputs"; an optional base must not vanish.
    m = {k: str(Path(v).resolve()) for k, v in family.items()}
    for method in ("nuslerp", "multislerp"):
        config = {
            "merge_method": method,
            "base_model": m["base"],
            "slices": [
                {
                    "sources": [
                        {"model": m["ft_0"], "layer_range": [0, 4], "parameters": {"weight": 1}},
                        {"model": m["ft_1"], "layer_range": [0, 4], "parameters": {"weight": 2}},
                    ]
                }
            ],
        }
        with pytest.raises(ConfigError, match=rf"{method}.*base_model is not among the sources"):
            plan_mergekit(parse_mergekit(config))


def test_mergekit_models_form_uses_the_base_and_karcher_counts_it(family: dict[str, Path]) -> None:
    m = {k: str(Path(v).resolve()) for k, v in family.items()}
    models = [{"model": m["ft_0"], "parameters": {"weight": 1}}, {"model": m["ft_1"]}]
    nuslerp = plan_mergekit(
        parse_mergekit(
            {
                "merge_method": "nuslerp",
                "base_model": m["base"],
                "models": models,
                "parameters": {"weight": 0.5},
            }
        )
    )
    job = nuslerp.jobs[0]
    assert job.base is not None and len(job.sources) == 2
    karcher = plan_mergekit(
        parse_mergekit(
            {
                "merge_method": "karcher",
                "base_model": m["base"],
                "models": [{"model": m["ft_0"]}, {"model": m["ft_2"]}],
            }
        )
    )
    job = karcher.jobs[0]
    assert job.base is None and len(job.sources) == 3  # the base appended as an input
    assert karcher.models[job.sources[2].model] == m["base"]
