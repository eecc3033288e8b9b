"""TSV-M (tsv), Iso-C (iso_c) and Iso-CTS (iso_cts): hand-worked cases, a NumPy oracle, the
papers' stated properties, parameter checks and an end-to-end merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.errors import MethodError
from evomerge.merge.methods.tsv import tsv_factors
from evomerge.merge.registry import TensorContext, get_method, merge_tensor
from tests.helpers import load_folder, write_yaml

SVD_METHODS = ["tsv", "iso_c", "iso_cts"]


# --- NumPy oracles ------------------------------------------------------------------------------


def _polar(m: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(m, full_matrices=False)
    return p @ qh


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _deltas(base, sources, weights):
    weights = weights or [1.0] * len(sources)
    return [w * (s - base) for s, w in zip(sources, weights)]


def np_tsv(base, sources, weights=None, alpha=1.0, rank_fraction=None):
    deltas = _deltas(base, sources, weights)
    count, rank = len(deltas), min(base.shape)
    if base.ndim != 2 or rank < count:
        return base + alpha * sum(deltas)
    fraction = 1 / count if rank_fraction is None else rank_fraction
    k = min(max(1, _half_up(fraction * rank)), rank // count)
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = _polar(np.hstack(us)), np.concatenate(ss), _polar(np.hstack(vs))
    return base + alpha * (u @ np.diag(s) @ v.T)


def np_iso_c(base, sources, weights=None, alpha=1.0):
    total = sum(_deltas(base, sources, weights))
    if base.ndim != 2:
        return base + alpha * total
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    return base + alpha * s.mean() * (u @ vh)


def np_iso_cts(base, sources, weights=None, alpha=1.0, common_fraction=0.8):
    deltas = _deltas(base, sources, weights)
    if base.ndim != 2:
        return base + alpha * sum(deltas)
    rank = min(base.shape)
    k = min(rank, max(1, _half_up(common_fraction * rank)))
    per_task = (rank - k) // len(deltas)
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    uc = u[:, :k]
    for d in deltas:
        if per_task == 0:
            break
        ut, st, vth = np.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vth[:per_task].T)
    mean = np.concatenate(ss).mean()
    return base + alpha * mean * (_polar(np.hstack(us)) @ _polar(np.hstack(vs)).T)


ORACLES = {"tsv": np_tsv, "iso_c": np_iso_c, "iso_cts": np_iso_cts}


def _merge(method, base, sources, weights=None, **shared):
    per_source = [{"weight": w} for w in weights] if weights else None
    return merge_tensor(method, base, sources, shared, per_source)


def _t(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# --- hand-worked cases --------------------------------------------------------------------------


def test_tsv_two_by_two_by_hand():
    # Task 1: 2 e1 e1^T (top triplet e1, 2, e1); task 2: a e2^T with a = (e1 + e2)/sqrt 2 (a, 1,
    # e2); k = 1 each. U = [e1, a] has polar factor the rotation by -22.5 degrees, V = I, so the
    # merge is [[2 cos, sin], [-2 sin, cos]] (22.5 degrees).
    c = 2**-0.5
    out = _merge(
        "tsv", torch.zeros(2, 2, dtype=torch.float64), [_t([[2, 0], [0, 0]]), _t([[0, c], [0, c]])]
    )
    cos, sin = math.cos(math.pi / 8), math.sin(math.pi / 8)
    assert torch.allclose(out, _t([[2 * cos, sin], [-2 * sin, cos]]), atol=1e-12)


def test_tsv_keeps_only_each_tasks_top_direction_by_hand():
    base = _t([[1, 2], [3, 4]])
    sources = [base + _t([[3, 0], [0, 1]]), base + _t([[0, 0], [0, 2]])]
    out = _merge("tsv", base, sources, alpha=0.5)
    assert torch.allclose(out, base + 0.5 * _t([[3, 0], [0, 2]]), atol=1e-12)


def test_iso_c_by_hand():
    base = _t([[1, 0], [0, 1]])
    # delta = 0.5 * diag(4, 0) + 1 * diag(1, -1) = diag(3, -1): singular values 3 and 1, mean 2.
    sources = [base + _t([[4, 0], [0, 0]]), base + _t([[1, 0], [0, -1]])]
    out = _merge("iso_c", base, sources, weights=[0.5, 1.0], alpha=0.5)
    assert torch.allclose(out, base + 0.5 * 2 * _t([[1, 0], [0, -1]]), atol=1e-12)


def test_iso_cts_by_hand():
    # delta_1 = diag(4, 1, 0.5), delta_2 = diag(0, 0, 2): sum diag(4, 1, 2.5). r = 3,
    # common_fraction 1/3 -> k = 1 common direction (e1, 4), (3 - 1) // 2 = 1 per task:
    # delta_1 off e1 = diag(0, 1, 0.5) -> (e2, 1); delta_2 off e1 -> (e3, 2). U = V = I,
    # mean (4 + 1 + 2) / 3 = 7/3. Iso-C would give mean(4, 2.5, 1) = 2.5.
    zero = torch.zeros(3, 3, dtype=torch.float64)
    sources = [torch.diag(_t([4, 1, 0.5])), torch.diag(_t([0, 0, 2]))]
    out = _merge("iso_cts", zero, sources, common_fraction=1 / 3)
    assert torch.allclose(out, 7 / 3 * torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(_merge("iso_c", zero, sources), 2.5 * torch.eye(3, dtype=torch.float64))


def test_iso_cts_common_only_by_hand():
    # 3 x 2, one task: delta = [[3, 0], [0, 1], [0, 0]]; common_fraction 0.5 -> k = 1 (e1, 3),
    # one task direction off e1: (e2, 1); mean 2.
    delta = _t([[3, 0], [0, 1], [0, 0]])
    out = _merge("iso_cts", torch.zeros(3, 2, dtype=torch.float64), [delta], common_fraction=0.5)
    assert torch.allclose(out, _t([[2, 0], [0, 2], [0, 0]]), atol=1e-12)


# --- NumPy oracle -------------------------------------------------------------------------------

CASES = [
    ("tsv", {}),
    ("tsv", {"rank_fraction": 0.25}),
    ("tsv", {"rank_fraction": 0.5, "alpha": 0.7}),
    ("iso_c", {}),
    ("iso_c", {"alpha": -0.3}),
    ("iso_cts", {}),
    ("iso_cts", {"common_fraction": 0.5, "alpha": 1.3}),
    ("iso_cts", {"common_fraction": 0.25}),
]


@pytest.mark.parametrize(("method", "shared"), CASES)
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (8, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_oracle(method, shared, count, shape, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    sources = [base + rng.standard_normal(shape) for _ in range(count)]
    weights = list(rng.uniform(-1.5, 1.5, count))
    expected = ORACLES[method](base, sources, weights, **shared)
    out = _merge(method, _t(base), [_t(s) for s in sources], weights, **shared)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10, rtol=0)


# --- the papers' properties ---------------------------------------------------------------------


def _random(shape, count, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    sources = [base + torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]
    return base.to(dtype), [s.to(dtype) for s in sources]


@pytest.mark.parametrize("alpha", [1.0, 0.4, -2.0])
def test_iso_c_flattens_the_spectrum(alpha):
    base, sources = _random((7, 5), 3)
    weights = [0.5, 1.0, -0.7]
    out = _merge("iso_c", base, sources, weights, alpha=alpha)
    total = sum(w * (s - base) for s, w in zip(sources, weights))
    mean = torch.linalg.svdvals(total).mean()
    merged = torch.linalg.svdvals(out - base)
    assert torch.allclose(merged, abs(alpha) * mean * torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_tsv_of_one_task_at_full_rank_is_the_task_vector(shape):
    base, sources = _random(shape, 1)
    out = _merge("tsv", base, sources, [0.8], alpha=1.5, rank_fraction=1.0)
    assert torch.allclose(out, base + 1.5 * 0.8 * (sources[0] - base), atol=1e-12)


@pytest.mark.parametrize(("shape", "count", "k"), [((8, 6), 3, 2), ((6, 8), 2, 3), ((9, 9), 3, 3)])
def test_tsv_factors_have_orthonormal_columns(shape, count, k):
    base, sources = _random(shape, count)
    u, s, v = tsv_factors([src - base for src in sources], k)
    assert u.shape == (shape[0], count * k) and v.shape == (shape[1], count * k)
    assert s.shape == (count * k,)
    eye = torch.eye(count * k, dtype=torch.float64)
    assert torch.allclose(u.mT @ u, eye, atol=1e-12)
    assert torch.allclose(v.mT @ v, eye, atol=1e-12)


def test_tsv_rank_budget_is_capped_to_fit_all_tasks():
    # r = 5, T = 2: rank_fraction 1 (k = 5) and 0.6 (k = 3) are both capped at 5 // 2 = 2.
    base, sources = _random((5, 7), 2)
    capped = _merge("tsv", base, sources, rank_fraction=1.0)
    assert torch.allclose(capped, _merge("tsv", base, sources, rank_fraction=0.6))
    assert torch.allclose(capped, _merge("tsv", base, sources, rank_fraction=0.4))  # k = 2
    assert torch.allclose(capped, _merge("tsv", base, sources))  # default 1/T: k = 2
    assert torch.isfinite(capped).all()
    np.testing.assert_allclose(
        capped.numpy(),
        np_tsv(base.numpy(), [s.numpy() for s in sources], rank_fraction=1.0),
        atol=1e-10,
    )


def test_tsv_with_more_sources_than_directions_is_task_arithmetic():
    base, sources = _random((2, 6), 3)
    out = _merge("tsv", base, sources, [1.0, 0.5, -1.0], alpha=0.5)
    ta = merge_tensor(
        "task_arithmetic", base, sources, {"lambda": 0.5}, [{"weight": w} for w in (1.0, 0.5, -1.0)]
    )
    assert torch.allclose(out, ta, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_iso_cts_with_common_fraction_one_is_iso_c(shape):
    base, sources = _random(shape, 3)
    weights = [1.0, 0.3, -0.5]
    cts = _merge("iso_cts", base, sources, weights, alpha=0.7, common_fraction=1.0)
    assert torch.allclose(cts, _merge("iso_c", base, sources, weights, alpha=0.7), atol=1e-12)


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", [(5,), (3, 2, 2), ()])
def test_tensors_that_are_not_matrices_follow_task_arithmetic(method, shape):
    base, sources = _random(shape, 2)
    out = _merge(method, base, sources, [0.5, -1.5], alpha=0.8)
    assert torch.allclose(out, base + 0.8 * (0.5 * (sources[0] - base) - 1.5 * (sources[1] - base)))


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 4), (4,), (1, 1)])
def test_zero_deltas_give_the_base_exactly(method, dtype, shape):
    base, _ = _random(shape, 0, dtype=dtype)
    out = _merge(method, base, [base.clone(), base.clone()], alpha=3.0)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out, base.to(out.dtype))
    # zero weights are zero task vectors too
    _, sources = _random(shape, 2, seed=1, dtype=dtype)
    assert torch.equal(_merge(method, base, sources, [0.0, 0.0]), base.to(out.dtype))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_one_zero_task_among_others_is_finite(method):
    base, sources = _random((6, 4), 1)
    out = _merge(method, base, [sources[0], base.clone()])
    assert torch.isfinite(out).all()
    expected = ORACLES[method](base.numpy(), [sources[0].numpy(), base.numpy()])
    if method == "tsv":  # a zero task's directions carry weight 0: the result is determined
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_float32(method, dtype):
    base, sources = _random((8, 6), 2, dtype=dtype)
    out = _merge(method, base, sources)
    assert out.dtype == torch.float32 and out.shape == (8, 6)
    assert torch.isfinite(out).all()
    expected = ORACLES[method](base.double().numpy(), [s.double().numpy() for s in sources])
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)


MOVES = [
    ("tsv", "alpha", 1.0, 0.5),
    ("tsv", "rank_fraction", None, 0.125),
    ("tsv", "rank_fraction", 0.25, 0.375),
    ("iso_c", "alpha", 1.0, 0.5),
    ("iso_cts", "alpha", 1.0, 0.5),
    ("iso_cts", "common_fraction", 0.8, 0.5),
    ("iso_cts", "common_fraction", 0.8, 1.0),
]


@pytest.mark.parametrize(("method", "name", "first", "second"), MOVES)
def test_each_shared_parameter_moves_the_result(method, name, first, second):
    base, sources = _random((8, 8), 2)
    a = _merge(method, base, sources, **{name: first})
    b = _merge(method, base, sources, **{name: second})
    assert not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_weight_moves_the_result(method):
    base, sources = _random((8, 8), 2)
    a = _merge(method, base, sources, [1.0, 1.0])
    b = _merge(method, base, sources, [1.0, 0.4])
    assert not torch.allclose(a, b, atol=1e-6)
    # defaults: weight 1 and alpha 1
    assert torch.equal(a, _merge(method, base, sources))


BAD = [
    ("tsv", {"alpha": "big"}, None, "alpha"),
    ("tsv", {"rank_fraction": 0.0}, None, "rank_fraction"),
    ("tsv", {"rank_fraction": 1.5}, None, "rank_fraction"),
    ("tsv", {"rank_fraction": -0.2}, None, "rank_fraction"),
    ("tsv", {"common_fraction": 0.5}, None, "common_fraction"),
    ("iso_c", {"alpha": float("nan")}, None, "alpha"),
    ("iso_c", {"rank_fraction": 0.5}, None, "rank_fraction"),
    ("iso_cts", {"common_fraction": 0.0}, None, "common_fraction"),
    ("iso_cts", {"common_fraction": 1.01}, None, "common_fraction"),
    ("iso_cts", {}, [{"weight": "x"}, {}], "weight"),
    ("iso_c", {}, [{"weight": True}, {}], "weight"),
    ("tsv", {}, [{"alpha": 1.0}, {}], "alpha"),
]


@pytest.mark.parametrize(("method", "shared", "per_source", "name"), BAD)
def test_bad_parameters_name_the_parameter(method, shared, per_source, name):
    base, sources = _random((4, 3), 2)
    with pytest.raises(MethodError, match=f"'{name}'"):
        merge_tensor(method, base, sources, shared, per_source)


def test_registration():
    for name in SVD_METHODS:
        method = get_method(name)
        assert method.uses_base and method.needs_base and method.mergekit_name is None
        assert method.summary and method.min_sources == 1
    assert get_method("tsv").param("rank_fraction").nullable
    assert get_method("iso_cts").param("common_fraction").default == 0.8
    with pytest.raises(MethodError, match="needs a base"):
        merge_tensor("iso_c", None, [torch.ones(2, 2)])


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "spectral_embeddings"), [("tsv", False), ("iso_c", False), ("iso_c", True)]
)
def test_cli_merge_matches_the_oracle(method, spectral_embeddings, family, tmp_path):
    """Every 2-D tensor of `evomerge merge`'s output is the oracle's; the embedding and head
    follow task arithmetic unless spectral_embeddings is set."""
    from evomerge.cli import main
    from evomerge.merge.config_file import plan_from_file

    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        {
            "method": method,
            "base": str(family["base"]),
            "sources": [{"model": str(family["ft_0"])}, {"model": str(family["ft_1"])}],
            "parameters": {"alpha": [0.5, 1.0], "spectral_embeddings": spectral_embeddings},
        },
    )
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    plan, _ = plan_from_file(recipe)
    merged = load_folder(out)
    base, ft0, ft1 = (load_folder(family[name]) for name in ("base", "ft_0", "ft_1"))
    alphas = {}
    matrices = 0
    for name, tensor in merged.items():
        if tensor.dim() != 2:
            continue
        alpha = plan.job(name).shared_dict()["alpha"]
        alphas[name] = alpha
        args = [t[name].double().numpy() for t in (base, ft0, ft1)]
        if name in ("model.embed_tokens.weight", "lm_head.weight") and not spectral_embeddings:
            expected = args[0] + alpha * ((args[1] - args[0]) + (args[2] - args[0]))
        else:
            expected = ORACLES[method](args[0], args[1:], alpha=alpha)
        np.testing.assert_allclose(
            tensor.double().numpy(), expected, atol=2e-5, rtol=0, err_msg=name
        )
        assert not np.allclose(expected, args[0], atol=1e-6)  # the merge did something
        matrices += 1
    assert matrices >= 4 * 7 + 2  # every layer's projections, the embedding and the head
    assert alphas["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.5)
    assert alphas["model.layers.3.self_attn.q_proj.weight"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 1), (2, 2), (3, 7)])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_thin_matrices_match_the_oracle(method, shape, count):
    base, sources = _random(shape, count, seed=count)
    out = _merge(method, base, sources, alpha=0.9)
    assert out.shape == shape and torch.isfinite(out).all()
    expected = ORACLES[method](base.numpy(), [s.numpy() for s in sources], alpha=0.9)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_vocabulary_matrices_follow_task_arithmetic_unless_asked(method):
    base, sources = _random((6, 4), 2, seed=3)
    task_arithmetic = base + 0.9 * sum(s - base for s in sources)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ctx = TensorContext(name=name)
        out = merge_tensor(method, base, sources, {"alpha": 0.9}, None, ctx)
        torch.testing.assert_close(out, task_arithmetic, atol=1e-12, rtol=0)
        asked = {"alpha": 0.9, "spectral_embeddings": True}
        out = merge_tensor(method, base, sources, asked, None, ctx)
        expected = ORACLES[method](base.numpy(), [s.numpy() for s in sources], alpha=0.9)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight")  # other matrices: by SVD
    out = merge_tensor(method, base, sources, {"alpha": 0.9}, None, ctx)
    expected = ORACLES[method](base.numpy(), [s.numpy() for s in sources], alpha=0.9)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)
