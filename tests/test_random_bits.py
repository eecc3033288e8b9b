"""The random masks (DARE, DELLA) against an independent NumPy oracle: the same bits on every
device and dtype, and ties in magnitude broken by index.

The oracle below is written from the rule documented in ``evomerge/merge/random_bits.py``
(SplitMix64 on uint64 NumPy arrays), not from the torch code, and the expected merges are
computed wholly in NumPy from it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from evomerge.merge import random_bits
from evomerge.merge.methods.sparsify import bernoulli_keep, della_magprune
from evomerge.merge.registry import TensorContext, merge_tensor

NAME = "model.layers.3.self_attn.q_proj.weight"


# --- the oracle -----------------------------------------------------------------------------


def oracle_key(seed: int, name: str, source: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{source}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def oracle_uniforms(seed: int, name: str, source: int, shape: tuple[int, ...]) -> np.ndarray:
    """float64 uniforms: the top 24 bits of the (i + 1)-th SplitMix64 output from the key."""
    n = math.prod(shape)
    with np.errstate(over="ignore"):
        z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z += np.uint64(oracle_key(seed, name, source))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float64) / 2.0**24).reshape(shape)


def oracle_ranks(delta: np.ndarray) -> np.ndarray:
    """Rank of each entry within its row (delta.reshape(shape[0], -1)) by ascending magnitude,
    equal magnitudes in index order."""
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    order = np.argsort(np.abs(rows), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(rows.shape[1])[None, :], axis=1)
    return ranks.reshape(delta.shape)


def oracle_della_probs(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    width = delta.reshape(delta.shape[0], -1).shape[1] if delta.ndim >= 2 else delta.size
    positions = np.arange(width, dtype=np.float64) / max(width - 1, 1)
    per_rank = (density - epsilon) + (2 * epsilon) * positions
    return per_rank[oracle_ranks(delta)]


def oracle_elect(deltas: list[np.ndarray]) -> list[np.ndarray]:
    """TIES sign election by mass (0 counts as +): which entries of each source agree."""
    tally = deltas[0].copy()
    for d in deltas[1:]:
        tally = tally + d
    majority = np.where(tally >= 0, 1.0, -1.0)
    return [np.sign(d) == majority for d in deltas]


def stable_index_mask(magnitude: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Entries at ranks [start, stop) of a stable ascending sort of the flat magnitudes."""
    flat = magnitude.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(flat, kind="stable")[start:stop]] = True
    return mask.reshape(magnitude.shape)


def random_array(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


# --- the uniforms ---------------------------------------------------------------------------

CASES = [
    (0, NAME, 0, (7, 13)),
    (0, NAME, 1, (7, 13)),
    (123456789, "lm_head.weight", 2, (3, 5, 4)),
    (2**40 + 7, "", 0, (1000,)),
    (7, "model.norm.weight", 0, ()),
    (7, "model.norm.weight", 0, (0, 4)),
    (99, NAME, 5, (300, 400)),  # more than one chunk on the CPU
]


@pytest.mark.parametrize(("seed", "name", "source", "shape"), CASES)
def test_uniforms_equal_the_numpy_oracle_bit_for_bit(seed, name, source, shape) -> None:
    ctx = TensorContext(name=name, seed=seed)
    got = ctx.uniform(shape, "cpu", source)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    expected = oracle_uniforms(seed, name, source, shape)
    assert np.array_equal(got.numpy().astype(np.float64), expected)
    assert np.array_equal(got.numpy(), expected.astype(np.float32))  # exact in float32


def test_uniforms_do_not_depend_on_the_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (37, 11)
    expected = oracle_uniforms(5, NAME, 3, shape)
    for chunk in (1, 7, 64, 1 << 20):
        monkeypatch.setattr(random_bits, "CPU_CHUNK", chunk)
        got = TensorContext(name=NAME, seed=5).uniform(shape, "cpu", 3)
        assert np.array_equal(got.numpy().astype(np.float64), expected), chunk


def test_uniforms_of_a_larger_tensor_equal_the_oracle() -> None:
    n = 3_000_001  # many CPU chunks, the last one partial
    got = TensorContext(name=NAME, seed=11).uniform((n,), "cpu", 0).numpy()
    expected = oracle_uniforms(11, NAME, 0, (n,))
    assert np.array_equal(got.astype(np.float64), expected)


def test_threshold_compares_exactly() -> None:
    # 0.5 + 2**-30 rounds to 0.5 in float32, yet the uniform 0.5 is below it.
    u = torch.tensor([0.5, 0.5 + 2**-24, 0.25], dtype=torch.float32)
    assert (u < random_bits.threshold(0.5 + 2**-30)).tolist() == [True, False, True]
    assert (u < random_bits.threshold(0.5)).tolist() == [False, False, True]
    probs = torch.tensor([0.5 + 2**-30, 0.5, 1.0], dtype=torch.float64)
    assert random_bits.thresholds(probs).tolist() == [0.5 + 2**-24, 0.5, 1.0]


# --- DARE and DELLA against the oracle ------------------------------------------------------


def _merge(method, base, sources, shared, per_source, seed=3, name=NAME):
    torch_sources = [torch.from_numpy(s) for s in sources]
    ctx = TensorContext(name=name, seed=seed)
    return merge_tensor(method, torch.from_numpy(base), torch_sources, shared, per_source, ctx)


def test_dare_linear_equals_the_numpy_oracle() -> None:
    shape = (24, 40)
    base = random_array(shape, 0)
    sources = [base + random_array(shape, 1), base + random_array(shape, 2)]
    per_source = [{"weight": 0.7, "density": 0.3}, {"weight": -0.4, "density": 0.8}]
    merged = _merge("dare_linear", base, sources, {}, per_source).numpy()

    mixed = np.zeros(shape)
    for index, (source, params) in enumerate(zip(sources, per_source, strict=True)):
        keep = oracle_uniforms(3, NAME, index, shape) < params["density"]
        mixed = mixed + params["weight"] * ((source - base) * keep / params["density"])
    np.testing.assert_allclose(merged, base + mixed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rescale", ["inverse_density", "none"])
def test_dare_ties_equals_the_numpy_oracle(rescale: str) -> None:
    shape = (16, 33)
    base = random_array(shape, 3)
    sources = [base + random_array(shape, 4 + i) for i in range(3)]
    per_source = [
        {"weight": 1.0, "density": 0.5},
        {"weight": 0.5, "density": 0.25},
        {"weight": 0.8, "density": 0.9},
    ]
    merged = _merge("dare_ties", base, sources, {"rescale": rescale}, per_source).numpy()

    deltas = []
    for index, (source, params) in enumerate(zip(sources, per_source, strict=True)):
        keep = oracle_uniforms(3, NAME, index, shape) < params["density"]
        scale = params["density"] if rescale == "inverse_density" else 1.0
        deltas.append((source - base) * keep / scale)
    agree = oracle_elect(deltas)
    mixed = sum(p["weight"] * d * a for p, d, a in zip(per_source, deltas, agree, strict=True))
    np.testing.assert_allclose(merged, base + mixed, rtol=1e-12, atol=1e-12)


def test_della_equals_the_numpy_oracle() -> None:
    shape = (6, 50)
    rng = np.random.default_rng(7)
    base = rng.integers(-8, 9, size=shape) * 0.5  # sums with the deltas below are exact
    # Magnitudes from a small set: many ties, which must rank by index.
    deltas_in = [rng.integers(-4, 5, size=shape) * 0.25 for _ in range(2)]
    sources = [base + d for d in deltas_in]
    per_source = [
        {"weight": 1.0, "density": 0.5, "epsilon": 0.2},
        {"weight": 0.6, "density": 0.6, "epsilon": 0.3},
    ]
    merged = _merge("della", base, sources, {}, per_source).numpy()

    deltas = []
    for index, (source, params) in enumerate(zip(sources, per_source, strict=True)):
        delta = source - base
        probs = oracle_della_probs(delta, params["density"], params["epsilon"])
        keep = oracle_uniforms(3, NAME, index, shape) < probs
        deltas.append(delta * keep / probs)
    agree = oracle_elect(deltas)
    weights = [p["weight"] for p in per_source]
    mixed = sum(w * d * a for w, d, a in zip(weights, deltas, agree, strict=True))
    divisor = sum(w * a for w, a in zip(weights, agree, strict=True))
    divisor = np.where(divisor == 0, 1.0, divisor)
    np.testing.assert_allclose(merged, base + mixed / divisor, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_the_mask_is_the_same_for_every_dtype(method: str) -> None:
    # Values exact in float16 and bfloat16 (and with tied magnitudes): the same mask whatever
    # the dtype the tensors come in.
    shape = (8, 64)
    rng = np.random.default_rng(1)
    delta = rng.integers(1, 9, size=shape) * np.where(rng.random(shape) < 0.5, -0.5, 0.5)
    params = {"weight": 1.0, "density": 0.4}
    if method == "della_linear":
        params["epsilon"] = 0.3
        probs = oracle_della_probs(delta, 0.4, 0.3)
    else:
        probs = np.full(shape, 0.4)
    expected = oracle_uniforms(9, NAME, 0, shape) < probs
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        base = torch.zeros(shape, dtype=dtype)
        source = torch.from_numpy(delta).to(dtype)
        merged = merge_tensor(
            method, base, [source], {"rescale": "none"}, [params], TensorContext(NAME, seed=9)
        )
        assert np.array_equal((merged != 0).numpy(), expected), dtype
        assert torch.equal(merged[merged != 0].double(), source[merged != 0].double())


# --- ties in magnitude ----------------------------------------------------------------------


def _tied_delta(n: int = 90) -> np.ndarray:
    rng = np.random.default_rng(4)
    return rng.choice([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], size=n)


def test_ties_trimming_breaks_ties_by_index() -> None:
    delta = _tied_delta()
    n = delta.size
    for density in (0.1, 0.3, 0.5, 0.77):
        k = max(1, int(density * n))
        merged = _merge("ties", np.zeros(n), [delta], {}, [{"weight": 1.0, "density": density}])
        expected = stable_index_mask(np.abs(delta), n - k, n)
        assert np.array_equal(merged.numpy() != 0, expected), density


def test_breadcrumbs_breaks_ties_by_index() -> None:
    delta = _tied_delta()
    n = delta.size
    for density, gamma in ((0.5, 0.1), (0.3, 0.2), (0.8, 0.05)):
        target = int(density * n)
        bottom = max(0, n - target - int(gamma * n))
        params = {"weight": 1.0, "density": density, "gamma": gamma}
        merged = _merge("breadcrumbs", np.zeros(n), [delta], {}, [params])
        expected = stable_index_mask(np.abs(delta), bottom, bottom + target)
        assert np.array_equal(merged.numpy() != 0, expected), (density, gamma)


def test_della_ranks_equal_magnitudes_by_index() -> None:
    # One row of equal magnitudes: ranks are the indices, so the keep probability rises from
    # density - epsilon at the first entry to density + epsilon at the last.
    n = 200
    delta = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    params = {"weight": 1.0, "density": 0.5, "epsilon": 0.4}
    merged = _merge("della_linear", np.zeros(n), [delta], {}, [params]).numpy()
    probs = 0.1 + 0.8 * (np.arange(n) / (n - 1))
    keep = oracle_uniforms(3, NAME, 0, (n,)) < probs
    np.testing.assert_allclose(merged, np.where(keep, delta / probs, 0.0), rtol=1e-12)


# --- statistics -----------------------------------------------------------------------------


def test_keep_fraction_is_the_density_and_sources_are_independent() -> None:
    n = 100_000
    ctx = TensorContext(name=NAME, seed=0)
    first, second = ctx.uniform((n,), "cpu", 0), ctx.uniform((n,), "cpu", 1)
    for density in (0.1, 0.5, 0.9):
        kept = merge_tensor(
            "dare_linear",
            torch.zeros(n),
            [torch.ones(n)],
            {"rescale": "none"},
            [{"weight": 1.0, "density": density}],
            ctx,
        )
        # Binomial(n, density): allow 5 standard deviations.
        bound = 5 * math.sqrt(n * density * (1 - density))
        assert abs(int((kept != 0).sum()) - n * density) < bound, density
        both = int(((first < density) & (second < density)).sum())
        p_both = density * density
        assert abs(both - n * p_both) < 5 * math.sqrt(n * p_both * (1 - p_both)), density
    mean_bound = 5 * math.sqrt(1 / 12 / n)
    assert abs(float(first.double().mean()) - 0.5) < mean_bound
    # Other sources, tensor names and seeds draw other numbers.
    others = [
        second,
        TensorContext(name=NAME + ".x", seed=0).uniform((n,), "cpu", 0),
        TensorContext(name=NAME, seed=1).uniform((n,), "cpu", 0),
    ]
    for other in others:
        assert int((first == other).sum()) < 5  # 2**-24 chance per entry


# --- the same on a GPU ----------------------------------------------------------------------

GPU_CASES = [
    ("dare_linear", {}, [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.6}]),
    ("dare_ties", {}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.4}]),
    (
        "della",
        {},
        [
            {"weight": 1.0, "density": 0.5, "epsilon": 0.2},
            {"weight": 0.6, "density": 0.4, "epsilon": 0.1},
        ],
    ),
    (
        "della_linear",
        {"rescale": "none"},
        [
            {"weight": 1.0, "density": 0.5, "epsilon": 0.2},
            {"weight": 0.6, "density": 0.4, "epsilon": 0.1},
        ],
    ),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "shared", "per_source"), GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masks_same_bits_on_cuda_gpu_only(method, shared, per_source, dtype) -> None:
    ctx = TensorContext(name=NAME, seed=17)
    big = (2100, 2100)  # more elements than one CUDA chunk
    assert torch.equal(ctx.uniform(big, "cuda", 1).cpu(), ctx.uniform(big, "cpu", 1))
    # Magnitudes with ties, all values exact in bfloat16.
    shape = (384, 1000)
    generator = torch.Generator().manual_seed(0)
    base = (torch.randint(-16, 17, shape, generator=generator) * 0.25).to(dtype)
    sources = [
        base + (torch.randint(-8, 9, shape, generator=generator) * 0.125).to(dtype)
        for _ in per_source
    ]
    on_cpu = merge_tensor(method, base, sources, shared, per_source, ctx)
    on_gpu = merge_tensor(
        method, base.cuda(), [s.cuda() for s in sources], shared, per_source, ctx
    ).cpu()
    assert torch.equal(on_cpu != base.to(on_cpu.dtype), on_gpu != base.to(on_gpu.dtype))
    assert torch.equal(on_cpu, on_gpu)
    # The L1 rescale sums the whole tensor (in another order on the GPU): the masks still agree.
    delta = (sources[0] - base).float()
    for device in ("cpu", "cuda"):
        uniforms = ctx.uniform(shape, device, 0)
        if method.startswith("dare"):
            kept = bernoulli_keep(delta.to(device), 0.3, uniforms, "l1")
        else:
            kept = della_magprune(delta.to(device), 0.5, 0.2, uniforms, "l1")
        if device == "cpu":
            on_cpu_mask = kept != 0
        else:
            assert torch.equal(on_cpu_mask, (kept != 0).cpu())
