"""Bounded merge memory: task vectors merged a piece at a time, and sources held in host memory.

The piecewise merge (``generalized_task_arithmetic``) must give the same bits as merging the
tensor in one piece. The reference is a NumPy oracle written below from the methods' rules
(the module docstrings of ``task_arithmetic``, ``sparsify`` and ``random_bits``), not from the
torch code: every step is an IEEE elementwise operation done in the same order in NumPy, ranks
come from a stable NumPy sort, uniforms from SplitMix64 on uint64 arrays. One step is not
NumPy's: the L1 rescale's two norms are taken with ``torch.sum`` over the whole tensor, because
the method defines them as that reduction (whose order NumPy's pairwise sum does not share).
So no variant needs the old implementation as a reference.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.checkpoint import ModelFolder
from evomerge.memory import peak_cpu_bytes
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.engine import InPlaceMerger, MergeTimings
from evomerge.merge.methods import task_arithmetic
from evomerge.merge.methods.sparsify import kth_smallest, rank_cut
from evomerge.merge.registry import TensorContext, available_methods, get_method, merge_tensor
from tests.helpers import write_yaml

NAME = "model.layers.1.mlp.down_proj.weight"
SEED = 11

# --- the oracle -----------------------------------------------------------------------------

# method -> (sparsifier, sign election, normalize by default)
VARIANTS = {
    "ties": ("magnitude", True, True),
    "dare_linear": ("random", False, False),
    "dare_ties": ("random", True, False),
    "breadcrumbs": ("outliers", False, False),
    "breadcrumbs_ties": ("outliers", True, False),
    "della": ("della", True, True),
    "della_linear": ("della", False, False),
}


def oracle_uniforms(source: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """float64 uniforms: the top 24 bits of the (offset + i + 1)-th SplitMix64 output."""
    digest = hashlib.sha256(f"{SEED}\0{NAME}\0{source}".encode()).digest()
    key = np.uint64(int.from_bytes(digest[:8], "little"))
    n = math.prod(shape)
    with np.errstate(over="ignore"):
        z = np.arange(offset + 1, offset + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z += key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z >> np.uint64(40)).astype(np.float64) / 2.0**24).reshape(shape)


def stable_rank_mask(magnitude: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Entries at ranks [start, stop) of a stable ascending sort of the flat magnitudes."""
    flat = magnitude.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(flat, kind="stable")[start:stop]] = True
    return mask.reshape(magnitude.shape)


def torch_l1(array: np.ndarray) -> np.ndarray:
    """The L1 norm as the method defines it: torch's sum of the whole tensor."""
    return torch.from_numpy(np.abs(array)).sum().numpy()


def l1_rescale(delta: np.ndarray, masked: np.ndarray) -> np.ndarray:
    before, after = torch_l1(delta), torch_l1(masked)
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def oracle_sparsify(
    kind: str, delta: np.ndarray, params: dict, rescale: str, source: int
) -> np.ndarray:
    density, n, dt = params["density"], delta.size, delta.dtype.type
    if density >= 1 or n == 0:
        return delta
    magnitude = np.abs(delta).astype(np.float32)
    if kind == "magnitude":
        keep = stable_rank_mask(magnitude, n - max(1, int(density * n)), n)
        return delta * keep
    if kind == "outliers":
        bottom = max(0, n - int(density * n) - int(params["gamma"] * n))
        return delta * stable_rank_mask(magnitude, bottom, bottom + int(density * n))
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    uniforms = oracle_uniforms(source, rows.shape)
    if kind == "random":
        probs = np.full(rows.shape, density)
    else:
        width, epsilon = rows.shape[1], params["epsilon"]
        positions = np.arange(width, dtype=np.float64) / max(width - 1, 1)
        per_rank = (density - epsilon) + (2 * epsilon) * positions
        order = np.argsort(np.abs(rows), axis=1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(width)[None, :], axis=1)
        probs = per_rank[ranks]
    masked = rows * (uniforms < probs).astype(dt)
    if rescale in ("inverse_density", "inverse_prob"):
        masked = masked / probs.astype(dt)
    elif rescale == "l1":
        masked = l1_rescale(rows, masked)
    return masked.reshape(delta.shape)


def oracle_merge(
    method: str, base: np.ndarray, sources: list[np.ndarray], shared: dict, per_source: list
) -> np.ndarray:
    """The generalized task arithmetic merge, in NumPy, in the compute dtype of ``base``."""
    kind, consensus, normalize = VARIANTS[method]
    dt = base.dtype.type
    rescale = shared.get("rescale", "inverse_prob" if kind == "della" else "inverse_density")
    weighted_election = shared.get("weighted_election", False)
    weights = [dt(p["weight"]) for p in per_source]
    deltas = [
        oracle_sparsify(kind, s.astype(dt) - base, p, rescale, i)
        for i, (s, p) in enumerate(zip(sources, per_source, strict=True))
    ]
    if consensus:
        if weighted_election:
            deltas = [d * w for d, w in zip(deltas, weights, strict=True)]
        votes = deltas if shared.get("sign_election", "mass") == "mass" else map(np.sign, deltas)
        tally = None
        for vote in votes:
            tally = vote.copy() if tally is None else tally + vote
        majority = np.where(tally >= 0, dt(1), dt(-1))
        agree = [np.sign(d) == majority for d in deltas]
        if not weighted_election:
            deltas = [d * w for d, w in zip(deltas, weights, strict=True)]
        deltas = [d * a for d, a in zip(deltas, agree, strict=True)]
        divisor = np.zeros_like(base)
        for a, w in zip(agree, weights, strict=True):
            divisor = divisor + a.astype(dt) * w
        divisor = np.where(divisor == 0, dt(1), divisor)
    else:
        deltas = [d * w for d, w in zip(deltas, weights, strict=True)]
        divisor = weights[0]
        for w in weights[1:]:
            divisor = divisor + w
        divisor = dt(1) if abs(divisor) < 1e-8 else divisor
    mixed = deltas[0]
    for d in deltas[1:]:
        mixed = mixed + d
    if shared.get("normalize", normalize):
        mixed = mixed / divisor
    if shared.get("lambda", 1.0) != 1:
        mixed = mixed * dt(shared["lambda"])
    return base + mixed


# --- piecewise merges against the oracle ----------------------------------------------------

CASES = [
    ("ties", {}),
    ("ties", {"sign_election": "count", "lambda": 0.7}),
    ("ties", {"weighted_election": True, "normalize": False}),
    ("dare_ties", {}),
    ("dare_ties", {"rescale": "l1", "sign_election": "count"}),
    ("dare_linear", {"rescale": "none", "normalize": True}),
    ("dare_linear", {"rescale": "l1", "lambda": 1.3}),
    ("breadcrumbs", {}),
    ("breadcrumbs_ties", {"normalize": True}),
    ("della", {}),
    ("della", {"rescale": "l1"}),
    ("della_linear", {"rescale": "none"}),
]
SHAPES = [(37,), (9, 13), (3, 4, 5), (1, 30)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def per_source_params(method: str) -> list[dict[str, float]]:
    params = [{"weight": w, "density": d} for w, d in ((1.0, 0.5), (-0.6, 0.3), (0.45, 0.85))]
    if method.startswith("della"):
        for p, epsilon in zip(params, (0.1, 0.2, 0.05), strict=True):
            p["epsilon"] = epsilon
    if method.startswith("breadcrumbs"):
        for p, gamma in zip(params, (0.1, 0.0, 0.2), strict=True):
            p["gamma"] = gamma
    return params


def inputs(shape: tuple[int, ...], dtype: torch.dtype, tied: bool, seed: int):
    """A base and three sources; ``tied``: quarter steps, so magnitudes tie (exact in bf16)."""
    g = torch.Generator().manual_seed(seed)
    if tied:
        base = torch.randint(-8, 9, shape, generator=g) * 0.25
        deltas = [torch.randint(-4, 5, shape, generator=g) * 0.25 for _ in range(3)]
    else:
        base = torch.randn(shape, generator=g)
        deltas = [torch.randn(shape, generator=g) for _ in range(3)]
    return base.to(dtype), [(base + d).to(dtype) for d in deltas]


def bits(array: np.ndarray) -> np.ndarray:
    """The bit patterns (so -0.0 and 0.0 differ)."""
    return array.view(np.int64 if array.dtype == np.float64 else np.int32)


def assert_same_bits(merged: torch.Tensor, expected: np.ndarray, label: object) -> None:
    got = merged.numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape, label
    assert np.array_equal(bits(got), bits(expected)), (label, np.abs(got - expected).max())


@pytest.mark.parametrize(("method", "shared"), CASES)
def test_piecewise_merge_equals_the_numpy_oracle_bit_for_bit(method, shared, monkeypatch):
    per_source = per_source_params(method)
    ctx = TensorContext(name=NAME, seed=SEED)
    for chunk in (1, 5, None):
        if chunk is not None:
            monkeypatch.setattr(task_arithmetic, "CHUNK_ELEMENTS", chunk)
            monkeypatch.setattr(task_arithmetic, "MIN_CHUNK_ELEMENTS", 1)
        else:
            monkeypatch.undo()
        for shape in SHAPES:
            numel, tied = math.prod(shape), (len(shape) + (chunk or 0)) % 2 == 0
            for dtype in DTYPES if chunk != 1 else DTYPES[:1]:  # one element a piece: slow
                base, sources = inputs(shape, dtype, tied or dtype == torch.bfloat16, numel)
                merged = merge_tensor(method, base, sources, shared, per_source, ctx)
                compute = np.float64 if dtype == torch.float64 else np.float32
                expected = oracle_merge(
                    method,
                    base.to(torch.float64).numpy().astype(compute),
                    [s.to(torch.float64).numpy().astype(compute) for s in sources],
                    shared,
                    per_source,
                )
                assert_same_bits(merged, expected, (chunk, shape, dtype, tied))
            unit = shape[-1] if method.startswith("della") and len(shape) == 1 else 1
            if chunk is not None and unit == 1:  # the merge really went in several pieces
                assert task_arithmetic.piece_length(numel, 3) < numel


def test_pieces_take_whole_della_rows_and_respect_the_limits(monkeypatch) -> None:
    monkeypatch.setattr(task_arithmetic, "MIN_CHUNK_ELEMENTS", 4)
    monkeypatch.setattr(task_arithmetic, "CHUNK_ELEMENTS", 1000)
    assert task_arithmetic.piece_length(10_000, 2) == 1000  # capped
    assert task_arithmetic.piece_length(500, 2) == 50  # a tenth: 2 sources + 8 buffers
    assert task_arithmetic.piece_length(20, 2) == 4  # at least MIN_CHUNK_ELEMENTS
    assert task_arithmetic.piece_length(500, 2, unit=7) == 49  # whole rows of 7
    assert task_arithmetic.piece_length(500, 2, unit=3000) == 3000  # one row at least


def test_uniforms_with_an_offset_are_the_tensors_own() -> None:
    ctx = TensorContext(name=NAME, seed=SEED)
    whole = oracle_uniforms(2, (70_001,))
    for offset, size in ((0, 10), (3, 17), (40_000, 30_001), (69_990, 11)):
        got = ctx.uniform((size,), "cpu", 2, offset=offset).numpy().astype(np.float64)
        assert np.array_equal(got, whole[offset : offset + size]), offset
    with pytest.raises(ValueError, match="offset"):
        ctx.uniform((3,), "cpu", 2, offset=-1)


@pytest.mark.parametrize("tied", [False, True])
def test_kth_smallest_and_rank_cut_in_pieces_equal_a_stable_sort(tied: bool) -> None:
    rng = np.random.default_rng(5)
    n = 1000
    values = rng.integers(0, 6, n) * 0.5 if tied else np.abs(rng.standard_normal(n)) * 1e-3
    values[::97] = 0.0
    magnitude = values.astype(np.float32)
    ordered = np.sort(magnitude)
    for size in (1, 7, 250, n):

        def chunks(size: int = size):
            return (torch.from_numpy(magnitude[a : a + size]) for a in range(0, n, size))

        ks = [1, 2, 500, 999, 1000]
        for k, (value, below) in zip(ks, kth_smallest(chunks, ks), strict=True):
            assert value.dtype == torch.float32 and float(value) == ordered[k - 1]
            assert below == int((magnitude < ordered[k - 1]).sum())
        for start, stop in ((0, 1000), (0, 500), (300, 1000), (123, 877), (400, 400)):
            cut = rank_cut(chunks, n, start, stop)
            mask = torch.cat([cut.mask(chunk) for chunk in chunks()]).numpy()
            assert np.array_equal(mask, stable_rank_mask(magnitude, start, stop)), (size, start)


# --- the memory bound -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("della", {"epsilon": 0.1})],
)
def test_merge_temporaries_stay_below_the_documented_bound(method: str, params: dict) -> None:
    """One 4096 x 1024 float32 tensor, three sources: the peak of everything torch allocates
    during the merge (its result included) stays below MERGE_TEMPORARY_TENSORS tensors.
    (Stacking the three float32 task vectors and their masks, as before, needs about 9.)"""
    shape = (4096, 1024)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    sources = [base + torch.randn(shape, generator=g) for _ in range(3)]
    per_source = [{"weight": w, "density": 0.5, **params} for w in (1.0, 0.7, 0.4)]
    ctx = TensorContext(name=NAME, seed=SEED)
    peak = peak_cpu_bytes(lambda: merge_tensor(method, base, sources, {}, per_source, ctx))
    one_tensor = base.numel() * 4
    assert peak >= one_tensor  # the measurement sees the result at least
    assert peak <= task_arithmetic.MERGE_TEMPORARY_TENSORS * one_tensor, peak / one_tensor


SVD_METHODS = ("iso_c", "iso_cts", "tsv")
"""Methods whose 2-D merge is an SVD (slow on 2 CPU cores): measured on small matrices, a tall
and a square one (U and V^T are largest for a square matrix: about +0.75 copies at 4 : 1 -> 1 : 1;
a wide one measures like the tall one). Elementwise methods' peaks do not depend on the shape."""
FAMILY = tuple(v.name for v in task_arithmetic.VARIANTS)
"""The TIES/DARE family: flat in the number of sources (about 2.2 copies), each case several
seconds under the profiler; one source here, three in the test above."""


def declared_cases() -> list[tuple[str, int, tuple[int, ...]]]:
    """Every registered method, at 1 (or its minimum), 2 and 4 sources where it takes them, on
    a tall and a wide matrix (and, for the SVD methods, a square one and the 1-D fallback)."""
    cases = []
    for name in available_methods():
        method = get_method(name)
        counts = [
            n
            for n in sorted({max(1, method.min_sources), 2, 4})
            if n >= method.min_sources and (method.max_sources is None or n <= method.max_sources)
        ]
        shapes: list[tuple[int, ...]] = [(2048, 512), (512, 2048)]
        if name in SVD_METHODS:
            shapes = [(256, 64), (256, 256), (2048 * 512,)]
        elif name in FAMILY:
            counts, shapes = counts[:1], [(4096, 1024)]
        cases += [(name, n, shape) for n in counts for shape in shapes]
    return cases


def declared_params(name: str, n: int) -> tuple[dict, list[dict]]:
    """Valid parameters: weights and densities 0.5, ``t`` for SLERP and NearSwap."""
    shared = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.01}}.get(name, {})
    names = {p.name for p in get_method(name).per_source_params}
    per_source = {k: 0.5 for k in ("weight", "density") if k in names}
    return shared, [dict(per_source) for _ in range(n)]


@pytest.mark.parametrize(("method", "n", "shape"), declared_cases())
def test_every_method_stays_below_its_declared_temporaries(method, n, shape) -> None:
    """The peak torch allocates while one float32 tensor is merged (the result included) is at
    most the method's declared ``peak_temporaries(n)`` copies of it: the memory plan's merge
    term (``MergeMethod.temporaries``)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    sources = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    fisher = [torch.rand(shape, generator=g) for _ in range(n)]
    shared, per_source = declared_params(method, n)
    ctx = TensorContext(name=NAME, seed=SEED, aux={"fisher": fisher})
    peak = peak_cpu_bytes(lambda: merge_tensor(method, base, sources, shared, per_source, ctx))
    one_tensor = base.numel() * 4
    declared = get_method(method).peak_temporaries(n)
    assert peak <= declared * one_tensor, (method, n, shape, peak / one_tensor, declared)


# --- host residency -------------------------------------------------------------------------


def plan_for(method: str, family: dict[str, Path], tmp_path: Path):
    params = {"weight": 0.8, "density": 0.5}
    recipe = {
        "method": method,
        "base": str(family["base"]),
        "sources": [
            {"model": str(family["ft_0"]), "parameters": params},
            {"model": str(family["ft_1"]), "parameters": {"weight": 0.6, "density": 0.7}},
        ],
        "seed": 3,
    }
    return plan_from_file(write_yaml(tmp_path / f"{method}.yaml", recipe))[0]


def build(merger: InPlaceMerger, plan, base: Path, device: str = "cpu"):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    timings = merger.merge_into(plan, model)
    return {n: t.cpu() for n, t in model.state_dict().items()}, timings


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_host_residency_gives_the_same_model_and_streams_the_inputs(method, family, tmp_path):
    plan = plan_for(method, family, tmp_path)
    folders = [ModelFolder(p) for p in plan.models]
    on_device, device_times = build(InPlaceMerger(folders), plan, family["base"])
    host = InPlaceMerger([ModelFolder(p) for p in plan.models], resident="host")
    on_host, host_times = build(host, plan, family["base"])
    assert all(torch.equal(on_device[n], on_host[n]) for n in on_device)
    base = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    assert any(not torch.equal(t, on_host[n]) for n, t in base.state_dict().items())
    assert isinstance(host_times, MergeTimings)
    # Host residency reads every input of every job through the stream; device residency none.
    inputs = sum(
        host.read(ref).nbytes
        for job in plan.jobs
        for ref in [r for r in (job.base, *job.sources) if r is not None]
    )
    assert host_times.transfer_bytes == inputs > 0
    assert device_times.transfer_bytes == 0 and device_times.transfer_seconds == 0
    for timings in (device_times, host_times):
        assert timings.math_seconds > 0 and timings.copy_seconds > 0


def test_a_view_built_without_init_merges_like_its_parent(family, tmp_path) -> None:
    """What cluster/worker.py's _ResidentView does: set models, paths, device, tensors."""
    plan = plan_for("ties", family, tmp_path)
    parent = InPlaceMerger([ModelFolder(p) for p in plan.models], resident="host")
    view = InPlaceMerger.__new__(InPlaceMerger)
    view.models, view.paths = parent.models, parent.paths
    view.device, view.tensors = parent.device, parent.tensors
    expected, _ = build(parent, plan, family["base"])
    got, timings = build(view, plan, family["base"])
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert timings.transfer_bytes == 0  # resident defaults to "device"
    with pytest.raises(ValueError, match="resident"):
        InPlaceMerger([], resident="gpu")  # type: ignore[arg-type]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("method", ["dare_ties", "ties", "della"])
def test_host_residency_cuda_matches_device(method, family, tmp_path) -> None:
    plan = plan_for(method, family, tmp_path)
    device = InPlaceMerger([ModelFolder(p) for p in plan.models], device="cuda")
    host = InPlaceMerger([ModelFolder(p) for p in plan.models], device="cuda", resident="host")
    held = [t for group in host.tensors for t in group.values()]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in held)
    assert all(t.is_cuda for group in device.tensors for t in group.values())
    on_device, device_times = build(device, plan, family["base"], "cuda")
    on_host, host_times = build(host, plan, family["base"], "cuda")
    assert all(torch.equal(on_device[n], on_host[n]) for n in on_device)
    assert host_times.transfer_bytes > 0 and host_times.transfer_seconds > 0
    assert device_times.transfer_bytes == 0
    # A view of the host merger (as the worker builds them) streams too.
    view = InPlaceMerger.__new__(InPlaceMerger)
    view.models, view.paths = host.models, host.paths
    view.device, view.tensors = host.device, host.tensors
    through_view, view_times = build(view, plan, family["base"], "cuda")
    assert all(torch.equal(on_device[n], through_view[n]) for n in on_device)
    assert view_times.transfer_bytes == host_times.transfer_bytes


@CUDA
@pytest.mark.parametrize(("method", "shared"), CASES)
def test_piecewise_merge_on_cuda_equals_cpu_bit_for_bit_gpu_only(method, shared, monkeypatch):
    """Pieces on the GPU give the CPU's bits, except that the L1 rescale's whole-tensor sums
    add in another order there: those are compared with one piece on the GPU."""
    per_source = per_source_params(method)
    ctx = TensorContext(name=NAME, seed=SEED)
    for shape, dtype in (((300, 257), torch.float32), ((70_001,), torch.bfloat16)):
        base, sources = inputs(shape, dtype, True, 1)
        on_gpu = [base.cuda(), [s.cuda() for s in sources]]
        one_piece = merge_tensor(method, *on_gpu, shared, per_source, ctx).cpu()
        monkeypatch.setattr(task_arithmetic, "CHUNK_ELEMENTS", 4099)
        monkeypatch.setattr(task_arithmetic, "MIN_CHUNK_ELEMENTS", 1)
        pieces = merge_tensor(method, *on_gpu, shared, per_source, ctx).cpu()
        monkeypatch.undo()
        assert np.array_equal(bits(pieces.numpy()), bits(one_piece.numpy())), (shape, dtype)
        if shared.get("rescale") != "l1":
            on_cpu = merge_tensor(method, base, sources, shared, per_source, ctx)
            assert np.array_equal(bits(pieces.numpy()), bits(on_cpu.numpy())), (shape, dtype)


@CUDA
def test_merge_temporaries_on_cuda_stay_below_the_bound_gpu_only() -> None:
    shape = (4096, 4096)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).cuda()
    sources = [(base + torch.randn(shape, generator=g).cuda()) for _ in range(4)]
    per_source = [{"weight": 0.5, "density": 0.5}] * 4
    ctx = TensorContext(name=NAME, seed=SEED)
    for method in ("ties", "dare_ties"):
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        merge_tensor(method, base, sources, {}, per_source, ctx)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - held
        bound = task_arithmetic.MERGE_TEMPORARY_TENSORS * base.numel() * 4
        assert peak <= bound, (method, peak / (base.numel() * 4))
