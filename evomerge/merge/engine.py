"""Applying a :class:`MergePlan`, tensor by tensor, with one shared per-tensor function.

Two front ends:

- :func:`merge_to_folder` streams: it reads each input tensor lazily from safetensors, merges
  it, and hands it to a :class:`CheckpointWriter`; memory holds a few tensors, not the model.
- :class:`InPlaceMerger` keeps every source tensor in memory (on the device, or in pinned host
  memory streamed to the device a job at a time) and copies merged values into an existing
  model object's parameters: no disk, no new model. It times each phase (:class:`MergeTimings`).

Both call :func:`merge_job`, so the same plan gives the same tensors on the same device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from evomerge.adapters import AdapterFolder, LoraFactors
from evomerge.checkpoint import OTHER_FILES, TOKENIZER_FILES, ModelFolder, parse_dtype
from evomerge.errors import CheckpointError, MergeError
from evomerge.failpoints import failpoint
from evomerge.merge.card import model_card as default_card
from evomerge.merge.plan import MergePlan, TensorJob, TensorRef
from evomerge.merge.registry import MergeMethod, TensorContext, get_method
from evomerge.writer import CheckpointWriter

Reader = Callable[[TensorRef], torch.Tensor]


def merge_job(
    job: TensorJob,
    method: MergeMethod,
    read: Reader,
    *,
    seed: int = 0,
    input_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one output tensor. Returns it in the compute dtype (float32, or float64).

    Inputs are expected to be checked for NaN/Inf where they are read (see
    :func:`check_finite_tensor`).
    """

    def load(ref: TensorRef) -> torch.Tensor:
        tensor = read(ref)
        if input_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(input_dtype)
        return tensor

    if not job.sources:  # not a float tensor: the base's copy, as is
        assert job.base is not None
        return read(job.base)
    base = load(job.base) if job.base is not None else None
    sources = [load(ref) for ref in job.sources]
    aux = {name: [load(ref) for ref in refs] for name, refs in job.aux}
    ctx = TensorContext(name=job.name, seed=seed, aux=aux)
    merged = method.fn(base, sources, job.shared_dict(), job.per_source_dicts(), ctx)
    return merged if job.scale is None else merged * job.scale


def plan_methods(plan: MergePlan) -> dict[str, MergeMethod]:
    """The registered method of each name the plan merges with (see :meth:`MergePlan.method_of`)."""
    return {name: get_method(name) for name in plan.methods_used()}


def check_finite_tensor(tensor: torch.Tensor, ref: TensorRef, labels: Sequence[str] = ()) -> None:
    """Raise if a float tensor holds NaN or Inf. A finite sum proves it cheaply (one fused
    reduction); only a non-finite sum, which may be mere overflow, costs a full check."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        label = labels[ref.model] if ref.model < len(labels) else f"model {ref.model}"
        raise CheckpointError(f"model '{label}': tensor {ref.tensor} contains NaN or Inf")


def output_dtype(plan: MergePlan, job: TensorJob, read_dtype: torch.dtype) -> torch.dtype:
    if not job.sources:
        return read_dtype
    return parse_dtype(plan.out_dtype) or read_dtype


def _first_ref(job: TensorJob) -> TensorRef:
    return job.base if job.base is not None else job.sources[0]


def open_plan_models(plan: MergePlan, allow_pickle: bool = False) -> list[ModelFolder]:
    """Open the plan's models (already validated when the plan was built): LoRA adapters over
    their bases, Fisher folders without a config.json (see :func:`open_plan_sources`)."""
    from evomerge.adapters import open_plan_sources

    return open_plan_sources(plan, allow_pickle)  # type: ignore[return-value]


def merge_to_folder(
    plan: MergePlan,
    out_dir: str | os.PathLike[str],
    *,
    models: Sequence[ModelFolder] | None = None,
    device: str = "cpu",
    shard_size: int = 5 * 2**30,
    force: bool = False,
    model_card: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Stream the merge into a Hugging Face folder; nothing appears at ``out_dir`` on failure."""
    models = list(models) if models is not None else open_plan_models(plan, allow_pickle)
    methods = plan_methods(plan)
    input_dtype = parse_dtype(plan.input_dtype)
    dev = torch.device(device)

    def read_job(job: TensorJob) -> dict[TensorRef, torch.Tensor]:
        """Read (and check) a job's inputs; runs ahead of the merge in a worker thread."""
        refs = [r for r in (job.base, *job.sources) if r is not None]
        refs += [r for _, group in job.aux for r in group]
        tensors = {ref: models[ref.model].read(ref.tensor, dev) for ref in refs}
        if job.sources:
            for ref, tensor in tensors.items():
                check_finite_tensor(tensor, ref, plan.labels)
        return tensors

    layout = []
    for job in plan.jobs:
        info = models[_first_ref(job).model].tensors[_first_ref(job).tensor]
        layout.append((job.name, info.shape, output_dtype(plan, job, info.dtype)))
    with (
        CheckpointWriter(out_dir, layout, shard_size=shard_size, force=force) as writer,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        pending: Future[dict[TensorRef, torch.Tensor]] | None = None
        jobs = plan.jobs
        for index, job in enumerate(jobs):
            tensors = pending.result() if pending is not None else read_job(job)
            pending = pool.submit(read_job, jobs[index + 1]) if index + 1 < len(jobs) else None
            merged = merge_job(
                job,
                methods[plan.method_of(job)],
                tensors.__getitem__,
                seed=plan.seed,
                input_dtype=input_dtype,
            )
            out = merged.to(output_dtype(plan, job, tensors[_first_ref(job)].dtype))
            _check_merged_finite(job.name, out)  # the writer then removes its staged folder
            writer.add(job.name, out)
            del tensors, merged, out
            if progress is not None:
                progress(index + 1, len(jobs))
        _write_metadata(writer, plan, models, model_card)
        return writer.commit()


def _write_metadata(
    writer: CheckpointWriter, plan: MergePlan, models: Sequence[ModelFolder], model_card: str | None
) -> None:
    config_model = models[plan.config_model]
    config = dict(config_model.config)
    if plan.out_dtype:
        config["dtype"] = plan.out_dtype
        config.pop("torch_dtype", None)
    if plan.num_layers is not None and "num_hidden_layers" in config:
        before = config["num_hidden_layers"]
        config["num_hidden_layers"] = plan.num_layers
        for key, value in list(config.items()):  # per-layer entries (layer_types) follow
            if isinstance(value, list) and len(value) == before and key.startswith("layer_"):
                origins = plan.layer_origins or range(plan.num_layers)
                config[key] = [value[min(i, before - 1)] for i in origins]
    writer.write_json("config.json", config)
    tokenizer_dir = models[plan.tokenizer_model].path
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            writer.copy_file(tokenizer_dir / name)
    for name in OTHER_FILES:
        if (config_model.path / name).is_file():
            writer.copy_file(config_model.path / name)
    writer.write_text("README.md", model_card if model_card is not None else default_card(plan))


Residency = Literal["device", "host"]


@dataclass(frozen=True)
class MergeTimings:
    """Where the in-place build of one candidate spent its time, in seconds (on CUDA each
    phase ends with a synchronize, so the times are the device's, not the launches')."""

    math_seconds: float = 0.0
    """In :func:`merge_job`: the merge methods' arithmetic."""
    copy_seconds: float = 0.0
    """Casting to the output dtype, the finite check and the copy into the parameters."""
    transfer_seconds: float = 0.0
    """Streaming the inputs from host memory to the device (0 when they are resident there)."""
    transfer_bytes: int = 0
    """Bytes of inputs read through the host-to-device stream (on a CPU device: not copied)."""


class HeldAdapter(Mapping[str, torch.Tensor]):
    """A LoRA adapter as an :class:`InPlaceMerger` holds it: its low-rank factors and the
    base's held tensors (shared, not copied). Reading a tensor gives what
    :meth:`AdapterFolder.read` gives: the base's tensor where the adapter leaves it alone, else
    float32 ``base + B @ A * scaling``, computed on the device the base tensor is held on."""

    def __init__(
        self, base: Mapping[str, torch.Tensor], factors: Mapping[str, LoraFactors]
    ) -> None:
        self.base = base
        self.factors = dict(factors)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.base[name]
        factors = self.factors.get(name)
        if factors is None:
            return tensor
        return tensor.to(torch.float32) + factors.delta(tensor.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype ``self[name]`` has, without materializing it."""
        return torch.float32 if name in self.factors else self.base[name].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the factors (what this adapter adds to the memory held)."""
        return sum(f.a.nbytes + f.b.nbytes for f in self.factors.values())

    def on(
        self, name: str, device: torch.device, moved: dict[int, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """``self[name]`` built on ``device`` from the base tensor copied there (once per
        job: ``moved`` maps a held tensor's id to its copy) and the factors; and the bytes
        copied."""
        held = self.base[name]
        copied = 0
        tensor = moved.get(id(held))
        if tensor is None:
            tensor = held.to(device, non_blocking=held.is_pinned())
            moved[id(held)] = tensor
            copied += held.nbytes
        factors = self.factors.get(name)
        if factors is None:
            return tensor, copied
        copied += factors.a.nbytes + factors.b.nbytes
        return tensor.to(torch.float32) + factors.delta(device), copied


class InPlaceMerger:
    """Sources held in memory; each plan is merged straight into a model's parameters.

    ``resident="device"`` holds every tensor on ``device`` in its stored dtype. ``"host"``
    holds them in host memory (pinned when ``device`` is a CUDA GPU) and copies each job's
    inputs to the device just before merging it, so the device holds one job's inputs and
    temporaries at a time; the merged tensors are the same. The plan's models must be the ones
    this merger was built with (same paths, same order).

    A LoRA :class:`AdapterFolder` whose base is an earlier model of the merger is held as its
    factors only (a :class:`HeldAdapter` over that base's held tensors, where the base's are
    held); each adapted tensor is materialized, exactly, when a job reads it. An adapter over
    a base the merger does not hold is read whole, like any model.
    """

    resident: Residency = "device"
    """Where the tensors are held (a class default, for views built without ``__init__``)."""

    def __init__(
        self,
        models: Sequence[ModelFolder],
        *,
        device: str | torch.device = "cpu",
        check_finite: bool = True,
        resident: Residency = "device",
    ) -> None:
        if resident not in ("device", "host"):
            raise ValueError(f"resident must be 'device' or 'host', got {resident!r}")
        self.models = list(models)
        self.paths = tuple(str(m.path) for m in self.models)
        self.device = torch.device(device)
        self.resident = resident
        home = self.device if resident == "device" else torch.device("cpu")
        pin = resident == "host" and self.device.type == "cuda" and torch.cuda.is_available()
        self.tensors: list[Mapping[str, torch.Tensor]] = []

        def place(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.to(home)
            return tensor.pin_memory() if pin else tensor

        for index, model in enumerate(self.models):
            base = _held_base(model, self.paths[:index])
            if base is not None:
                factors = {
                    name: replace(f, a=place(f.a), b=place(f.b))
                    for name, f in model.factors.items()  # type: ignore[attr-defined]
                }
                if check_finite:
                    for name, f in factors.items():
                        for part in (f.a, f.b):
                            check_finite_tensor(part, TensorRef(0, name), [model.label])
                self.tensors.append(HeldAdapter(self.tensors[base], factors))
                continue
            held = {}
            for name in model.tensors:
                tensor = model.read(name, home)
                if check_finite:
                    check_finite_tensor(tensor, TensorRef(0, name), [model.label])
                held[name] = tensor.pin_memory() if pin else tensor
            self.tensors.append(held)
            model.close()

    def read(self, ref: TensorRef) -> torch.Tensor:
        """A held tensor, where it is held (see :meth:`fetch` for one on the device)."""
        return self.tensors[ref.model][ref.tensor]

    def _streams(self) -> bool:
        """Whether inputs go through the host-to-device stream: host residency, or held
        tensors on another device than the compute device (a view of a host merger)."""
        if self.resident == "host":
            return True
        plain = (g.base if isinstance(g, HeldAdapter) else g for g in self.tensors)
        held = next((t for group in plain for t in group.values()), None)
        if held is None:
            return False
        index = self.device.index  # "cuda" (no index) is the current device, held as cuda:N
        return held.device.type != self.device.type or (
            index is not None and held.device.index != index
        )

    def fetch(self, job: TensorJob) -> dict[TensorRef, torch.Tensor]:
        """One job's inputs on the compute device: each copied from host memory (asynchronous
        from pinned memory; the merge's kernels queue behind the copies)."""
        return self._fetch(job)[0]

    def _fetch(self, job: TensorJob) -> tuple[dict[TensorRef, torch.Tensor], int]:
        """:meth:`fetch`, and the bytes copied: an adapter's tensor is built on the device
        from its base's tensor (copied once per job) and its factors."""
        refs = [r for r in (job.base, *job.sources) if r is not None]
        refs += [r for _, group in job.aux for r in group]
        fetched = {}
        moved: dict[int, torch.Tensor] = {}
        copied = 0
        for ref in refs:
            group = self.tensors[ref.model]
            if isinstance(group, HeldAdapter):
                fetched[ref], nbytes = group.on(ref.tensor, self.device, moved)
                copied += nbytes
                continue
            held = group[ref.tensor]
            tensor = moved.get(id(held))
            if tensor is None:
                tensor = held.to(self.device, non_blocking=held.is_pinned())
                moved[id(held)] = tensor
                copied += held.nbytes
            fetched[ref] = tensor
        return fetched, copied

    def _dtype(self, ref: TensorRef) -> torch.dtype:
        """The dtype :meth:`read` gives for ``ref`` (an adapter's without building it)."""
        group = self.tensors[ref.model]
        if isinstance(group, HeldAdapter):
            return group.dtype(ref.tensor)
        return group[ref.tensor].dtype

    def merged_tensors(self, plan: MergePlan) -> Iterable[tuple[str, torch.Tensor]]:
        """Yield (name, merged tensor in its output dtype) for every job of the plan."""
        yield from self._merge_jobs(plan, _PhaseClock(self.device))

    def merge_into(self, plan: MergePlan, model: torch.nn.Module) -> MergeTimings:
        """Copy the merge of ``plan`` into ``model``'s parameters (tied weights stay tied);
        returns the time spent per phase."""
        targets = _named_tensors(model)
        clock = _PhaseClock(self.device)
        for name, merged in self._merge_jobs(plan, clock):
            target = targets.get(name)
            if target is None:
                raise CheckpointError(f"the model object has no parameter or buffer named {name}")
            if target.shape != merged.shape:
                raise CheckpointError(
                    f"parameter {name} has shape {list(target.shape)} in the model object but "
                    f"{list(merged.shape)} in the merge"
                )
            _check_merged_finite(name, merged)
            with torch.no_grad():
                target.copy_(merged)
            del merged
            clock.lap("copy")
            failpoint("mid_merge")  # a test kills the worker with the model half merged
        return clock.timings()

    def _merge_jobs(
        self, plan: MergePlan, clock: _PhaseClock
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor cast to its output dtype) per job, timed on ``clock`` (the
        caller times what it does with each tensor)."""
        if tuple(plan.models) != self.paths:
            raise CheckpointError(
                "this plan merges other models than the ones held in memory: "
                f"{list(plan.models)} vs {list(self.paths)}"
            )
        methods = plan_methods(plan)
        input_dtype = parse_dtype(plan.input_dtype)
        streams = self._streams()
        for job in plan.jobs:
            clock.start()
            if streams:
                inputs, copied = self._fetch(job)
                clock.lap("transfer", copied)
                read: Reader = inputs.__getitem__
            else:
                read = self.read
            method = methods[plan.method_of(job)]
            merged = merge_job(job, method, read, seed=plan.seed, input_dtype=input_dtype)
            del read
            if streams:
                del inputs
            clock.lap("math")
            stored = self._dtype(_first_ref(job))
            yield job.name, merged.to(output_dtype(plan, job, stored))


def _held_base(model: ModelFolder, earlier: Sequence[str]) -> int | None:
    """The index among ``earlier`` (paths of the models held before ``model``) of the base an
    adapter ``model`` applies to, or None (not an adapter, or its base is not held)."""
    if not isinstance(model, AdapterFolder):
        return None
    path = str(model.base.path)
    return earlier.index(path) if path in earlier else None


class _PhaseClock:
    """Adds up wall time per phase; on CUDA, synchronizes before each reading."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.seconds = {"math": 0.0, "copy": 0.0, "transfer": 0.0}
        self.bytes = 0
        self.last = time.perf_counter()

    def start(self) -> None:
        self._now()

    def lap(self, phase: str, nbytes: int = 0) -> None:
        previous = self.last
        self.seconds[phase] += self._now() - previous
        self.bytes += nbytes

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        self.last = time.perf_counter()
        return self.last

    def timings(self) -> MergeTimings:
        return MergeTimings(
            math_seconds=self.seconds["math"],
            copy_seconds=self.seconds["copy"],
            transfer_seconds=self.seconds["transfer"],
            transfer_bytes=self.bytes,
        )


def _check_merged_finite(name: str, merged: torch.Tensor) -> None:
    """A recipe can overflow (huge weights, a sum that cancels to zero in a normalization):
    fail the candidate, naming the tensor, rather than score a model full of NaN."""
    if merged.is_floating_point() and not bool(torch.isfinite(merged.sum())):
        if not bool(torch.isfinite(merged).all()):
            dtype = str(merged.dtype).removeprefix("torch.")
            raise MergeError(
                f"the merge produced NaN or Inf in tensor {name} (output dtype {dtype}; "
                "a value beyond its range becomes Inf)"
            )


def _named_tensors(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        named[name] = param
    for name, buf in model.named_buffers(remove_duplicate=False):
        named.setdefault(name, buf)
    return named
