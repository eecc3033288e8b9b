"""The study YAML: one file that says everything a study needs, stored in the database.

Relative paths (models, a space file, evaluator files) are resolved against the YAML's folder
when the study is created; the stored config holds absolute paths, so ``resume`` needs only
the storage URL and the study name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import ConfigError
from evomerge.evaluate.registry import anchor_evaluator_paths, parse_evaluator_config
from evomerge.optimize import Objective, parse_proposer_config
from evomerge.util import load_yaml, parse_size, pydantic_message

DEFAULT_STORAGE = "evomerge_studies.db"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetConfig(_Strict):
    """When the study ends: after ``trials`` finished trials and/or ``hours`` of wall time."""

    trials: int | None = Field(default=None, ge=1)
    """Finished trials (complete or failed, baselines included) after which the study ends."""
    hours: float | None = Field(default=None, gt=0)
    """Driver wall time, summed over every run of the study, after which it ends."""

    @model_validator(mode="after")
    def _some(self) -> BudgetConfig:
        if self.trials is None and self.hours is None:
            raise ValueError("give 'trials', 'hours' or both")
        return self


class FidelityConfig(_Strict):
    """Cheap fidelity first: every candidate scored on ``limit`` random documents per task, or
    on ``anchors`` chosen documents per task with its full score estimated; the best
    ``promote`` fraction of every ``batch`` finished trials re-scored on all documents."""

    limit: int | float | None = Field(default=None, gt=0)
    """Documents per task for the cheap score: a count, or a fraction between 0 and 1 (a
    fixed, seeded random subset). Give this or ``anchors``."""
    anchors: int | None = Field(default=None, ge=1)
    """Estimated fidelity: score this many anchor documents per task and estimate each task's
    full score from them (``lm_eval`` evaluators only). The anchors are chosen by clustering
    the documents on the per-document results of the fully scored trials (baselines first,
    then promotions) and re-chosen after every promotion; a proposal asked before there are
    two fully scored trials is scored on all documents."""
    promote: float = Field(default=0.25, gt=0, le=1)
    """Fraction of each batch re-scored on all documents (more than 0). Only full scores enter
    the Pareto front and ``best``, so a proposal that is never promoted is never compared."""
    batch: int = Field(default=10, ge=1)
    """Completed proposals per promotion round; the last, partial batch is promoted at the
    end of the study."""

    @field_validator("promote", mode="before")
    @classmethod
    def _promote(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise ValueError(
                f"must be more than 0, got {value:g}: without promotions no proposal is ever "
                "scored on all documents, so none could enter the Pareto front or be 'best' "
                "(leave 'fidelity' out to score every proposal on all documents)"
            )
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> FidelityConfig:
        if (self.limit is None) == (self.anchors is None):
            raise ValueError(
                "give 'limit' (a random subset of documents) or 'anchors' (chosen documents "
                "and an estimated score), not both or neither"
            )
        return self

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(
                f"a count of documents (1, 2, ...) or a fraction between 0 and 1, got {value}"
            )
        return value


class ClusterConfig(_Strict):
    """Ray: a local instance unless ``address`` names a cluster; one actor per worker."""

    address: str | None = None
    """A Ray cluster to join (``auto``, ``HOST:6379``); none starts a private local instance.
    ``RAY_ADDRESS`` (set by Ray Jobs) is used when this is empty."""
    workers: int = Field(default=2, ge=1)
    """Ray actors, each holding the base and sources in memory (one per GPU on a cluster)."""
    cpus_per_worker: float = Field(default=1, gt=0)
    """CPUs Ray reserves for each worker."""
    gpus_per_worker: float = Field(default=0, ge=0)
    """GPUs Ray reserves for each worker; must be > 0 with a ``cuda`` device."""
    trial_timeout: float | None = Field(default=None, gt=0)
    """Seconds a trial may run before its worker is killed and the trial fails."""
    max_attempts: int = Field(default=2, ge=1)
    """How often a trial is tried when its worker dies or is left broken (a sticky CUDA
    error such as an illegal memory access): it is re-run on a fresh worker."""
    start_timeout: float = Field(default=900, gt=0)
    """Seconds a worker may take to load the base and sources (a 7B family reads tens of GB
    and converts it on the CPU); the study stops with the reason when one takes longer."""
    residency: Literal["auto", "device", "host"] = "auto"
    """Where a worker keeps the base and sources (in their stored dtype): ``device`` (on the
    GPU), ``host`` (pinned host memory, streamed to the GPU one tensor at a time while a
    candidate is built) or ``auto`` (on the GPU when they fit beside the working model and
    the evaluation, else on the host). The same place on a CPU device."""


class ExportConfig(_Strict):
    """Defaults for ``evomerge export`` of this study's trials (its flags override them)."""

    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Dtype of the exported weights; none keeps the base model's."""
    shard_size: str = "5GB"
    """Largest safetensors shard, such as ``2GB`` or ``500MB``."""
    verify: bool = False
    """Re-score the exported folder and refuse it unless it matches the recorded metrics."""

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)  # a ValueError pydantic reports against this field
        return value


class StudyConfig(_Strict):
    """One study: what to merge, how to search, how to score, and when to stop."""

    name: str = Field(min_length=1, max_length=200)
    """The study's name in its database (``resume``, ``status`` and ``export`` take it)."""
    storage: str | None = None
    """A SQLAlchemy URL or a file path (SQLite); default ``evomerge_studies.db`` beside the YAML."""
    base: str
    """Folder of the base model (Hugging Face layout, safetensors) the sources were tuned from."""
    sources: list[str] = Field(min_length=1)
    """Folders of the fine-tunes to merge; each one's folder name is its label."""
    fisher: list[str] | None = None
    """Each source's Fisher-diagonal folder (``evomerge fisher``), in the order of ``sources``:
    needed by, and only accepted with, a space whose method weighs by them (``fisher``,
    ``fisher_task_arithmetic``: the ready ``fisher_per_layer`` space)."""
    space: str | dict[str, Any]
    """The search space: a ready space's name (``search_spaces/``), a YAML file, or a mapping
    (see Search spaces below)."""
    proposer: dict[str, Any] = Field(default_factory=lambda: {"kind": "cma"})
    """The optimizer that proposes genomes (see Proposers below)."""
    objectives: list[Objective] = Field(min_length=1)
    """Metrics to optimize; two or more make a Pareto front."""
    evaluators: list[dict[str, Any]] = Field(min_length=1)
    """What scores each candidate (see Evaluators below); their metrics are merged."""
    budget: int | BudgetConfig
    """A number of finished trials, or a ``BudgetConfig`` mapping with trials and/or hours."""
    fidelity: FidelityConfig | None = None
    """Score candidates on a subset first and promote the best; none scores all documents."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Where the workers run and how many."""
    export: ExportConfig = Field(default_factory=ExportConfig)
    """Defaults for exporting this study's trials."""
    baselines: bool = True
    """Score each source alone and the space's uniform merges first, as reference points."""
    device: str = "cpu"
    """Where workers merge and evaluate: ``cpu`` or ``cuda`` (each worker sees the GPU Ray gives
    it as ``cuda:0``)."""
    working_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The dtype a worker builds and scores candidates in (merge math is float32 per tensor,
    rounded to this); recorded with each trial, and an export's verification scores in it.
    None: bfloat16 on ``cuda`` (what users run; several times faster than float32), float32
    on ``cpu``."""
    snapshot_every: int = Field(default=50, ge=1)
    """Write the proposer's whole state every this many results (and every 30 s); results told
    since are replayed from the trials on resume."""

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        # Validate the mapping form directly so errors name its fields, not the int branch.
        if isinstance(value, dict):
            return BudgetConfig.model_validate(value)
        if isinstance(value, bool) or not isinstance(value, int | BudgetConfig):
            raise ValueError(
                f"a number of trials, or a mapping with 'trials' and/or 'hours'; got {value!r}"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(f"'{value}' is not a device name (cpu, cuda, cuda:0, ...)") from None
        return value

    @property
    def budget_trials(self) -> int | None:
        return self.budget if isinstance(self.budget, int) else self.budget.trials

    @property
    def budget_hours(self) -> float | None:
        return None if isinstance(self.budget, int) else self.budget.hours


def parse_study_config(data: dict[str, Any], where: str, folder: Path | None = None) -> StudyConfig:
    """Validate a study mapping; with ``folder``, resolve its relative paths against it."""
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_message(exc)}") from None
    if isinstance(config.budget, int) and config.budget < 1:
        raise ConfigError(f"{where}: budget: must be at least 1 trial, got {config.budget}")
    _check_gpus(config, where)
    if config.fisher is not None and len(config.fisher) != len(config.sources):
        raise ConfigError(
            f"{where}: fisher: one Fisher folder per source, in the order of sources: "
            f"{len(config.sources)} sources but {len(config.fisher)} Fisher folders"
        )
    if folder is not None:
        config = _resolved(config, folder)
    for index, evaluator in enumerate(config.evaluators):
        parse_evaluator_config(evaluator, where=f"{where}: evaluators[{index}]")
        if config.fidelity and config.fidelity.anchors and evaluator.get("kind") != "lm_eval":
            raise ConfigError(
                f"{where}: fidelity: anchors estimates lm_eval tasks' scores from per-document "
                f"results; evaluators[{index}] is '{evaluator.get('kind')}' (use 'limit', or "
                "lm_eval evaluators only)"
            )
    parse_proposer_config(config.proposer, where=f"{where}: proposer")
    return config


def _check_gpus(config: StudyConfig, where: str) -> None:
    """What Ray gives each worker must match the device it is told to use."""
    device = config.device
    gpus = config.cluster.gpus_per_worker
    if device.startswith("cuda") and gpus <= 0:
        raise ConfigError(
            f"{where}: device: {device} needs cluster.gpus_per_worker > 0 (Ray hides "
            "the GPUs from workers that ask for none)"
        )
    if device.startswith("cuda:") and device != "cuda:0":
        raise ConfigError(
            f"{where}: device: {device}: each worker sees only the GPU Ray gives it, as cuda:0; "
            "write device: cuda (cluster.workers sets how many GPUs are used)"
        )
    if gpus > 1:
        raise ConfigError(
            f"{where}: cluster.gpus_per_worker: {gpus:g}: a worker uses one GPU, so more would "
            "sit idle; use 1 (one worker per GPU), or a fraction such as 0.5 to share a GPU "
            "between workers whose models fit in that share of its memory"
        )


def worker_spec(config: StudyConfig, device: str | None = None) -> Any:
    """The :class:`~evomerge.cluster.worker.WorkerSpec` of the study's workers; ``device``
    overrides where (the working dtype stays the study's, so scores compare)."""
    from evomerge.cluster.worker import WorkerSpec
    from evomerge.memory import study_methods, study_path_models, study_working_dtype

    return WorkerSpec(
        base=config.base,
        sources=config.sources,
        evaluators=config.evaluators,
        device=device or config.device,
        fisher=config.fisher,
        working_dtype=study_working_dtype(config),  # type: ignore[arg-type]
        residency=config.cluster.residency,
        methods=study_methods(config),
        **study_path_models(config),
    )


def load_study_config(path: Path) -> StudyConfig:
    return parse_study_config(load_yaml(path), str(path), path.expanduser().resolve().parent)


def _resolved(config: StudyConfig, folder: Path) -> StudyConfig:
    def path(value: str) -> str:
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else (folder / candidate).resolve())

    space = config.space
    if isinstance(space, str) and (folder / space).exists():
        space = path(space)
    storage = config.storage or DEFAULT_STORAGE
    if "://" not in storage:
        storage = path(storage)
    return config.model_copy(
        update={
            "base": path(config.base),
            "sources": [path(s) for s in config.sources],
            "fisher": None if config.fisher is None else [path(f) for f in config.fisher],
            "space": space,
            "storage": storage,
            "evaluators": [anchor_evaluator_paths(dict(e), folder) for e in config.evaluators],
        }
    )
