"""SCE, RAM, RAM+ (tensor-local) and Arcee Fusion: numbers by hand, a NumPy reimplementation,
properties on every float dtype, parameter errors, and mergekit 0.1.5's kernels as an oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import ConfigError, MethodError
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.methods.arcee_fusion import importance, quartiles
from evomerge.merge.registry import TensorContext, get_method, merge_tensor

F64 = torch.float64
NAME = "model.layers.0.mlp.up_proj.weight"
CTX = TensorContext(name=NAME)
METHODS = ["sce", "ram", "ramplus_tl", "arcee_fusion"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected: Any, atol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=atol, rtol=0), (actual, expected)


def family_of(seed: int, shape: tuple[int, ...], count: int, dtype: torch.dtype = F64):
    """A base and ``count`` sources whose task vectors are sparse-ish (about 40% zeros)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=F64)
    sources = [
        base
        + 0.05
        * torch.randn(shape, generator=gen, dtype=F64)
        * (torch.rand(shape, generator=gen) > 0.4)
        for _ in range(count)
    ]
    return base.to(dtype), [s.to(dtype) for s in sources]


# --- NumPy reimplementations (float64) ------------------------------------------------------


def np_ram(base: np.ndarray, sources: list[np.ndarray], epsilon: float, plus: bool = False,
           r: float = 0.1, alpha: float = 0.2) -> np.ndarray:  # fmt: skip
    deltas = np.stack([s - base for s in sources]).reshape(len(sources), -1)
    is_set = np.abs(deltas) > epsilon
    deltas = np.where(is_set, deltas, 0.0)
    counts = is_set.sum(axis=0)
    merged = np.zeros(deltas.shape[1])
    for i in range(len(sources)):
        lam = 1.0
        if plus:
            shared = np.sum(is_set[i] & (counts > 1))
            unique = np.sum(is_set[i] & (counts == 1))
            lam = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
        for j in range(deltas.shape[1]):
            if counts[j] == 1:
                merged[j] += lam * deltas[i, j]
            elif counts[j] > 1:
                merged[j] += deltas[i, j] / counts[j]
    return base + merged.reshape(base.shape)


def np_sce(base: np.ndarray, sources: list[np.ndarray], select_topk: float) -> np.ndarray:
    deltas = np.stack([s - base for s in sources]).reshape(len(sources), -1)
    if select_topk < 1:
        var = deltas.var(axis=0)
        k = int(np.count_nonzero(var) * select_topk)
        keep = np.zeros(var.shape, dtype=bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        deltas = deltas * keep
    energy = (deltas**2).mean(axis=1)
    weights = (
        energy / energy.sum()
        if abs(energy.sum()) >= 1e-6
        else np.full(len(sources), 1 / len(sources))
    )
    majority = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == majority
    used = weights[:, None] * agree
    merged = (deltas * used).sum(axis=0) / np.maximum(used.sum(axis=0), 1e-6)
    return base + merged.reshape(base.shape)


def np_arcee_fusion(base: np.ndarray, source: np.ndarray) -> np.ndarray:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(source) + 1e-8, softmax(base) + 1e-8
    scores = np.abs(source - base) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    ordered = np.sort(scores.reshape(-1))
    q1, median, q3 = (ordered[int(f * (ordered.size - 1))] for f in (0.25, 0.5, 0.75))
    return np.where(scores >= median + 1.5 * (q3 - q1), source, base)


# --- RAM and RAM+ ---------------------------------------------------------------------------


def test_ram_by_hand() -> None:
    base = vec(1.0, 1.0, 1.0, 1.0, 1.0)
    a = base + vec(0.4, 0.2, 0.0, 0.05, -0.3)
    b = base + vec(0.2, 0.0, -0.6, 0.0, 0.1)
    # epsilon 0.1: entry 0 set in both (mean 0.3), 1 only in a, 2 only in b, 3 in none
    # (0.05 <= epsilon: dropped), 4 in both (mean -0.1).
    out = merge_tensor("ram", base, [a, b], {"epsilon": 0.1})
    close(out, [1.3, 1.2, 0.4, 1.0, 0.9])


def test_ramplus_tl_lambda_by_hand() -> None:
    base = torch.zeros(4, dtype=F64)
    a = vec(1.0, 1.0, 0.0, 0.0)  # one overlapping entry, one unique: rho 1
    b = vec(1.0, 0.0, 1.0, 1.0)  # one overlapping, two unique: rho 0.5
    out = merge_tensor("ramplus_tl", base, [a, b], {"r": 0.5, "alpha": 0.8})
    # lambda_a = 1 + 0.5 * min(1, 0.8) = 1.4; lambda_b = 1 + 0.5 * 0.5 = 1.25
    close(out, [1.0, 1.4, 1.25, 1.25])
    # alpha 0 (or r 0) is plain RAM
    close(merge_tensor("ramplus_tl", base, [a, b], {"alpha": 0.0}), [1.0, 1.0, 1.0, 1.0])
    # no unique entry: rho = shared / epsilon, capped at alpha
    out = merge_tensor("ramplus_tl", base, [a, a], {"r": 2.0, "alpha": 0.25})
    close(out, [1.0, 1.0, 0.0, 0.0])
    lone = merge_tensor("ramplus_tl", base, [vec(0.0, 3.0, 0.0, 0.0)], {"r": 2.0, "alpha": 0.25})
    close(lone, [0.0, 3.0, 0.0, 0.0])  # all unique: rho 0, lambda 1


@pytest.mark.parametrize("epsilon", [1e-5, 0.02, 0.04])
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("shape", [(7,), (6, 5), (3, 2, 4)])
def test_ram_matches_numpy(epsilon: float, count: int, shape: tuple[int, ...]) -> None:
    base, sources = family_of(count * 100 + len(shape), shape, count)
    nb, ns = base.numpy(), [s.numpy() for s in sources]
    close(merge_tensor("ram", base, sources, {"epsilon": epsilon}), np_ram(nb, ns, epsilon))
    for r, alpha in [(0.1, 0.2), (1.5, 3.0)]:
        out = merge_tensor(
            "ramplus_tl", base, sources, {"epsilon": epsilon, "r": r, "alpha": alpha}
        )
        close(out, np_ram(nb, ns, epsilon, plus=True, r=r, alpha=alpha))


def test_ram_examples_exercise_both_branches() -> None:
    base, sources = family_of(300 + 2, (6, 5), 3)
    counts = sum(((s - base).abs() > 0.02).int() for s in sources)
    assert (counts == 1).any() and (counts > 1).any() and (counts == 0).any()


def test_toy_family_ram_epsilons_exercise_both_branches(family: dict[str, Path]) -> None:
    """The parity configs' epsilons (0.005 to 0.03) leave unique and overlapping entries."""
    from safetensors.torch import load_file

    def state(label: str) -> dict[str, torch.Tensor]:
        return load_file(str(next(family[label].glob("*.safetensors"))))

    base, sources = state("base"), [state(f"ft_{i}") for i in range(3)]
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"):
        for epsilon in (0.005, 0.01, 0.015, 0.02, 0.025, 0.03):
            counts = sum(((s[name] - base[name]).abs() > epsilon).int() for s in sources)
            assert (counts == 1).any() and (counts > 1).any(), (name, epsilon)
        # the default epsilon: (nearly) everything overlaps
        counts = sum(((s[name] - base[name]).abs() > 1e-5).int() for s in sources)
        assert (counts > 1).float().mean() > 0.99


# --- SCE ------------------------------------------------------------------------------------


def test_sce_by_hand() -> None:
    base = torch.zeros(3, dtype=F64)
    a, b = vec(1.0, -2.0, 0.5), vec(3.0, 1.0, -0.5)
    # energies 1.75 and 3.41667 -> weights; elected signs from sums (4, -1, 0): +, -, +.
    wa, wb = 1.75 / (1.75 + 41 / 12), (41 / 12) / (1.75 + 41 / 12)
    out = merge_tensor("sce", base, [a, b])
    close(out, [(wa * 1 + wb * 3) / (wa + wb), -2.0, 0.5])


def test_sce_select_topk_keeps_the_highest_variance_entries() -> None:
    base = torch.zeros(5, dtype=F64)
    a, b = vec(1.0, 0.0, 2.0, 0.5, 0.0), vec(-1.0, 0.0, 2.0, 0.0, 4.0)
    # variances: 1, 0, 0, 0.0625, 4 -> 3 nonzero; select_topk 0.7 keeps int(2.1) = 2: 4 and 0.
    out = merge_tensor("sce", base, [a, b], {"select_topk": 0.7})
    # kept: entry 0 (1, -1: sum 0 elects +, only a agrees) and entry 4 (only b).
    close(out, [1.0, 0.0, 0.0, 0.0, 4.0])
    close(out, np_sce(base.numpy(), [a.numpy(), b.numpy()], 0.7))
    # select_topk 0 keeps nothing: the base
    close(merge_tensor("sce", base, [a, b], {"select_topk": 0.0}), base)


def test_sce_ties_in_variance_keep_the_lower_index() -> None:
    base = torch.zeros(4, dtype=F64)
    a, b = vec(1.0, 1.0, 1.0, 1.0), vec(-1.0, -1.0, -1.0, -1.0)
    out = merge_tensor("sce", base, [a, b], {"select_topk": 0.5})
    close(out, [1.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_one_source_with_select_topk_1_gives_the_source(dtype: torch.dtype) -> None:
    base, (source,) = family_of(5, (6, 4), 1, dtype)
    out = merge_tensor("sce", base, [source], {"select_topk": 1.0})
    close(out, source.to(out.dtype), atol=1e-6)
    # one source has no variance across task vectors: a selection keeps nothing (as mergekit)
    close(merge_tensor("sce", base, [source], {"select_topk": 0.5}), base.to(out.dtype), atol=0)


@pytest.mark.parametrize("select_topk", [1.0, 0.9, 0.5, 0.1])
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("shape", [(9,), (6, 5), (2, 3, 4)])
def test_sce_matches_numpy(select_topk: float, count: int, shape: tuple[int, ...]) -> None:
    base, sources = family_of(count * 10 + len(shape), shape, count)
    out = merge_tensor("sce", base, sources, {"select_topk": select_topk})
    close(out, np_sce(base.numpy(), [s.numpy() for s in sources], select_topk))


# --- Arcee Fusion ---------------------------------------------------------------------------


def test_arcee_fusion_by_hand() -> None:
    base = torch.zeros(2, 8, dtype=F64)
    source = base.clone()
    source[0, 3] = 2.0  # a large change in row 0: high KL, high |diff|
    source[1] = 0.01  # a uniform shift in row 1: softmax unchanged, KL 0
    out = merge_tensor("arcee_fusion", base, [source])
    # importances: row 1 all 0, row 0 |diff| * KL_0: one nonzero entry. Quartiles all 0, so the
    # threshold is 0 and every entry reaches it: the source everywhere.
    close(out, source)
    source[0, 5] = 0.5
    source[1, 0] = 0.3
    scores = importance(source, base)
    q1, median, q3 = quartiles(scores)
    out = merge_tensor("arcee_fusion", base, [source])
    keep = scores < median + 1.5 * (q3 - q1)
    assert keep.any() and (~keep).any()
    close(out[keep], base[keep], atol=0)
    close(out[~keep], source[~keep], atol=0)
    close(out, np_arcee_fusion(base.numpy(), source.numpy()))


@pytest.mark.parametrize("shape", [(11,), (16, 33), (4, 5, 6)])
def test_arcee_fusion_keeps_the_base_below_median_plus_1_5_iqr(shape: tuple[int, ...]) -> None:
    base, (source,) = family_of(len(shape), shape, 1)
    out = merge_tensor("arcee_fusion", base, [source])
    close(out, np_arcee_fusion(base.numpy(), source.numpy()))
    changed = out != base
    assert changed.any() and (out == base).any()


def test_arcee_fusion_quartiles_are_exact_and_deterministic_beyond_a_million() -> None:
    values = torch.randperm(1_200_001, generator=torch.Generator().manual_seed(0)).float()
    # sorted values are 0..n-1: index int(q * (n - 1)) in float32 arithmetic
    assert quartiles(values).tolist() == [300_000.0, 600_000.0, 900_000.0]
    base, (source,) = family_of(9, (1100, 1000), 1, torch.float32)
    first = merge_tensor("arcee_fusion", base, [source])
    assert torch.equal(first, merge_tensor("arcee_fusion", base, [source]))


# --- mergekit's kernels as an oracle --------------------------------------------------------


def _mergekit_group(base: torch.Tensor, sources: list[torch.Tensor]) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        base=SimpleNamespace(tensor=base), non_base=[SimpleNamespace(tensor=s) for s in sources]
    )


@pytest.mark.parametrize("shape", [(7,), (16, 33), (5, 4, 3)])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_bit_identical_to_mergekit_kernels(shape: tuple[int, ...], count: int) -> None:
    sce_mod = pytest.importorskip("mergekit.merge_methods.sce")
    ram_mod = pytest.importorskip("mergekit.merge_methods.ram")
    fusion_mod = pytest.importorskip("mergekit.merge_methods.arcee_fusion")
    base, sources = family_of(count + 7 * len(shape), shape, count, torch.float32)
    group = _mergekit_group(base, sources)
    for topk in (1.0, 0.6, 0.2):
        theirs = sce_mod.sce_merge.implementation(group, select_topk=topk)
        assert torch.equal(merge_tensor("sce", base, sources, {"select_topk": topk}), theirs)
    for eps in (1e-5, 0.02):
        theirs = ram_mod.ram_merge.implementation(group, epsilon=eps)
        assert torch.equal(merge_tensor("ram", base, sources, {"epsilon": eps}), theirs)
        shared = {"epsilon": eps, "r": 0.7, "alpha": 1.5}
        theirs = ram_mod.ramplus_tl_merge.implementation(group, **shared)
        assert torch.equal(merge_tensor("ramplus_tl", base, sources, shared), theirs)
    theirs = fusion_mod.arcee_fusion_merge_method.implementation(_mergekit_group(base, sources[:1]))
    assert torch.equal(merge_tensor("arcee_fusion", base, sources[:1]), theirs)


# --- properties on every dtype --------------------------------------------------------------

SHARED = {
    "sce": {"select_topk": 0.5},
    "ram": {"epsilon": 0.02},
    "ramplus_tl": {"epsilon": 0.02, "r": 0.5, "alpha": 1.0},
    "arcee_fusion": {},
}


def _count(method: str) -> int:
    return 1 if method == "arcee_fusion" else 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(), (1,), (5,), (4, 6), (2, 3, 4)])
def test_shape_dtype_and_finiteness(
    method: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    base, sources = family_of(1, shape, _count(method), dtype)
    out = merge_tensor(method, base, sources, SHARED[method], ctx=CTX)
    assert out.shape == base.shape
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_zero_task_vectors_give_the_base(method: str, dtype: torch.dtype) -> None:
    base, _ = family_of(2, (4, 6), 1, dtype)
    sources = [base.clone() for _ in range(_count(method))]
    for shared in ({}, SHARED[method]):
        out = merge_tensor(method, base, sources, shared, ctx=CTX)
        assert torch.equal(out, base.to(out.dtype))


@pytest.mark.parametrize("method", METHODS)
def test_registered_with_mergekit_names_and_docs(method: str) -> None:
    spec = get_method(method)
    assert spec.mergekit_name == method
    assert spec.needs_base
    assert spec.doc and all(p.doc for p in spec.params)
    assert all(p.scope == "shared" for p in spec.params)


def test_defaults_are_mergekits() -> None:
    assert get_method("sce").param("select_topk").default == 1.0
    assert get_method("ram").param("epsilon").default == 1e-5
    plus = get_method("ramplus_tl")
    assert (plus.param("r").default, plus.param("alpha").default) == (0.1, 0.2)
    assert plus.param("epsilon").default == 1e-5
    assert get_method("arcee_fusion").params == ()


# --- errors ---------------------------------------------------------------------------------

X = torch.ones(3)


@pytest.mark.parametrize(
    ("method", "shared", "param"),
    [
        ("sce", {"select_topk": 1.5}, "select_topk"),
        ("sce", {"select_topk": -0.1}, "select_topk"),
        ("sce", {"select_topk": "many"}, "select_topk"),
        ("ram", {"epsilon": -1e-3}, "epsilon"),
        ("ramplus_tl", {"epsilon": 0.0}, "epsilon"),
        ("ramplus_tl", {"r": -0.5}, "r"),
        ("ramplus_tl", {"alpha": -0.2}, "alpha"),
        ("ram", {"r": 0.5}, "r"),
        ("sce", {"lambda": 1.0}, "lambda"),
        ("arcee_fusion", {"epsilon": 0.1}, "epsilon"),
    ],
)
def test_bad_parameters_name_method_parameter_and_tensor(
    method: str, shared: dict, param: str
) -> None:
    with pytest.raises(MethodError) as info:
        merge_tensor(method, X, [X], shared, ctx=CTX)
    message = str(info.value)
    assert f"'{method}'" in message and f"'{param}'" in message and NAME in message, message


@pytest.mark.parametrize("method", METHODS)
def test_weight_is_refused(method: str) -> None:
    with pytest.raises(MethodError, match="'weight'"):
        merge_tensor(method, X, [X], {}, [{"weight": 0.5}], CTX)


@pytest.mark.parametrize("count", [0, 2, 3])
def test_arcee_fusion_takes_exactly_one_source(count: int) -> None:
    with pytest.raises(MethodError, match=rf"exactly 1 .*got {count}"):
        merge_tensor("arcee_fusion", X, [X] * count, ctx=CTX)


@pytest.mark.parametrize("method", METHODS)
def test_base_and_sources_are_required(method: str) -> None:
    with pytest.raises(MethodError, match="needs a base"):
        merge_tensor(method, None, [X], ctx=CTX)
    with pytest.raises(MethodError, match="got 0"):
        merge_tensor(method, X, [], ctx=CTX)


@pytest.mark.parametrize("method", METHODS)
def test_mismatched_shapes_are_refused(method: str) -> None:
    with pytest.raises(MethodError, match="shape"):
        merge_tensor(method, X, [torch.ones(4)], ctx=CTX)


# --- mergekit configs -----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_mergekit_weight_is_refused_not_ignored(
    method: str, family: dict[str, Path], tmp_path: Path
) -> None:
    """mergekit 0.1.5 accepts a 'weight' for these methods and ignores it; evomerge refuses."""
    models = [{"model": str(family["ft_0"].resolve()), "parameters": {"weight": 0.5}}]
    if method != "arcee_fusion":
        models.append({"model": str(family["ft_1"].resolve())})
    config = {"merge_method": method, "base_model": str(family["base"].resolve()), "models": models}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"'weight'.*'{method}'"):
        plan_from_file(path)


def test_mergekit_arcee_fusion_with_two_sources_is_refused(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "arcee_fusion",
        "base_model": str(family["base"].resolve()),
        "models": [{"model": str(family[f"ft_{i}"].resolve())} for i in range(2)],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="exactly 1"):
        plan_from_file(path)
