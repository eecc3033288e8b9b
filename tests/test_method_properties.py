"""Property tests of every merge method on random small tensors of every float dtype."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge.registry import TensorContext, available_methods, get_method, merge_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GTA = [
    "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
]  # fmt: skip
ALL = sorted([*GTA, "linear", "slerp", "model_stock", "fisher", "passthrough"])
NAME = "model.layers.3.self_attn.q_proj.weight"

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
values = st.floats(-8, 8, allow_nan=False, allow_subnormal=False, width=32)
weights = st.integers(-200, 200).map(lambda i: i / 100)
densities = st.sampled_from([0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
choice = st.sampled_from

SETTINGS = settings(max_examples=25, deadline=None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    flat = draw(st.lists(values, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(flat, dtype=torch.float64).reshape(shape).to(dtype)


@st.composite
def params_for(draw: st.DrawFn, method: str, count: int) -> tuple[dict, list[dict]]:
    """Valid shared and per-source parameters for ``method`` with ``count`` sources."""
    shared: dict[str, Any] = {}
    per_source: list[dict[str, Any]] = [{} for _ in range(count)]
    if method in GTA or method == "linear":
        shared["normalize"] = draw(st.booleans())
        for params in per_source:
            params["weight"] = draw(weights)
    if method in GTA:
        shared["lambda"] = draw(weights)
        if method != "task_arithmetic":
            for params in per_source:
                params["density"] = draw(densities)
    if method.startswith("breadcrumbs"):
        for params in per_source:
            params["gamma"] = draw(choice([0.0, 0.01, 0.1, 0.5]))
    if method.startswith("della"):
        shared["rescale"] = draw(choice(["inverse_prob", "l1", "none"]))
        for params in per_source:
            params["density"] = draw(choice([0.3, 0.5, 0.7, 1.0]))
            params["epsilon"] = draw(choice([0.0, 0.1, 0.25]))
    if method.startswith("dare"):
        shared["rescale"] = draw(choice(["inverse_density", "l1", "none"]))
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        shared["sign_election"] = draw(choice(["mass", "count"]))
        shared["weighted_election"] = draw(st.booleans())
    if method == "slerp":
        shared["t"] = draw(st.floats(-0.5, 1.5))
    if method == "model_stock":
        shared["filter_wise"] = draw(st.booleans())
    if method == "fisher":
        shared["fisher_floor"] = draw(choice([1e-6, 1e-3, 1.0]))
        for params in per_source:
            params["weight"] = draw(st.integers(1, 100).map(lambda i: i / 50))
    if method == "passthrough":
        per_source[0]["scale"] = draw(st.none() | weights)
    return shared, per_source


@st.composite
def merge_cases(draw: st.DrawFn, method: str, same_sources: bool = False) -> dict[str, Any]:
    spec = get_method(method)
    dtype = draw(choice(DTYPES))
    shape = draw(shapes)
    count = draw(st.integers(spec.min_sources, spec.max_sources or 3))
    base = draw(tensors(shape, dtype))
    if same_sources:
        sources = [base.clone() for _ in range(count)]
    else:
        sources = [draw(tensors(shape, dtype)) for _ in range(count)]
    shared, per_source = draw(params_for(method, count))
    fishers = [draw(tensors(shape, dtype)).abs() for _ in range(count)]
    ctx = TensorContext(name=NAME, seed=draw(st.integers(0, 2**32)), aux={"fisher": fishers})
    return dict(base=base, sources=sources, shared=shared, per_source=per_source, ctx=ctx)


def test_every_method_is_covered() -> None:
    assert set(ALL) <= set(available_methods())


@pytest.mark.parametrize("method", ALL)
@SETTINGS
@given(data=st.data())
def test_shape_dtype_and_finiteness(method: str, data: st.DataObject) -> None:
    case = data.draw(merge_cases(method))
    out = merge_tensor(method, **case)
    assert out.shape == case["base"].shape
    assert out.dtype == compute_dtype(case["base"].dtype)
    assert out.device == case["base"].device
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
@SETTINGS
@given(data=st.data())
def test_random_methods_are_reproducible(method: str, data: st.DataObject) -> None:
    case = data.draw(merge_cases(method))
    assert torch.equal(merge_tensor(method, **case), merge_tensor(method, **case))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
@SETTINGS
@given(data=st.data())
def test_identical_sources_with_unit_weight_sum_give_the_source(
    method: str, data: st.DataObject
) -> None:
    dtype = data.draw(choice(DTYPES))
    shape = data.draw(shapes)
    base = data.draw(tensors(shape, dtype))
    source = data.draw(tensors(shape, dtype))
    raw = data.draw(st.lists(st.integers(1, 100), min_size=1, max_size=4))
    per_source = [{"weight": r / sum(raw)} for r in raw]
    shared = {"normalize": data.draw(st.booleans())}
    out = merge_tensor(method, base, [source] * len(raw), shared, per_source)
    # float32 / float64 rounding of base + sum_i w_i (source - base), entries up to 8 in size.
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out, source.to(out.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("method", [*GTA, "slerp", "model_stock"])
@SETTINGS
@given(data=st.data())
def test_zero_deltas_give_the_base(method: str, data: st.DataObject) -> None:
    case = data.draw(merge_cases(method, same_sources=True))
    out = merge_tensor(method, **case)
    expected = case["base"].to(out.dtype)
    if method == "slerp":  # (1 - t) x + t x: rounding only
        assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("method", ["fisher", "linear"])
@SETTINGS
@given(data=st.data())
def test_identical_sources_average_to_the_source(method: str, data: st.DataObject) -> None:
    case = data.draw(merge_cases(method, same_sources=True))
    if method == "linear":
        case["shared"]["normalize"] = True
        if sum(p["weight"] for p in case["per_source"]) == 0:
            return
    out = merge_tensor(method, **case)
    expected = case["base"].to(out.dtype)
    assert torch.allclose(out, expected, atol=1e-5 if method == "fisher" else 2e-3, rtol=0)


@SETTINGS
@given(data=st.data())
def test_slerp_endpoints_are_exact(data: st.DataObject) -> None:
    dtype = data.draw(choice(DTYPES))
    shape = data.draw(shapes)
    base, source = data.draw(tensors(shape, dtype)), data.draw(tensors(shape, dtype))
    wanted = compute_dtype(dtype)
    assert torch.equal(merge_tensor("slerp", base, [source], {"t": 0.0}), base.to(wanted))
    end = merge_tensor("slerp", base, [source], {"t": 1.0})
    assert torch.allclose(end, source.to(wanted), atol=1e-5, rtol=0)
