"""Unit tests of the tensor merge methods against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import MethodError
from evomerge.merge.registry import TensorContext, get_method, merge_tensor

F64 = torch.float64
NAME = "model.layers.0.mlp.up_proj.weight"


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected: torch.Tensor | list[float], atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=atol, rtol=0), (actual, expected)


# --- TIES worked example --------------------------------------------------------------------

TAU = [
    [0.80, -0.05, 0.60, -0.02, 0.01, 0.50],
    [0.70, 0.04, -0.55, 0.03, -0.02, -0.40],
    [-0.10, 0.90, 0.05, 0.85, 0.02, 0.45],
]
# Trim to the top 3 of 6 by magnitude: [.8,0,.6,0,0,.5], [.7,0,-.55,0,0,-.4], [0,.9,0,.85,0,.45].
# Elected signs by mass (sums 1.5, .9, .05, .85, 0, .55): all +, and 0 counts as +.
# Disjoint mean of the agreeing entries: (.8+.7)/2, .9, .6, .85, nothing -> 0, (.5+.45)/2.
TIES_MERGED = [0.75, 0.90, 0.60, 0.85, 0.0, 0.475]
NAIVE_SUM = [1.40, 0.89, 0.10, 0.86, 0.01, 0.55]


@pytest.mark.parametrize("base", [[0.0] * 6, [0.1, -0.2, 0.3, 0.0, 0.5, -1.0]])
def test_ties_worked_example(base: list[float]) -> None:
    b = vec(*base)
    sources = [b + vec(*t) for t in TAU]
    params = [{"weight": 1.0, "density": 0.5}] * 3
    merged = merge_tensor("ties", b, sources, {"sign_election": "mass"}, params)
    close(merged - b, TIES_MERGED, atol=1e-12)
    naive = merge_tensor("task_arithmetic", b, sources, {}, [{"weight": 1.0}] * 3)
    close(naive - b, NAIVE_SUM, atol=1e-12)


def test_ties_float32_worked_example() -> None:
    base = torch.zeros(6)
    sources = [torch.tensor(t) for t in TAU]
    merged = merge_tensor("ties", base, sources, {}, [{"weight": 1.0, "density": 0.5}] * 3)
    assert merged.dtype == torch.float32
    close(merged, TIES_MERGED, atol=1e-6)


def test_ties_count_election_differs_from_mass() -> None:
    # Entry 0: +1.0 against -0.1, -0.1: mass says + (sum .8), count says - (one + vs two -).
    # Entry 1: +0.3, +0.2 against -0.9: mass says - (sum -.4), count says + (two vs one).
    base = torch.zeros(2, dtype=F64)
    sources = [vec(1.0, 0.3), vec(-0.1, 0.2), vec(-0.1, -0.9)]
    params = [{"weight": 1.0}] * 3
    by_mass = merge_tensor("ties", base, sources, {"sign_election": "mass"}, params)
    by_count = merge_tensor("ties", base, sources, {"sign_election": "count"}, params)
    close(by_mass, [1.0, -0.9])
    close(by_count, [-0.1, 0.25])


def test_ties_weighted_election_differs_from_raw() -> None:
    # Deltas +0.5 (weight 1) and -0.3 (weight 3). Raw election: .5 - .3 = .2 >= 0 -> +, keeps
    # source 0. Weighted election: .5 - .9 = -.4 -> -, keeps source 1.
    base = vec(2.0)
    sources = [vec(2.5), vec(1.7)]
    params = [{"weight": 1.0}, {"weight": 3.0}]
    raw = merge_tensor("ties", base, sources, {"normalize": False}, params)
    weighted = merge_tensor(
        "ties", base, sources, {"normalize": False, "weighted_election": True}, params
    )
    close(raw, [2.5])  # 2 + 1 * 0.5
    close(weighted, [2.0 - 0.9])  # 2 + 3 * (-0.3)
    # normalize divides by the weights that took part: 0.5 / 1 and -0.9 / 3.
    close(merge_tensor("ties", base, sources, {}, params), [2.5])
    close(merge_tensor("ties", base, sources, {"weighted_election": True}, params), [1.7])


def test_ties_lambda_scales_the_merged_task_vector() -> None:
    base = torch.zeros(6, dtype=F64)
    sources = [vec(*t) for t in TAU]
    params = [{"weight": 1.0, "density": 0.5}] * 3
    merged = merge_tensor("ties", base, sources, {"lambda": 2.0}, params)
    close(merged, [2 * x for x in TIES_MERGED], atol=1e-12)


# --- linear and task arithmetic -------------------------------------------------------------


def test_linear_weighted_average() -> None:
    a, b = vec(1.0, 2.0), vec(3.0, -2.0)
    close(merge_tensor("linear", None, [a, b], {}, [{"weight": 1.0}, {"weight": 3.0}]), [2.5, -1.0])
    close(
        merge_tensor(
            "linear", None, [a, b], {"normalize": False}, [{"weight": 1.0}, {"weight": 3.0}]
        ),
        [10.0, -4.0],
    )


def test_task_arithmetic_negation_scaling_and_analogy() -> None:
    base = vec(1.0, 1.0, 1.0)
    toxic = vec(2.0, 1.0, 0.0)  # task vector [1, 0, -1]
    close(merge_tensor("task_arithmetic", base, [toxic], {}, [{"weight": -1.0}]), [0.0, 1.0, 2.0])
    close(merge_tensor("task_arithmetic", base, [toxic], {}, [{"weight": 0.5}]), [1.5, 1.0, 0.5])
    close(
        merge_tensor("task_arithmetic", base, [toxic], {"lambda": 2.0}, [{"weight": 0.5}]),
        [2.0, 1.0, 0.0],
    )
    # Analogy "A is to B as C is to D": tau_D = tau_C + (tau_B - tau_A).
    a, b, c = vec(2.0, 1.0, 1.0), vec(1.0, 3.0, 1.0), vec(1.0, 1.0, 5.0)
    weights = [{"weight": -1.0}, {"weight": 1.0}, {"weight": 1.0}]
    # tau_A = [1,0,0], tau_B = [0,2,0], tau_C = [0,0,4] -> -tau_A + tau_B + tau_C = [-1,2,4].
    close(merge_tensor("task_arithmetic", base, [a, b, c], {}, weights), [0.0, 3.0, 5.0])
    # normalize divides by the weight sum (1 here: unchanged).
    close(
        merge_tensor("task_arithmetic", base, [a, b, c], {"normalize": True}, weights),
        [0.0, 3.0, 5.0],
    )


def test_task_arithmetic_normalize_near_zero_weight_sum_is_left_alone() -> None:
    base = vec(0.0)
    merged = merge_tensor(
        "task_arithmetic",
        base,
        [vec(1.0), vec(3.0)],
        {"normalize": True},
        [{"weight": 1.0}, {"weight": -1.0}],
    )
    close(merged, [-2.0])


# --- breadcrumbs ----------------------------------------------------------------------------

BREAD = [0.1, -0.9, 0.5, 0.05, -0.3, 0.7, 0.2, -0.02, 0.4, 0.6]


def test_breadcrumbs_drops_outliers_and_small_entries() -> None:
    # n = 10, density .5 -> keep 5; gamma .1 -> drop the 1 largest (|-0.9|); the 4 smallest
    # (.02, .05, .1, .2) go too. Kept: .3, .4, .5, .6, .7.
    base = torch.ones(10, dtype=F64)
    source = base + vec(*BREAD)
    params = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}]
    merged = merge_tensor("breadcrumbs", base, [source], {}, params)
    close(merged - base, [0, 0, 0.5, 0, -0.3, 0.7, 0, 0, 0.4, 0.6], atol=1e-12)
    # gamma 0: plain top-5 magnitude (.4, .5, .6, .7, .9).
    params = [{"weight": 1.0, "density": 0.5, "gamma": 0.0}]
    merged = merge_tensor("breadcrumbs", base, [source], {}, params)
    close(merged - base, [0, -0.9, 0.5, 0, 0, 0.7, 0, 0, 0.4, 0.6], atol=1e-12)
    # density 1 keeps everything, even with gamma > 0 (as mergekit does).
    params = [{"weight": 1.0, "density": 1.0, "gamma": 0.3}]
    close(merge_tensor("breadcrumbs", base, [source], {}, params) - base, BREAD, atol=1e-12)


def test_breadcrumbs_ties_elects_signs() -> None:
    base = torch.zeros(10, dtype=F64)
    first = vec(*BREAD)
    second = -first  # every kept entry is contested with equal mass: + wins ties (sum 0 >= 0)
    params = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}] * 2
    merged = merge_tensor("breadcrumbs_ties", base, [first, second], {}, params)
    expected = [0, 0, 0.5, 0, 0.3, 0.7, 0, 0, 0.4, 0.6]
    close(merged, expected, atol=1e-12)


# --- model stock, fisher, passthrough -------------------------------------------------------


def test_model_stock_two_sources() -> None:
    # Offsets [1, 0] and [1/2, sqrt3/2]: 60 degrees apart, cos = 1/2, t = 2 * .5 / 1.5 = 2/3.
    # Result = w0 + t * mean offset = [1, 1] + 2/3 * [3/4, sqrt3/4] = [1.5, 1 + sqrt3/6].
    w0 = vec(1.0, 1.0)
    w1 = vec(2.0, 1.0)
    w2 = vec(1.5, 1.0 + math.sqrt(3) / 2)
    merged = merge_tensor("model_stock", w0, [w1, w2])
    close(merged, [1.5, 1.0 + math.sqrt(3) / 6], atol=1e-12)


def test_model_stock_filter_wise_and_degenerate_cases() -> None:
    w0 = torch.zeros(2, 2, dtype=F64)
    # Row 0: orthogonal offsets (cos 0, t 0: base row). Row 1: equal offsets (cos 1, t 1: mean).
    w1 = torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=F64)
    w2 = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=F64)
    merged = merge_tensor("model_stock", w0, [w1, w2], {"filter_wise": True})
    close(merged, [[0.0, 0.0], [2.0, 2.0]])
    # Whole tensor: offsets [1,0,2,2] and [0,1,2,2], cos = 8 / 9, t = (16/9) / (17/9).
    cos = 8.0 / (math.sqrt(9.0) * math.sqrt(9.0))
    t = 2 * cos / (1 + cos)
    close(merge_tensor("model_stock", w0, [w1, w2]), (t * (w1 + w2) / 2).tolist())
    # Opposite offsets: cos -1, 1 + (N-1) cos = 0 -> singular, keep the base.
    close(merge_tensor("model_stock", vec(1.0, 1.0), [vec(2.0, 1.0), vec(0.0, 1.0)]), [1.0, 1.0])


def test_fisher_weighted_average() -> None:
    x1, x2 = vec(1.0, 2.0), vec(3.0, 6.0)
    ctx = TensorContext(name=NAME, aux={"fisher": [vec(1.0, 3.0), vec(3.0, 1.0)]})
    # [(1*1 + 3*3) / 4, (3*2 + 1*6) / 4]
    close(merge_tensor("fisher", None, [x1, x2], {}, None, ctx), [2.5, 3.0])
    # weights 2, 1: [(2*1*1 + 3*3) / (2 + 3), (2*3*2 + 1*6) / (6 + 1)]
    weights = [{"weight": 2.0}, {"weight": 1.0}]
    close(merge_tensor("fisher", None, [x1, x2], {}, weights, ctx), [11 / 5, 18 / 7])
    # All-zero Fisher: no information, a plain average.
    zero = TensorContext(name=NAME, aux={"fisher": [torch.zeros(2, dtype=F64)] * 2})
    close(merge_tensor("fisher", None, [x1, x2], {}, None, zero), [2.0, 4.0])
    # One source all zero: the tensor is the weighted average (weights 2, 1).
    one_zero = TensorContext(name=NAME, aux={"fisher": [torch.zeros(2, dtype=F64), vec(5.0, 1.0)]})
    close(merge_tensor("fisher", None, [x1, x2], {}, weights, one_zero), [5 / 3, 10 / 3])


def test_fisher_floor_is_relative_to_each_sources_mean() -> None:
    x1, x2 = vec(0.0, 0.0, 0.0, 0.0), vec(1.0, 1.0, 1.0, 1.0)
    f1 = vec(0.0, 2.0, 4.0, 2.0)  # mean 2: floor 0.25 x 2 = 0.5 lifts the 0
    f2 = vec(1.0, 1.0, 1.0, 1.0)  # mean 1: untouched
    ctx = TensorContext(name=NAME, aux={"fisher": [f1, f2]})
    out = merge_tensor("fisher", None, [x1, x2], {"fisher_floor": 0.25}, None, ctx)
    close(out, [1 / 1.5, 1 / 3, 1 / 5, 1 / 3])
    # The default floor, 1e-3 of the mean: the 0 counts 0.002.
    out = merge_tensor("fisher", None, [x1, x2], {}, None, ctx)
    close(out, [1 / 1.002, 1 / 3, 1 / 5, 1 / 3])
    assert get_method("fisher").param("fisher_floor").default == 1e-3


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (3e-9, 1e-10, 7e-9), (2.0, 5e-3, 1e4)])
def test_fisher_with_constant_fisher_is_the_weighted_average(scales) -> None:
    """F_i = c_i everywhere: sum_i w_i c_i x_i / sum_i w_i c_i, whatever the c_i (NumPy oracle)."""
    import numpy as np

    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(5, 3)) for _ in scales]
    ws = [0.5, 1.5, 2.0]
    fishers = [torch.full((5, 3), c, dtype=F64) for c in scales]
    ctx = TensorContext(name=NAME, aux={"fisher": fishers})
    out = merge_tensor(
        "fisher", None, [torch.from_numpy(x) for x in xs], {}, [{"weight": w} for w in ws], ctx
    )
    k = [w * c for w, c in zip(ws, scales, strict=True)]
    oracle = sum(ki * x for ki, x in zip(k, xs, strict=True)) / sum(k)
    np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fisher_is_invariant_to_scaling_every_fisher(dtype) -> None:
    """Multiplying every source's Fisher by 1e-9 (typical LLM values) changes nothing; an
    absolute floor would make that a plain average."""
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, generator=generator, dtype=dtype) for _ in range(3)]
    fishers = [torch.rand(64, generator=generator, dtype=dtype) ** 4 for _ in range(3)]
    fishers[0][:8] = 0.0  # entries the data never reached: floored
    per_source = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]

    def merged(scale: float) -> torch.Tensor:
        ctx = TensorContext(name=NAME, aux={"fisher": [f * scale for f in fishers]})
        return merge_tensor("fisher", None, xs, {}, per_source, ctx)

    reference = merged(1.0)
    torch.testing.assert_close(merged(1e-9), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged(1e6), reference, rtol=1e-5, atol=1e-6)
    plain = sum(w["weight"] * x for w, x in zip(per_source, xs, strict=True)) / 3.5
    assert not torch.allclose(reference, plain, atol=1e-2)


def test_fisher_rejects_bad_fisher_tensors() -> None:
    x = vec(1.0, 2.0)
    wrong_shape = TensorContext(name=NAME, aux={"fisher": [torch.ones(3, dtype=F64)]})
    with pytest.raises(MethodError, match=rf"fisher.*shape.*{NAME}"):
        merge_tensor("fisher", None, [x], {}, None, wrong_shape)
    negative = TensorContext(name=NAME, aux={"fisher": [vec(1.0, -1.0)]})
    with pytest.raises(MethodError, match=rf"fisher.*negative.*{NAME}"):
        merge_tensor("fisher", None, [x], {}, None, negative)
    ones = TensorContext(name=NAME, aux={"fisher": [vec(1.0, 1.0)]})
    with pytest.raises(MethodError, match=rf"fisher.*weight.*{NAME}"):
        merge_tensor("fisher", None, [x], {}, [{"weight": 0.0}], ones)
    with pytest.raises(MethodError, match="fisher"):
        merge_tensor("fisher", None, [x], {}, None, TensorContext(name=NAME))


def test_passthrough() -> None:
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    out = merge_tensor("passthrough", None, [x])
    assert out.dtype == torch.float32
    close(out, [1.0, -2.0])
    close(merge_tensor("passthrough", None, [x], {}, [{"scale": 0.5}]), [0.5, -1.0])
    close(merge_tensor("passthrough", None, [x], {}, [{"scale": None}]), [1.0, -2.0])
    y = torch.tensor([3.0])
    out = merge_tensor("passthrough", None, [y])
    out.add_(1)
    assert y.item() == 3.0  # the result never aliases the input


# --- slerp ----------------------------------------------------------------------------------


def test_slerp_endpoints_and_midpoint() -> None:
    v0, v1 = vec(1.0, 0.0), vec(0.0, 1.0)
    close(merge_tensor("slerp", v0, [v1], {"t": 0.0}), [1.0, 0.0])
    close(merge_tensor("slerp", v0, [v1], {"t": 1.0}), [0.0, 1.0])
    s = 1 / math.sqrt(2)
    close(merge_tensor("slerp", v0, [v1], {"t": 0.5}), [s, s])


def test_slerp_keeps_unit_norm_and_angle() -> None:
    v0, v1 = vec(1.0, 0.0, 0.0), vec(0.0, 0.6, 0.8)  # 90 degrees apart
    for t in (0.1, 0.3, 0.7):
        out = merge_tensor("slerp", v0, [v1], {"t": t})
        assert abs(out.norm().item() - 1.0) < 1e-12
        assert abs(out[0].item() - math.cos(t * math.pi / 2)) < 1e-12


def test_slerp_nearly_parallel_is_lerp_and_works_on_matrices() -> None:
    v0 = vec(1.0, 2.0, 3.0)
    v1 = v0 * 2 + 1e-4  # cos ~ 1 > 0.9995
    close(merge_tensor("slerp", v0, [v1], {"t": 0.25}), (0.75 * v0 + 0.25 * v1).tolist())
    m0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    m1 = torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=F64)  # orthogonal, norms 1 and 3
    s = math.sin(math.pi / 4)  # sin(theta / 2) / sin(theta), theta = pi / 2
    close(merge_tensor("slerp", m0, [m1], {"t": 0.5}), [[s, 0.0], [0.0, 3 * s]])
    # A zero tensor has no direction: its norm counts as 1, cos 0, theta pi/2.
    zero = torch.zeros(2, dtype=F64)
    close(merge_tensor("slerp", zero, [vec(0.0, 2.0)], {"t": 0.5}), [0.0, 2 * s])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("threshold", [1e-6, 0.5, 0.9995, 1.0])
def test_slerp_of_parallel_opposite_and_zero_tensors_is_finite(dtype, threshold) -> None:
    """No angle to measure: lerp, for every allowed dot_threshold (0, 1], never 0/0."""
    x = torch.tensor([[0.3, -1.2, 2.5], [0.7, 0.0, -0.4]], dtype=dtype)
    params = {"t": 0.3, "dot_threshold": threshold}
    same = merge_tensor("slerp", x, [x.clone()], params)
    assert torch.allclose(same, x, atol=1e-6, rtol=0), same  # identical: the input itself
    # Opposite directions: the lerp 0.7 x + 0.3 (-2 x) = 0.1 x (worked by hand).
    close(merge_tensor("slerp", x, [-2 * x], params), (0.1 * x).tolist(), atol=1e-6)
    close(merge_tensor("slerp", x, [3 * x], params), (1.6 * x).tolist(), atol=1e-5)
    zero = torch.zeros_like(x)
    assert torch.equal(merge_tensor("slerp", zero, [zero], params), zero)
    for v0, v1 in [(zero, x), (x, zero)]:
        assert torch.isfinite(merge_tensor("slerp", v0, [v1], params)).all()


# --- DARE / DELLA ---------------------------------------------------------------------------


def _dare(name: str, seed: int = 0, method: str = "dare_linear", **shared: object) -> torch.Tensor:
    base = torch.zeros(256)
    source = torch.linspace(-1, 1, 256)
    ctx = TensorContext(name=name, seed=seed)
    return merge_tensor(method, base, [source], shared, [{"weight": 1.0, "density": 0.5}], ctx)


def test_dare_masks_are_reproducible_per_seed_and_tensor_name() -> None:
    first = _dare("a.weight")
    assert torch.equal(first, _dare("a.weight"))
    assert not torch.equal(first != 0, _dare("b.weight") != 0)
    assert not torch.equal(first != 0, _dare("a.weight", seed=1) != 0)
    assert torch.equal(_dare("a.weight", method="dare_ties"), _dare("a.weight", method="dare_ties"))


def test_dare_sources_get_different_masks() -> None:
    base = torch.zeros(256)
    source = torch.ones(256)
    out = merge_tensor(
        "dare_linear",
        base,
        [source, source],
        {"rescale": "none"},
        [{"weight": 1.0, "density": 0.5}] * 2,
        TensorContext(name=NAME),
    )
    # Entries kept by exactly one source are 1, by both 2: masks differ, so some entries are 1.
    assert (out == 1).any() and (out == 2).any()


def test_dare_inverse_density_is_unbiased() -> None:
    # One kept/dropped entry is d * B / p with B ~ Bernoulli(p): mean d, variance d^2 (1-p) / p.
    # The mean of n = 1000 draws has standard deviation |d| sqrt((1-p) / (p n)) = 0.0316 |d| at
    # p = 0.5. Allow 5 of those per entry: a wrong scale (e.g. no rescale, mean d/2) is off by
    # 0.5 |d|, 16 deviations, while the chance of a correct one failing is about 1.5e-4 over
    # all 256 entries (and the draws are fixed by the seeds, so the test is deterministic).
    n, p = 1000, 0.5
    expected = torch.linspace(-1, 1, 256)
    mean = sum(_dare("dare.unbiased", seed=s) for s in range(n)) / n
    bound = 5 * expected.abs() * math.sqrt((1 - p) / (p * n)) + 1e-6
    assert bool(((mean - expected).abs() <= bound).all())


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_l1_rescale_preserves_l1_norm(method: str) -> None:
    base = torch.full((64,), 0.5, dtype=F64)
    source = base + torch.linspace(-1, 2, 64, dtype=F64)
    merged = merge_tensor(
        method,
        base,
        [source],
        {"rescale": "l1"},
        [{"weight": 1.0, "density": 0.4}],
        TensorContext(name=NAME),
    )
    delta = merged - base
    assert (delta == 0).sum() > 10  # something was dropped
    assert abs(delta.abs().sum().item() - (source - base).abs().sum().item()) < 1e-9


def test_della_keeps_fewer_small_entries() -> None:
    # Magnitudes 1..1000 in one row; keep probability .1 (smallest) .. .9 (largest):
    # about 150 kept in the lower half against 350 in the upper half.
    base = torch.zeros(1000)
    source = torch.arange(1, 1001, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(500)
    merged = merge_tensor(
        "della_linear",
        base,
        [source],
        {"rescale": "none"},
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}],
        TensorContext(name=NAME),
    )
    kept = merged != 0
    small, large = int(kept[:500].sum()), int(kept[500:].sum())
    assert 100 < small < 200 and 300 < large < 400
    assert torch.equal(merged[kept], source[kept])  # rescale none keeps values as they are


def test_della_inverse_prob_rescale() -> None:
    # Row of 5 with density .5, epsilon .2: probabilities .3, .4, .5, .6, .7 by rank.
    base = torch.zeros(5, dtype=F64)
    source = vec(5.0, -1.0, 3.0, -2.0, 4.0)  # ranks 4, 0, 2, 1, 3
    probs = vec(0.7, 0.3, 0.5, 0.4, 0.6)
    for seed in range(20):
        merged = merge_tensor(
            "della_linear",
            base,
            [source],
            {},
            [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}],
            TensorContext(name=NAME, seed=seed),
        )
        kept = merged != 0
        close(merged[kept], (source / probs)[kept].tolist(), atol=1e-12)


# --- bad parameters -------------------------------------------------------------------------

CTX = TensorContext(name=NAME)
X = torch.ones(3)


@pytest.mark.parametrize(
    ("method", "sources", "shared", "per_source", "param"),
    [
        ("ties", [X], {}, [{"weight": 1.0, "density": 0.0}], "density"),
        ("dare_ties", [X], {}, [{"weight": 1.0, "density": 1.5}], "density"),
        ("ties", [X], {}, [{"density": 0.5}], "weight"),
        ("della", [X], {}, [{"weight": 1.0, "density": 0.5, "epsilon": 0.6}], "epsilon"),
        ("della_linear", [X], {}, [{"weight": 1.0, "density": 0.2, "epsilon": 0.2}], "epsilon"),
        ("breadcrumbs", [X], {}, [{"weight": 1.0, "gamma": 1.0}], "gamma"),
        ("dare_linear", [X], {"rescale": "l2"}, [{"weight": 1.0}], "rescale"),
        ("ties", [X], {"sign_election": "vote"}, [{"weight": 1.0}], "sign_election"),
        ("slerp", [X], {}, [{}], "t"),
        ("slerp", [X], {"t": 0.5, "dot_threshold": 0.0}, [{}], "dot_threshold"),
        ("fisher", [X], {"fisher_floor": 0.0}, [{}], "fisher_floor"),
        ("fisher", [X], {"fisher_floor": 1.5}, [{}], "fisher_floor"),
        ("fisher", [X], {}, [{"weight": -1.0}], "weight"),
    ],
)
def test_bad_parameters_name_method_parameter_and_tensor(
    method: str, sources: list[torch.Tensor], shared: dict, per_source: list[dict], param: str
) -> None:
    ctx = TensorContext(name=NAME, aux={"fisher": [torch.ones(3)]})
    with pytest.raises(MethodError) as info:
        merge_tensor(method, X, sources, shared, per_source, ctx)
    message = str(info.value)
    assert f"'{method}'" in message and f"'{param}'" in message and NAME in message, message


@pytest.mark.parametrize(
    ("method", "sources", "shared", "per_source", "names"),
    [
        ("slerp", [X, X], {"t": 0.5}, [{}, {}], ["2"]),
        ("ties", [X], {}, [{"weight": 1.0, "densty": 0.5}], ["'densty'"]),
        ("task_arithmetic", [X], {"normalise": True}, [{"weight": 1.0}], ["'normalise'"]),
    ],
)
def test_bad_shape_of_call_names_method_and_culprit(
    method: str, sources: list[torch.Tensor], shared: dict, per_source: list[dict], names: list[str]
) -> None:
    with pytest.raises(MethodError) as info:
        merge_tensor(method, X, sources, shared, per_source, CTX)
    message = str(info.value)
    assert f"'{method}'" in message and all(name in message for name in names), message


@pytest.mark.parametrize(
    ("method", "sources", "shared", "per_source"),
    [
        ("slerp", [X, X], {"t": 0.5}, [{}, {}]),
        ("ties", [X], {}, [{"weight": 1.0, "densty": 0.5}]),
    ],
)
def test_bad_shape_of_call_names_tensor(
    method: str, sources: list[torch.Tensor], shared: dict, per_source: list[dict]
) -> None:
    with pytest.raises(MethodError, match=NAME):
        merge_tensor(method, X, sources, shared, per_source, CTX)


def test_task_arithmetic_takes_no_density() -> None:
    with pytest.raises(MethodError, match="'density'"):
        merge_tensor("task_arithmetic", X, [X], {}, [{"weight": 1.0, "density": 0.5}], CTX)


# --- registry metadata ----------------------------------------------------------------------

MERGEKIT_NAMES = {
    "slerp": "slerp",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "della": "della",
    "della_linear": "della_linear",
    "model_stock": "model_stock",
    "passthrough": "passthrough",
    "fisher": None,
}


@pytest.mark.parametrize(("name", "mergekit_name"), MERGEKIT_NAMES.items())
def test_methods_are_registered_and_documented(name: str, mergekit_name: str | None) -> None:
    method = get_method(name)
    assert method.mergekit_name == mergekit_name
    assert method.doc and all(spec.doc for spec in method.params)


@pytest.mark.parametrize(
    ("name", "normalize"),
    [
        ("task_arithmetic", False),
        ("ties", True),
        ("dare_linear", False),
        ("dare_ties", False),
        ("breadcrumbs", False),
        ("breadcrumbs_ties", False),
        ("della", True),
        ("della_linear", False),
    ],
)
def test_normalize_defaults(name: str, normalize: bool) -> None:
    assert get_method(name).param("normalize").default is normalize


def test_rank_range_mask_matches_a_sort_and_handles_ties() -> None:
    from evomerge.merge.methods.sparsify import rank_range_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        n = int(torch.randint(1, 200, (1,), generator=g))
        tied = trial % 2 == 1
        x = torch.randint(0, 5, (n,), generator=g).float() if tied else torch.rand(n, generator=g)
        start = int(torch.randint(0, n + 1, (1,), generator=g))
        stop = int(torch.randint(start, n + 1, (1,), generator=g))
        mask = rank_range_mask(x, start, stop)
        assert int(mask.sum()) == stop - start
        ordered = torch.sort(x).values
        if stop > start:
            assert x[mask].min() >= ordered[start] and x[mask].max() <= ordered[stop - 1]
        if not tied:  # distinct values: exactly the entries a sort puts at those ranks
            expected = torch.zeros(n, dtype=torch.bool)
            expected[torch.argsort(x)[start:stop]] = True
            assert torch.equal(mask, expected)
