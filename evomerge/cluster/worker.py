"""The worker side of the study service: one model held in memory, candidates merged into it.

A :class:`MergeWorker` loads the base and source tensors once, one model object, its tokenizer
and the evaluators; then :meth:`MergeWorker.run` merges each candidate recipe straight into the
model's parameters and evaluates it. Nothing is written to disk per candidate. It is a plain
class: the pool (:mod:`evomerge.cluster.pool`) runs it as a Ray actor, a test or a debugging
session can run it in process.

Which models a recipe may name: the worker holds ``spec.base`` and ``spec.sources``. A recipe
may use any of them: its ``base`` (if it has one) and each of its ``sources`` must be one of the
held folders (the same path string, or the same folder once resolved), every model at most once.
So a task-arithmetic recipe over base + sources works, and so does a linear recipe (no base)
over the sources or a subset of them, all without reading anything again. The recipe's
``tokenizer_source`` is not used: the worker evaluates with the base's tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.adapters import AdapterFolder, Source, open_source
from evomerge.checkpoint import ModelFolder, check_compatible, path_labels
from evomerge.cluster.failures import is_sticky_cuda_error
from evomerge.dataflow.assemble import PathAssembler
from evomerge.dataflow.recipe import is_dataflow_recipe, parse_dataflow_recipe
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluate.documents import encode
from evomerge.evaluate.model_loading import fast_matmuls
from evomerge.memory import default_working_dtype
from evomerge.merge.engine import InPlaceMerger
from evomerge.merge.recipe import Recipe, parse_recipe, plan_recipe
from evomerge.merge.registry import get_method
from evomerge.util import format_bytes

Status = Literal["complete", "failed"]


class WorkerSpec(BaseModel):
    """What every worker of a pool holds: the models, the evaluators, the device."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="base model folder (its config and tokenizer are used)")
    sources: list[str] = Field(min_length=1, description="source model folders")
    evaluators: list[dict[str, Any]] = Field(
        min_length=1, description="evaluator mappings, as in a search config"
    )
    device: str = "cpu"
    working_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype candidates are built and scored in; None: bfloat16 on cuda"
    )
    fisher: list[str] | None = Field(
        None, description="each source's Fisher-diagonal folder, in order (method fisher)"
    )
    residency: Literal["auto", "device", "host"] = Field(
        "auto", description="where the base and sources stay: on the device, or on the host"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; None: the CPUs Ray gave the actor, else 1"
    )
    methods: list[str] = Field(
        default_factory=list,
        description="merge methods the study may use (their memory is planned); none: TIES's",
    )
    path_sources: list[int] = Field(
        default_factory=list,
        description="a data-flow study: models (0 the base) whose layers its paths use (planned)",
    )
    path_merges: int = Field(
        0, ge=0, description="a data-flow study: merges on its paths (each one more model)"
    )


@dataclass(frozen=True)
class CandidateTask:
    """One candidate to score: ``key`` is the trial number, ``recipe`` a recipe mapping
    (``Recipe.model_dump(exclude_defaults=True)``), ``limit`` the evaluators' subset size."""

    key: int
    recipe: dict[str, Any]
    limit: int | float | None = None
    attempt: int = 1
    split: str = "search"
    """The documents to score: ``search`` (the ones a study selects on) or ``holdout``."""
    documents: dict[str, list[int]] | None = None
    """Exactly these searched-on documents per task (an estimated fidelity's anchors)."""


@dataclass
class CandidateResult:
    """What became of a task. A failed result carries ``error`` as ``"{type}: {message}"``."""

    key: int
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str = ""
    attempt: int = 1
    scored_with: str = ""
    """The working dtype and device kind the candidate was scored with (``float32 on cuda``)."""
    documents: bytes | None = None
    """Per-document results (``evomerge.evaluate.documents.encode``), from evaluators that
    keep them."""
    worker_broken: bool = False
    """The error left the worker unusable (a sticky CUDA error): the pool replaces it and runs
    the candidate again on a fresh one, within ``max_attempts``."""
    timings: dict[str, Any] = field(default_factory=dict)
    """Where the time went, per phase (``merge_math``, ``transfer``, ``copy``, ``evaluation``
    seconds), and how evaluation ran (``batch_sizes``, ``oom_retries``)."""


def working_dtype(spec: WorkerSpec) -> torch.dtype:
    """The torch dtype a worker of ``spec`` builds and scores candidates in."""
    name = spec.working_dtype or default_working_dtype(spec.device)
    return getattr(torch, name)


def scored_with(dtype: torch.dtype, device: str) -> str:
    """How a model was scored, as recorded with each trial: ``float32 on cuda``."""
    return f"{str(dtype).removeprefix('torch.')} on {torch.device(device).type}"


def failed_result(task: CandidateTask, error: str, worker: str) -> CandidateResult:
    return CandidateResult(
        key=task.key, status="failed", error=error, worker=worker, attempt=task.attempt
    )


def _ray_assigned(resource: str) -> float | None:
    """How much of ``resource`` (``CPU``, ``GPU``) Ray assigned to the current actor, or None
    outside a Ray worker."""
    import sys

    if "ray" not in sys.modules:  # not running under Ray: do not import it for nothing
        return None
    import ray

    if not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:
            return None
        return float(context.get_assigned_resources().get(resource, 0.0)) or None
    except Exception:  # an old or unusual Ray: fall back to the default
        return None


def _same_folder(a: str, b: Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == b
    except OSError:
        return False


def _held_bytes(folder: Source) -> int:
    """Bytes a merger holds for ``folder``: a LoRA adapter's factors, a model's tensors."""
    if isinstance(folder, AdapterFolder):
        return sum(f.a.nbytes + f.b.nbytes for f in folder.factors.values())
    return sum(info.nbytes for info in folder.tensors.values())


class _ResidentView(InPlaceMerger):
    """An InPlaceMerger over some of another merger's resident models (shared, not copied)."""

    def __init__(self, parent: InPlaceMerger, indices: tuple[int, ...]) -> None:
        self.models = [parent.models[i] for i in indices]
        self.paths = tuple(parent.paths[i] for i in indices)
        self.device = parent.device
        self.resident = parent.resident
        self.tensors = [parent.tensors[i] for i in indices]


class MergeWorker:
    """Holds the models and evaluators; scores candidate recipes one at a time."""

    def __init__(self, spec: WorkerSpec | dict[str, Any], worker_id: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.evaluate import build_evaluator
        from evomerge.evaluate.suite import EvaluatorSuite

        start = time.perf_counter()
        self.spec = spec if isinstance(spec, WorkerSpec) else WorkerSpec.model_validate(spec)
        self.worker_id = worker_id
        threads = self.spec.torch_threads
        if threads is None:
            cpus = _ray_assigned("CPU")
            threads = max(1, round(cpus)) if cpus else 1
        torch.set_num_threads(threads)
        self.torch_threads = threads
        base = ModelFolder(self.spec.base, label="base")
        self.folders: list[Source] = [
            base,
            *(
                open_source(s, label=label, base=base)
                for s, label in zip(self.spec.sources, path_labels(self.spec.sources), strict=True)
            ),
        ]
        check_compatible(self.folders)  # type: ignore[arg-type]  # an adapter mirrors its base
        self.fisher_folders = [
            ModelFolder(path, label=f"fisher of {folder.label}", require_config=False)
            for path, folder in zip(self.spec.fisher or [], self.folders[1:], strict=False)
        ]
        """Each source's Fisher diagonal (``spec.fisher``), held after the models."""
        self.dtype = working_dtype(self.spec)
        fast_matmuls(self.spec.device)
        self.residency = self._residency()
        held = [*self.folders, *self.fisher_folders]
        self.merger = InPlaceMerger(held, device=self.spec.device, resident=self.residency)
        self._views: dict[tuple[int, ...], InPlaceMerger] = {tuple(range(len(held))): self.merger}
        self.model = AutoModelForCausalLM.from_pretrained(
            self.spec.base, dtype=self.dtype, trust_remote_code=False
        ).to(self.spec.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.spec.base)
        self.suite = EvaluatorSuite(
            [build_evaluator(config, self.model, self.tokenizer) for config in self.spec.evaluators]
        )
        self._assembler: PathAssembler | None = None
        self.load_seconds = time.perf_counter() - start

    def resident_bytes(self) -> int:
        """Bytes of the base and sources as held (their stored dtype; a LoRA adapter's
        factors, since the merger holds an adapter over the base as its factors only)."""
        held = [*self.folders, *self.fisher_folders]
        return sum(_held_bytes(folder) for folder in held)

    def _residency(self) -> str:
        """``device`` or ``host`` (see :func:`evomerge.memory.choose_residency`): with ``auto``
        the device when the memory plan (what ``evomerge check`` prints) fits the GPU memory
        this worker may use (its Ray share of the GPU, at most what is free). A plan whose
        fixed part (resident tensors, working model, CUDA context) does not fit is refused
        here, with the numbers: the evaluation can shrink its batch, the rest cannot."""
        spec = self.spec
        if torch.device(spec.device).type != "cuda":
            return "device" if spec.residency == "auto" else spec.residency
        from evomerge.memory import choose_residency, memory_inputs, plan_memory

        inputs = memory_inputs(
            spec.base,
            spec.sources,
            spec.evaluators,
            spec.device,
            spec.fisher,
            spec.methods,
            spec.path_sources,
            spec.path_merges,
        )
        plans = {
            where: plan_memory(
                inputs.models,
                inputs.arch,
                inputs.evaluations,
                device=spec.device,
                working_dtype=str(self.dtype).removeprefix("torch."),
                residency=where,
                fisher=inputs.fisher,
                merge_tensors=inputs.merge_tensors,
                merge_label=inputs.merge_label,
                path_sources=inputs.path_sources,
                path_merges=inputs.path_merges,
            )
            for where in ("device", "host")
        }
        free, total = torch.cuda.mem_get_info(torch.device(spec.device))
        share = min(1.0, _ray_assigned("GPU") or 1.0)
        usable = min(free, int(total * share))
        chosen, short = choose_residency(spec.residency, plans["device"], plans["host"], usable)
        if short is not None:
            of = f"{share:g} of " if share < 1 else ""
            raise ConfigError(
                f"{self.worker_id}: the models alone need {format_bytes(short)} of GPU memory "
                f"(resident tensors, working model, CUDA context; residency {chosen}) but this "
                f"worker may use {format_bytes(usable)} ({of}a {format_bytes(total)} GPU, "
                f"{format_bytes(free)} free): use residency: host, working_dtype: bfloat16, or "
                "fewer workers per GPU (evomerge check prints the whole plan)"
            )
        return chosen

    def info(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "load_seconds": self.load_seconds,
            "device": self.spec.device,
            "pid": os.getpid(),
            "torch_threads": self.torch_threads,
            "working_dtype": str(self.dtype).removeprefix("torch."),
            "residency": self.residency,
            "resident_bytes": self.resident_bytes(),
        }

    def _held_index(self, path: str, what: str) -> int:
        for index, held in enumerate([self.spec.base, *self.spec.sources]):
            if path == held:
                return index
        for index, folder in enumerate(self.folders):
            if _same_folder(path, folder.path):
                return index
        held = ", ".join(str(f.path) for f in self.folders)
        raise ConfigError(f"{what} {path} is not a model this worker holds ({held})")

    def _resolve(
        self, recipe: Recipe
    ) -> tuple[InPlaceMerger, list[Source], dict[int, ModelFolder]]:
        """The merger, the opened folders (labelled as the recipe names them) and the sources'
        Fisher diagonals (by source number, for a method that needs them) to plan with."""
        indices: list[int] = []
        labels: list[str] = []
        if recipe.base is not None:
            indices.append(self._held_index(recipe.base, "the recipe's base"))
            labels.append("base")
        for number, source in enumerate(recipe.sources):
            index = self._held_index(source.model, f"sources[{number}].model")
            if index in indices:
                raise ConfigError(
                    f"sources[{number}].model {source.model} is named twice in the recipe"
                )
            indices.append(index)
            label = source.label or self.folders[index].label
            labels.append(f"{label}#{number}" if label in labels else label)
        aux = self._fisher_for(recipe, indices[1:] if recipe.base is not None else indices)
        key = tuple(indices) + tuple(len(self.folders) + i - 1 for i in aux.values())
        if key not in self._views:
            self._views[key] = _ResidentView(self.merger, key)
        folders = []
        for index, label in zip(indices, labels):
            folder = copy.copy(self.folders[index])
            folder.label = label
            folders.append(folder)
        for folder in folders:  # an adapter applies to the recipe's base (plan_extra finds it)
            if isinstance(folder, AdapterFolder) and recipe.base is not None and indices[0] == 0:
                folder.base = folders[0]  # type: ignore[assignment]
        fisher = {number: self.fisher_folders[index - 1] for number, index in aux.items()}
        return self._views[key], folders, fisher

    def _fisher_for(self, recipe: Recipe, sources: list[int]) -> dict[int, int]:
        """For a method that weighs sources by their Fisher diagonals: recipe source number ->
        held model index of that source (its diagonal is held at the same offset); else {}."""
        if "fisher" not in get_method(recipe.method).aux:
            return {}
        if not self.fisher_folders:
            raise ConfigError(
                f"method '{recipe.method}' needs each source's Fisher diagonal, and this worker "
                "holds none: set 'fisher' in the study (one folder per source)"
            )
        found = {}
        for number, (source, index) in enumerate(zip(recipe.sources, sources, strict=True)):
            if index == 0:
                raise ConfigError(f"sources[{number}] is the base, which has no Fisher diagonal")
            held = self.fisher_folders[index - 1]
            if source.fisher and not _same_folder(source.fisher, held.path):
                raise ConfigError(
                    f"sources[{number}].fisher {source.fisher} is not the Fisher diagonal this "
                    f"worker holds for {source.model} ({held.path})"
                )
            found[number] = index
        return found

    # -- data-flow candidates ----------------------------------------------------------------

    def _paths(self) -> PathAssembler:
        """The assembler of data-flow candidates (made on first use)."""
        if self._assembler is None:
            self._assembler = PathAssembler(self.model, self.dtype, self.spec.device)
        return self._assembler

    def _build_path(self, task: CandidateTask) -> None:
        """Point the model's layer list at the held layers of the recipe's path: each model
        the path names is held once (a folder over its resident tensors, a merge built once)."""
        from transformers import AutoConfig

        recipe = parse_dataflow_recipe(task.recipe, where=f"trial {task.key} recipe")
        assembler = self._paths()
        held = {}
        for entry in recipe.models:
            if entry.model is not None:
                index = self._held_index(entry.model, f"models '{entry.label}'")
                folder = self.folders[index]
                if isinstance(folder, AdapterFolder):
                    raise ConfigError(
                        f"models '{entry.label}' is a LoRA adapter; a path takes layers of "
                        "whole models"
                    )
                key = ("folder", index)
                held[entry.label] = assembler.held.get(key) or assembler.folder_model(
                    key,
                    entry.label,
                    self.merger.tensors[index],
                    AutoConfig.from_pretrained(folder.path, trust_remote_code=False),
                )
                continue
            key = ("merge", json.dumps(entry.recipe, sort_keys=True))
            if key in assembler.held:  # planned and built for an earlier candidate
                held[entry.label] = assembler.held[key]
                continue
            inner = parse_recipe(entry.recipe or {}, where=f"models '{entry.label}' recipe")
            merger, folders, fisher = self._resolve(inner)
            plan = plan_recipe(inner, folders, fisher)
            held[entry.label] = assembler.merged_model(
                key,
                entry.label,
                lambda model, plan=plan, merger=merger: merger.merge_into(plan, model),
            )
        assembler.apply(recipe, held)

    def run(self, task: CandidateTask) -> CandidateResult:
        """Merge ``task.recipe`` into the model and evaluate it; errors a candidate can cause
        (bad recipe, NaN/Inf, out of memory, a failing evaluator) give a failed result, and
        one that leaves the GPU unusable also marks the worker broken (see ``failures``)."""
        start = time.perf_counter()
        merge_seconds: float | None = None
        timings: dict[str, Any] = {}
        try:
            if is_dataflow_recipe(task.recipe):
                held_before = self._paths().hold_seconds
                self._build_path(task)
                merge_seconds = time.perf_counter() - start
                timings.update(hold=self._paths().hold_seconds - held_before)
            else:
                if self._assembler is not None:
                    self._assembler.restore()
                recipe = parse_recipe(task.recipe, where=f"trial {task.key} recipe")
                merger, folders, fisher = self._resolve(recipe)
                plan = plan_recipe(recipe, folders, fisher)
                build = merger.merge_into(plan, self.model)
                merge_seconds = time.perf_counter() - start
                timings.update(
                    merge_math=build.math_seconds,
                    transfer=build.transfer_seconds,
                    copy=build.copy_seconds,
                )
            metrics, eval_seconds = self.suite.evaluate(task.limit, task.split, task.documents)
            per_document = encode(self.suite.last_documents) if self.suite.last_documents else None
            timings.update(
                evaluation=eval_seconds,
                batch_sizes=dict(self.suite.last_batch_sizes),
                oom_retries=self.suite.oom_retries,
            )
        except (EvomergeError, RuntimeError, ValueError) as exc:
            broken = is_sticky_cuda_error(exc)
            if self.spec.device.startswith("cuda") and not broken:
                torch.cuda.empty_cache()
            elapsed = time.perf_counter() - start
            return CandidateResult(
                key=task.key,
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
                merge_seconds=elapsed if merge_seconds is None else merge_seconds,
                eval_seconds=0.0 if merge_seconds is None else elapsed - merge_seconds,
                worker=self.worker_id,
                attempt=task.attempt,
                worker_broken=broken,
                timings=timings,
            )
        return CandidateResult(
            key=task.key,
            status="complete",
            metrics=metrics,
            merge_seconds=merge_seconds,
            eval_seconds=eval_seconds,
            worker=self.worker_id,
            attempt=task.attempt,
            scored_with=scored_with(self.dtype, self.spec.device),
            timings=timings,
            documents=per_document,
        )
