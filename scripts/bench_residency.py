#!/usr/bin/env python
"""Benchmark merge memory and residency: pieces vs one piece, device vs host residency.

1. **Temporaries**: one tensor (``--shape``) merged from ``--sources`` sources with TIES,
   DARE-TIES and DELLA, a piece at a time (the default) and in one piece (every source's task
   vector at once, as the stacking code did). Prints ms per merge (best of ``--repeats``) and the
   peak memory torch allocated during it, in tensors of the shape's float32 size: on a CPU
   from the profiler's memory records, on CUDA from ``max_memory_allocated``.
2. **Residency**: a random Llama family (``--hidden``, ``--intermediate``, ``--layers``,
   ``--dtype``) built in a temporary folder, merged with TIES into one model object by an
   ``InPlaceMerger`` holding the tensors on the device and one holding them in (pinned) host
   memory. Prints ms per candidate (best of ``--repeats``) split by phase (merge math, copy,
   host-to-device transfer), and checks both give the same model.

Runs on the CPU, and on CUDA too when a GPU is there (``--devices`` to choose). Example::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_residency.py
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.checkpoint import ModelFolder  # noqa: E402
from evomerge.merge.engine import InPlaceMerger, MergeTimings  # noqa: E402
from evomerge.merge.methods import task_arithmetic  # noqa: E402
from evomerge.merge.recipe import parse_recipe, plan_recipe  # noqa: E402
from evomerge.merge.registry import TensorContext, merge_tensor  # noqa: E402
from evomerge.random_family import build_random_family  # noqa: E402

METHODS = {
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1},
}


@contextlib.contextmanager
def one_piece() -> Iterator[None]:
    """Merge every tensor in one piece: all sources' task vectors at once."""
    saved = task_arithmetic.CHUNK_ELEMENTS, task_arithmetic.MIN_CHUNK_ELEMENTS
    task_arithmetic.CHUNK_ELEMENTS = task_arithmetic.MIN_CHUNK_ELEMENTS = 1 << 62
    try:
        yield
    finally:
        task_arithmetic.CHUNK_ELEMENTS, task_arithmetic.MIN_CHUNK_ELEMENTS = saved


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_ms(run: Callable[[], Any], device: str, repeats: int) -> float:
    run()  # warm up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def peak_bytes(run: Callable[[], Any], device: str) -> int:
    """Peak bytes torch allocated while ``run`` ran, above what was allocated before."""
    if device.startswith("cuda"):
        sync(device)
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        sync(device)
        return torch.cuda.max_memory_allocated() - held
    from evomerge.memory import peak_cpu_bytes

    return peak_cpu_bytes(run)


def bench_temporaries(args: argparse.Namespace, device: str) -> None:
    shape = tuple(args.shape)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(device)
    sources = [base + torch.randn(shape, generator=g).to(device) for _ in range(args.sources)]
    one = math.prod(shape) * 4
    ctx = TensorContext(name="bench.weight", seed=1)
    print(f"\n## Temporaries: one {list(shape)} float32 tensor, {args.sources} sources, {device}")
    print("| method | pieces: ms | pieces: peak | one piece: ms | one piece: peak |")
    print("|---|---:|---:|---:|---:|")
    for method, params in METHODS.items():
        per_source = [{"weight": 1.0 / (i + 1), **params} for i in range(args.sources)]

        def run(method: str = method, per_source: list = per_source) -> torch.Tensor:
            return merge_tensor(method, base, sources, {}, per_source, ctx)

        row = [method]
        for mode in (contextlib.nullcontext, one_piece):
            with mode():
                ms = best_ms(run, device, args.repeats)
                peak = peak_bytes(run, device) / one
            row += [f"{ms:.0f}", f"{peak:.2f} x"]
        print("| " + " | ".join(row) + " |")


def bench_residency(args: argparse.Namespace, device: str, work: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    dtype = getattr(torch, args.dtype)
    family = build_random_family(
        work / "family",
        sources=2,
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        dtype=dtype,
    )
    recipe = parse_recipe(
        {
            "method": "ties",
            "base": str(family["base"]),
            "sources": [
                {"model": str(family["ft_0"]), "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": str(family["ft_1"]), "parameters": {"weight": 0.5, "density": 0.3}},
            ],
        }
    )
    folders = [ModelFolder(family[name]) for name in ("base", "ft_0", "ft_1")]
    plan = plan_recipe(recipe, folders)
    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32).to(device)
    params = sum(t.numel() for t in model.parameters())
    stored = sum(i.nbytes for f in folders for i in f.tensors.values())
    print(
        f"\n## Residency: TIES of 2 sources into a {params / 1e6:.1f}M-parameter model, "
        f"inputs {stored / 2**20:.0f} MiB ({args.dtype}), {device}"
    )
    print("| resident | ms / candidate | math | copy | transfer | GB/s streamed |")
    print("|---|---:|---:|---:|---:|---:|")
    states = {}
    for resident in ("device", "host"):
        merger = InPlaceMerger(
            [ModelFolder(family[n]) for n in ("base", "ft_0", "ft_1")],
            device=device,
            resident=resident,
        )
        runs: list[tuple[float, MergeTimings]] = []
        merger.merge_into(plan, model)  # warm up
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            timings = merger.merge_into(plan, model)
            runs.append((time.perf_counter() - start, timings))
        total, timings = min(runs, key=lambda run: run[0])
        streamed = resident == "host" and device != "cpu"  # on a CPU nothing is copied
        rate = f"{timings.transfer_bytes / timings.transfer_seconds / 1e9:.1f}" if streamed else "-"
        print(
            f"| {resident} | {1000 * total:.0f} | {1000 * timings.math_seconds:.0f} | "
            f"{1000 * timings.copy_seconds:.0f} | {1000 * timings.transfer_seconds:.0f} | "
            f"{rate} |"
        )
        states[resident] = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    same = all(torch.equal(states["device"][n], states["host"][n]) for n in states["device"])
    print(f"\nhost and device residency give the same model: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda")
    parser.add_argument("--shape", nargs="+", type=int, default=[2048, 2048])
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory() as work:
        for device in devices:
            bench_temporaries(args, device)
            bench_residency(args, device, Path(work))


if __name__ == "__main__":
    main()
