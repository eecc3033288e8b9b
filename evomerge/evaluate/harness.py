"""The ``lm_eval`` evaluator: lm-eval tasks scored on the worker's in-memory model, many times.

Built once per worker: one ``HFLM`` wraps the model object and a task dict is loaded once. Each
``evaluate`` calls lm-eval's ``evaluate()`` (not ``simple_evaluate``, which reseeds the global
RNGs and rebuilds everything). What does not depend on the weights is prepared once and reused:
the requests of each subset (prompt rendering, few-shot contexts) and the tokenization of each
context/continuation pair. No response cache is used: lm-eval's cache is keyed by prompt, not by
weights, and would return stale scores after an in-place merge.

Subsets: ``limit`` picks a fixed, seeded sample of each task's documents, the same for every
candidate, and a larger limit contains the smaller one (both are prefixes of one seeded
permutation), so cheap fidelities rank candidates on comparable data.

Holdout: with ``holdout: FRACTION`` a share of each task's documents, chosen by a hash of the
task's name and the document's index (``base.holdout_indices``), is never scored by
``evaluate(split="search")``; ``evaluate(split="holdout")`` scores only those. Both go to
lm-eval as its own ``samples={task: [indices]}``, so the documents scored are exactly the chosen
ones; ``limit`` then samples within the split as above.

Batch size: ``batch_size: auto`` runs lm-eval's own search once per evaluator (that is, once per
worker), at the first request batch: on a CUDA model it probes forward passes of the longest
request of that first evaluation, starting at lm-eval's ``max_batch_size`` (64) and shrinking
by a tenth on each out-of-memory error; the size found is kept (lm-eval alone would search again
on every call). Elsewhere (CPU) nothing can run out of device memory, so "auto" is 64 without
probing. A later, longer request that runs out of memory is handled by the suite, which halves
the batch (``EvaluatorSuite``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from evomerge.bundled import bundled_folder
from evomerge.errors import EvaluationError
from evomerge.evaluate.base import (
    EvalResult,
    Evaluator,
    EvaluatorConfig,
    Split,
    check_limit,
    check_split,
    limit_count,
    split_indices,
)
from evomerge.evaluate.documents import TaskDocuments, margin_of, task_documents
from evomerge.evaluate.registry import register_evaluator

SUITES_ENV = "EVOMERGE_EVALUATORS"


class LmEvalConfig(EvaluatorConfig):
    """lm-eval tasks (or groups, or tags) run in process on the worker's model."""

    kind: Literal["lm_eval"] = "lm_eval"
    tasks: list[str] = Field(min_length=1)
    """lm-eval task, group or tag names to run; each task's metrics are reported as
    ``task/metric``."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples in every prompt, for all tasks; None keeps each task's own setting."""
    batch_size: int | Literal["auto"] = 64
    """Requests per forward pass of lm-eval's Hugging Face model wrapper, or "auto": lm-eval's
    own search for the largest that fits, once per worker on a CUDA model (64, lm-eval's
    maximum, elsewhere). Halved for the rest of the worker's life when it runs out of
    memory."""
    max_length: int | None = Field(default=None, ge=2)
    """Longest input in tokens; longer requests lose tokens from the left. None takes the
    model's context length from its config (or tokenizer), else lm-eval's 2048."""
    include_paths: list[Path] = Field(default_factory=list)
    """Extra folders of task YAMLs, searched after the bundled ``evaluators/`` suites."""
    bundled_suites: bool = True
    """Search the project's ``evaluators/`` folder (or ``$EVOMERGE_EVALUATORS``) for task
    YAMLs; false searches only ``include_paths`` (and lm-eval's built-in tasks)."""
    include_defaults: bool | Literal["auto"] = "auto"
    """lm-eval's built-in tasks: "auto" indexes them only when a task is not found locally."""
    subset_seed: int = 0
    """Seed of each task's document shuffle from which ``limit`` takes its subset: every
    candidate is scored on the same documents, and another seed draws other ones."""
    fewshot_seed: int = 1234
    """Seed of lm-eval's few-shot example draw, reset before each subset's prompts are built so
    every candidate sees the same prompts; 1234 is lm-eval's own default."""
    bootstrap_iters: int = Field(default=100, ge=0)
    """Draws for stderr of metrics without a closed form (0: no stderr at all)."""
    holdout: float | None = Field(default=None, gt=0, lt=1)
    """Fraction (0 < holdout < 1) of each task's documents held out: the search never scores
    them, and a study re-scores its front on them. Per task, round(holdout x documents) rounded
    half up, at least 1 and at least 1 left to search on (a task needs 2 documents); which ones
    depends only on the task's name and the document's index (a SHA-256), the same on every
    machine and for every seed. None: every document is searched on."""

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError(f"must be a whole number of at least 1 or 'auto', got {value!r}")


AUTO_MAX_BATCH_SIZE = 64
"""Where ``batch_size: auto`` starts its search, and what it is without one (lm-eval's
``max_batch_size`` default)."""


def probes_batch_size(device: Any) -> bool:
    """Whether ``batch_size: auto`` probes forward passes on ``device``: only on CUDA, where
    memory can run out; elsewhere the search would only cost time and return the maximum."""
    import torch

    return torch.device(device).type == "cuda"


def bundled_suites_dir() -> Path | None:
    """The project's ``evaluators/`` folder (or ``$EVOMERGE_EVALUATORS``), if it exists."""
    override = os.environ.get(SUITES_ENV)
    if override:
        return Path(override).expanduser().resolve()
    candidate = bundled_folder("evaluators")
    return candidate if candidate.is_dir() else None


def subset_indices(task_name: str, total: int, count: int, seed: int) -> list[int]:
    """``count`` of ``total`` document indices: a prefix of a permutation seeded by task and seed.

    Sorted, so documents keep their natural order; nested across counts by construction.
    """
    order = list(range(total))
    random.Random(f"{seed}:{task_name}").shuffle(order)
    return sorted(order[:count])


def quiet_lm_eval_logs() -> None:
    """Raise lm-eval's loggers to ERROR once (per-candidate INFO lines would flood worker logs).

    Set ``EVOMERGE_LM_EVAL_LOG=INFO`` (or another level) to keep them.
    """
    level = os.environ.get("EVOMERGE_LM_EVAL_LOG", "ERROR").upper()
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Swallow lm-eval's prints, warnings and progress bars during one call."""
    previous_multiproc = os.environ.get("DISABLE_MULTIPROC")
    # Bootstrapped stderr would otherwise fork a process pool per evaluation (unsafe with CUDA).
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        if previous_multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous_multiproc


def _anchor_data_files(config: dict[str, Any], yaml_dir: Path) -> None:
    """Resolve relative ``dataset_kwargs.data_files`` against the task's YAML folder.

    lm-eval hands them to ``datasets`` as they are, relative to the working directory. A path
    that exists only relative to the working directory is kept, for compatibility.
    """
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return
    task = config.get("task", yaml_dir.name)

    def anchor(path: Any) -> Any:
        if not isinstance(path, str) or "://" in path or Path(path).is_absolute():
            return path
        beside = yaml_dir / path
        if beside.exists() or any(ch in path for ch in "*?["):
            return str(beside)
        if Path(path).exists():
            return path
        raise EvaluationError(
            f"lm_eval task {task}: data file {path!r} not found "
            f"(looked in {yaml_dir} and in the working directory)"
        )

    files = kwargs["data_files"]
    if isinstance(files, dict):
        kwargs["data_files"] = {
            split: [anchor(p) for p in value] if isinstance(value, list) else anchor(value)
            for split, value in files.items()
        }
    elif isinstance(files, list):
        kwargs["data_files"] = [anchor(p) for p in files]
    else:
        kwargs["data_files"] = anchor(files)


def _task_manager(include_paths: list[Path], include_defaults: bool):  # type: ignore[no-untyped-def]
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=[str(p) for p in include_paths] or None, include_defaults=include_defaults
    )
    factory = getattr(manager, "_factory", None)
    if factory is not None and hasattr(factory, "_load_full_config"):
        original = factory._load_full_config

        def load_full_config(entry, overrides=None):  # type: ignore[no-untyped-def]
            config = original(entry, overrides)
            yaml_path = getattr(entry, "yaml_path", None)
            if yaml_path:
                _anchor_data_files(config, Path(yaml_path).resolve().parent)
            return config

        factory._load_full_config = load_full_config
    return manager


def _reusable_hflm_class():  # type: ignore[no-untyped-def]
    from lm_eval.models.huggingface import HFLM

    class ReusableHFLM(HFLM):
        """HFLM that memoizes tokenization of request pairs and never draws progress bars."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pair_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
            self._max_length_value: int | None = None
            self.detected_batch_size: int | None = None

        def _detect_batch_size(self, requests: Any = None, pos: int = 0) -> int:
            # lm-eval calls this at every request type of every call while the batch size is
            # "auto"; the size found replaces "auto", so it runs once.
            if isinstance(self.batch_size_per_gpu, int):
                return self.batch_size_per_gpu
            if probes_batch_size(self.device):
                size = int(super()._detect_batch_size(requests, pos))
            else:
                size = int(self.max_batch_size or AUTO_MAX_BATCH_SIZE)
            self.detected_batch_size = size
            self.batch_size_per_gpu = size
            return size

        @property
        def max_length(self) -> int:
            # HFLM re-derives this from the model config on every request; it never changes.
            if self._max_length_value is None:
                self._max_length_value = HFLM.max_length.fget(self)  # type: ignore[attr-defined]
            return self._max_length_value

        def _encode_pair(self, context: str, continuation: str):  # type: ignore[no-untyped-def]
            key = (context, continuation)
            encoded = self._pair_cache.get(key)
            if encoded is None:
                encoded = super()._encode_pair(context, continuation)
                self._pair_cache[key] = encoded
            return encoded

        def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return super().generate_until(requests, disable_tqdm=True)

    return ReusableHFLM


def _reuse_requests(task: Any, fewshot_seed: int) -> None:
    """Make ``task.build_all_requests`` build each distinct subset once, then reuse it.

    Requests depend on the documents, the prompt and the few-shot draw, never on the weights;
    reused ones get their responses cleared. The few-shot RNG is reseeded before each build so
    a subset's prompts do not depend on what was built before.
    """
    build = task.build_all_requests
    built: dict[tuple, list] = {}

    def build_all_requests(**kwargs: Any) -> None:
        key = tuple(
            sorted(
                (name, tuple(value) if isinstance(value, list) else repr(value))
                for name, value in kwargs.items()
            )
        )
        instances = built.get(key)
        if instances is None:
            if hasattr(task, "set_fewshot_seed"):
                task.set_fewshot_seed(seed=fewshot_seed)
            build(**kwargs)
            built[key] = task._instances
            return
        for instance in instances:
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = instances

    task.build_all_requests = build_all_requests


def _reuse_documents(task: Any) -> None:
    """Serve ``task.doc_iterator`` from a list built once, and ``dump_config`` from a copy.

    lm-eval re-reads every document through ``datasets`` row formatting and re-serializes the
    task config (source of its functions included) on every call; neither changes between
    candidates. The iteration order and doc ids are lm-eval's own.
    """
    from lm_eval.utils import create_iterator

    docs: list[Any] = []
    config: dict[str, Any] = {}

    def doc_iterator(
        *, rank: int = 0, limit: int | None = None, world_size: int = 1, samples: Any = None
    ):  # type: ignore[no-untyped-def]
        if not docs:
            docs.extend(task.eval_docs)
        if samples:
            chosen = set(samples)
            selected = enumerate(doc for index, doc in enumerate(docs) if index in chosen)
            return create_iterator(selected, rank=int(rank), world_size=int(world_size))
        limit = int(limit) if limit else None
        return create_iterator(
            enumerate(docs), rank=int(rank), limit=limit, world_size=int(world_size)
        )

    dump_config = task.dump_config

    def cached_dump_config() -> dict[str, Any]:
        if not config:
            config.update(dump_config())
        return dict(config)

    task.doc_iterator = doc_iterator
    task.dump_config = cached_dump_config


def _record_results(task: Any) -> list[tuple[Any, list[Any], dict[str, Any]]]:
    """Make ``task.process_results`` also append ``(doc, results, metrics)`` to the returned
    list, which the caller clears before each evaluation: lm-eval's own per-document metrics,
    kept without ``log_samples`` (whose JSON dumps and hashes cost more than scoring a toy
    task)."""
    rows: list[tuple[Any, list[Any], dict[str, Any]]] = []
    process = task.process_results

    def process_results(doc: Any, results: Any) -> Any:
        metrics = process(doc, results)
        rows.append((doc, list(results), metrics))
        return metrics

    task.process_results = process_results
    return rows


def _task_documents(
    task: Any, rows: list[tuple[Any, list[Any], dict[str, Any]]], indices: list[int] | None
) -> TaskDocuments:
    """Per-document results of ``task``'s last evaluation from its recorded rows. lm-eval
    scores a ``samples`` subset in dataset order (sorted ``indices``), once per filter: the
    first filter's rows are kept."""
    index = sorted(indices) if indices else list(range(len(task.eval_docs)))
    rows = rows[: len(index)]
    margins = []
    for doc, results, _ in rows:
        logliks = [
            result[0]
            for result in results
            if isinstance(result, tuple) and isinstance(result[0], int | float)
        ]
        if len(logliks) != len(results) or not logliks:
            margins.append(float("nan"))
        else:
            gold = task.doc_to_target(doc) if len(logliks) > 1 else None
            margins.append(margin_of(logliks, gold))
    return task_documents(index[: len(rows)], [metrics for _, _, metrics in rows], margins)


def _metric_key(task: str, key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return f"{task}/{metric}" if filter_name in ("", "none") else f"{task}/{metric},{filter_name}"


def metrics_from_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` block as flat ``task/metric`` floats ("N/A" stderrs dropped)."""
    flat: dict[str, float] = {}
    for task, entries in results.items():
        for key, value in entries.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            flat[_metric_key(task, key)] = float(value)
    return flat


@register_evaluator("lm_eval", LmEvalConfig)
class LmEvalEvaluator(Evaluator):
    """lm-eval tasks in process; one HFLM and one task dict for the evaluator's lifetime."""

    config: LmEvalConfig
    takes_documents = True

    def __init__(self, config: LmEvalConfig, model: Any, tokenizer: Any) -> None:
        super().__init__(config, model, tokenizer)
        self.default_limit = check_limit(config.limit, "lm_eval")
        self._splits: dict[str, dict[str, list[int]]] = {}
        quiet_lm_eval_logs()
        with _quiet_lm_eval():
            self.task_dict = self._load_tasks()
            self.tasks: dict[str, Any] = dict(self.task_dict["tasks"])
            for task in self.tasks.values():
                if config.num_fewshot is not None:
                    task.set_config(key="num_fewshot", value=config.num_fewshot)
                _reuse_requests(task, config.fewshot_seed)
                _reuse_documents(task)
            self._rows = {name: _record_results(task) for name, task in self.tasks.items()}
            hflm_kwargs: dict[str, Any] = {
                "batch_size": config.batch_size,
                "max_batch_size": AUTO_MAX_BATCH_SIZE,
            }
            if config.max_length is not None:
                hflm_kwargs["max_length"] = config.max_length
            self.lm = _reusable_hflm_class()(pretrained=model, tokenizer=tokenizer, **hflm_kwargs)

    @classmethod
    def preflight(cls, config: EvaluatorConfig) -> set[str] | None:
        """The task names are looked up (not loaded); the prefixes are every task, group and
        tag the searched folders know (a group's metrics are its tasks')."""
        assert isinstance(config, LmEvalConfig)
        with _quiet_lm_eval():
            return _known(_find_tasks(config))

    def _load_tasks(self) -> dict[str, Any]:
        manager = _find_tasks(self.config)
        wanted = list(dict.fromkeys(self.config.tasks))
        try:
            return manager.load(wanted)
        except EvaluationError:
            raise
        except Exception as exc:
            raise EvaluationError(
                f"lm_eval: could not load {', '.join(wanted)}: {type(exc).__name__}: {exc}"
            ) from exc

    @property
    def name(self) -> str:
        return f"lm_eval:{','.join(self.config.tasks)}"

    @property
    def batch_size(self) -> int:
        """Requests per forward pass now: the configured size, or the one ``auto`` found, or
        less after running out of memory; before an ``auto`` search, where it will start."""
        size = self.lm.batch_size_per_gpu if self.lm is not None else None
        return size if isinstance(size, int) else AUTO_MAX_BATCH_SIZE

    @property
    def detected_batch_size(self) -> int | None:
        """What ``batch_size: auto`` found (None before its first evaluation, or when the
        batch size is configured)."""
        return self.lm.detected_batch_size if self.lm is not None else None

    def resize_batch(self, size: int) -> None:
        """Use ``size`` from now on (before an ``auto`` search: instead of it)."""
        self.lm.batch_size_per_gpu = max(1, int(size))

    def split_documents(self, split: Split = "search") -> dict[str, list[int]]:
        """Each task's document indices in ``split`` (sorted; lm-eval's own indices). Worked
        out once per split (a hash per document), then reused: do not modify the lists."""
        owner = f"lm_eval evaluator ({', '.join(self.config.tasks)})"
        check_split(split, self.config.holdout, owner)
        if split not in self._splits:
            self._splits[split] = {
                name: split_indices(
                    name, len(task.eval_docs), self.config.holdout, split, f"lm_eval task {name}"
                )
                for name, task in self.tasks.items()
            }
        return dict(self._splits[split])

    def _samples(self, limit: int | float | None, split: Split) -> dict[str, list[int]] | None:
        """lm-eval's ``samples``: per task, the split's documents, of which ``limit`` takes a
        seeded subset; None when that is every document of every task."""
        samples = {}
        for name, indices in self.split_documents(split).items():
            total = len(self.tasks[name].eval_docs)
            count = limit_count(limit, len(indices))
            if count < len(indices):
                picked = subset_indices(name, len(indices), count, self.config.subset_seed)
                indices = sorted(indices[position] for position in picked)
            if len(indices) < total:
                samples[name] = indices
        return samples or None

    def chosen_documents(
        self, documents: Mapping[str, Sequence[int]]
    ) -> dict[str, list[int]] | None:
        """lm-eval's ``samples`` for explicit per-task document indices (an estimated
        fidelity's anchors). Each must be a searched-on document of a task of this evaluator:
        EvaluationError naming the task and index otherwise. Tasks not named score all their
        searched-on documents."""
        split = self.split_documents("search")
        samples = {}
        for name, indices in documents.items():
            if name not in split:
                raise EvaluationError(
                    f"lm_eval: documents given for {name!r}, which is not one of its tasks "
                    f"({', '.join(sorted(split))})"
                )
            allowed = set(split[name])
            chosen = sorted({int(index) for index in indices})
            stray = [index for index in chosen if index not in allowed]
            if stray:
                raise EvaluationError(
                    f"lm_eval task {name}: document {stray[0]} is not a searched-on document "
                    f"(it is held out, or past the task's {len(self.tasks[name].eval_docs)})"
                )
            if not chosen:
                raise EvaluationError(f"lm_eval task {name}: an empty list of documents")
            samples[name] = chosen
        for name, indices in split.items():
            if name not in samples and len(indices) < len(self.tasks[name].eval_docs):
                samples[name] = indices
        return samples or None

    def evaluate(
        self,
        limit: int | float | None = None,
        split: Split = "search",
        documents: Mapping[str, Sequence[int]] | None = None,
    ) -> EvalResult:
        """Scores at ``limit`` on ``split``, or (``documents``) on exactly those searched-on
        documents per task; the result keeps every scored document's results."""
        from lm_eval.evaluator import evaluate as lm_evaluate

        if self.model is None:
            raise EvaluationError("lm_eval evaluator was closed")
        chosen = check_limit(limit, "lm_eval") if limit is not None else self.default_limit
        start = time.perf_counter()
        if documents is not None:
            samples = self.chosen_documents(documents)
        else:
            samples = self._samples(chosen, split)
        was_training = self.model.training
        self.model.eval()
        for rows in self._rows.values():
            rows.clear()
        try:
            with _quiet_lm_eval():
                output = lm_evaluate(
                    lm=self.lm,
                    task_dict=self.task_dict,
                    samples=samples,
                    bootstrap_iters=self.config.bootstrap_iters,
                    log_samples=False,
                )
        finally:
            self.model.train(was_training)
        if output is None:
            raise EvaluationError("lm_eval returned no results (not rank 0?)")
        metrics = metrics_from_results(output["results"])
        if not metrics:
            raise EvaluationError(
                f"lm_eval: tasks {', '.join(self.config.tasks)} produced no numeric metrics"
            )
        sizes = {name: len(task.eval_docs) for name, task in self.tasks.items()}
        counted = {
            name: len(samples[name]) if samples and name in samples else total
            for name, total in sizes.items()
        }
        details: dict[str, Any] = {"docs": counted, "batch_size": self.batch_size}
        if self.detected_batch_size is not None:
            details["detected_batch_size"] = self.detected_batch_size
        per_document = {
            name: _task_documents(task, self._rows[name], samples.get(name) if samples else None)
            for name, task in self.tasks.items()
        }
        return EvalResult(
            metrics=metrics,
            seconds=time.perf_counter() - start,
            details=details,
            documents=per_document,
        )

    def close(self) -> None:
        self.lm = None
        self.task_dict = {}
        self.tasks = {}
        super().close()


def _include_paths(config: LmEvalConfig) -> list[Path]:
    paths: list[Path] = []
    bundled = bundled_suites_dir() if config.bundled_suites else None
    if bundled is not None:
        paths.append(bundled)
    for path in config.include_paths:
        resolved = path.expanduser().resolve()
        if not resolved.is_dir():
            raise EvaluationError(f"lm_eval: include path {path} is not a folder")
        paths.append(resolved)
    return paths


def _find_tasks(config: LmEvalConfig) -> Any:
    """A task manager that knows every task of ``config``; EvaluationError names the ones no
    searched folder (nor, unless ``include_defaults`` is false, lm-eval itself) has."""
    paths = _include_paths(config)
    wanted = list(dict.fromkeys(config.tasks))
    defaults = config.include_defaults
    manager = _task_manager(paths, include_defaults=defaults is True)
    missing = [name for name in wanted if name not in _known(manager)]
    if missing and defaults == "auto":
        local = manager
        manager = _task_manager(paths, include_defaults=True)
        missing = [name for name in wanted if name not in _known(manager)]
        if missing:
            manager = local
    if missing:
        raise EvaluationError(_unknown_tasks_message(missing, manager, paths, defaults))
    return manager


def _known(manager: Any) -> set[str]:
    names = set(manager.all_tasks)
    for attribute in ("all_groups", "all_tags"):
        names.update(getattr(manager, attribute, []))
    return names


def _unknown_tasks_message(
    missing: list[str], manager: Any, paths: list[Path], defaults: bool | str
) -> str:
    local = sorted(_known(manager)) if defaults is not True else []
    where = ", ".join(str(p) for p in paths) or "no include paths"
    text = f"lm_eval: unknown task or group {', '.join(missing)} (searched {where}"
    text += "; and lm-eval's built-in tasks)" if defaults in (True, "auto") else ")"
    if local:
        text += f"; available here: {', '.join(local)}"
    return text
