"""``evomerge export``: one trial of a study, as a Hugging Face checkpoint.

The trial's stored recipe is merged by the streaming engine into a hidden staging folder next
to the output folder. The recipe (``evomerge_recipe.yaml``), a mergekit config when one merges
the same way (``mergekit_config.yml``), the study's plots (``images/pareto.png``,
``history.png``, ``recipe.png``) and a model card (``README.md``) that shows them are written
beside the weights; a plot that cannot be drawn is reported and left out, it fails nothing.
With ``verify`` the staged folder is loaded and scored again as the worker scored the trial
(its recorded working dtype and device kind, at the fidelity the database recorded), and must
match it; when the checkpoint is written in another dtype it is also scored as written, and the
card shows both, labelled. With ``as_lora`` the merged delta is also written as a PEFT LoRA
adapter in ``lora-rRANK/`` (see :mod:`evomerge.lora_export`) and the card reports its errors.
Only then is the folder renamed into place: after an error or Ctrl-C
nothing is left at the output folder or beside it. The merge runs on the study's device unless
told otherwise (random masks are the same bits on every device).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from evomerge.dataflow.mergekit import path_to_mergekit
from evomerge.dataflow.recipe import is_dataflow_recipe, plan_dataflow
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluate.suite import first_mismatch
from evomerge.failpoints import failpoint
from evomerge.merge.card import TrialCard, trial_card
from evomerge.merge.plan import MergePlan
from evomerge.staging import remove_abandoned, staging_folder
from evomerge.study.read import select_trial, trial_path_recipe, trial_recipe
from evomerge.study.store import StudyStore, TrialView, mask_url
from evomerge.util import parse_size

if TYPE_CHECKING:  # torch-heavy; imported where used so `evomerge --help` stays fast
    from evomerge.checkpoint import ModelFolder
    from evomerge.lora_export import LoraReport
    from evomerge.merge.recipe import Recipe
    from evomerge.study.config import ExportConfig

Progress = Callable[[int, int], None]
RECIPE_FILE = "evomerge_recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"
IMAGES_FOLDER = "images"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ExportVerificationError(EvomergeError):
    """The exported folder does not score what the study database recorded for the trial."""


@dataclass(frozen=True)
class ExportResult:
    """Where a trial was exported, its recorded scores, and what was checked and written."""

    path: Path
    number: int
    """The trial number."""
    label: str
    role: str
    metrics: dict[str, float]
    fidelity: str | None
    verified: bool
    mergekit_written: bool
    mergekit_reason: str | None
    """Why no mergekit config was written (None when it was)."""
    images: tuple[str, ...] = ()
    """The plots written beside the weights (``images/pareto.png`` ...), shown in the card."""
    images_skipped: tuple[str, ...] = ()
    """``"recipe.png: why"`` for each plot that could not be drawn (the export went on)."""
    holdout: dict[str, float] | None = None
    """The trial's scores on the held-out documents, when ``confirm`` measured them."""
    as_written: dict[str, float] | None = None
    """With ``verify``, when the checkpoint's dtype is not the working dtype: its scores as
    written (``written_dtype``), beside the recorded ones."""
    written_dtype: str | None = None
    device: str = "cpu"
    notes: tuple[str, ...] = ()
    """What the user should know: where it was merged when the study's device is missing."""
    lora: LoraReport | None = None
    """With ``as_lora``: the adapter written in the export (``lora.path``) and its errors."""


# -- the export ------------------------------------------------------------------------------


def export_trial(
    store: StudyStore,
    study: str,
    selector: str,
    out: str | os.PathLike[str],
    *,
    verify: bool | None = None,
    dtype: str | None = None,
    shard_size: int | None = None,
    force: bool = False,
    device: str | None = None,
    by: str = "search",
    progress: Progress | None = None,
    as_lora: int | None = None,
) -> ExportResult:
    """Merge a trial's recipe into ``out`` (see the module docstring); ``verify``, ``dtype``
    and ``shard_size`` default to the study's ``export`` settings, ``device`` to the study's
    device; ``by`` ranks ``best`` by the searched-on or the held-out score; ``as_lora`` also
    writes the merged delta as a LoRA adapter of that rank."""
    if as_lora is not None and as_lora < 1:
        raise ConfigError(f"--as-lora must be a rank of at least 1, not {as_lora}")
    config = store.study_config(study)
    settings = export_settings(config, study)
    verify = settings.verify if verify is None else verify
    if shard_size is None:
        shard_size = _shard_bytes(settings.shard_size, study)
    device, notes = export_device(config, device)
    target = Path(out).expanduser().resolve()
    _check_target(target, force)
    trial = select_trial(store, study, selector, by)
    parts = _prepare(store, study, trial, target, dtype or settings.dtype, as_lora)
    if trial.scored_with is None and draws_random_masks(parts.plan):
        notes.append(
            f"trial {trial.number} was scored by an evomerge that drew DARE/DELLA masks with "
            "torch's generator (it records no scored_with); the masks are drawn anew, the same "
            "on every device, so this merge is another random sample than the one scored and "
            "its scores may differ"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target, "evomerge-export")
    for abandoned in remove_abandoned(target, "evomerge-export"):  # an export killed earlier
        remove_abandoned(abandoned, "partial")  # ... and its writer's own hidden folder
    as_written: dict[str, float] | None = None
    written = None
    lora = None
    try:
        try:
            _write(parts, staging, device=device, shard_size=shard_size, progress=progress)
            card, skipped = _draw_images(store, study, trial, parts, staging)
            if verify:
                written = written_dtype(staging)
                changed = _dtype_change(trial, parts.recipe)
                as_written = _verify(staging, config, trial, device, written, changed, target)
                card = replace(
                    card,
                    verified=changed is None,
                    as_written=as_written or {},
                    written_dtype=written,
                    unverified_reason=changed,
                )
                if changed is not None:
                    notes.append(f"not verified: {changed}; its scores as written are shown")
            if as_lora is not None:
                lora = _write_lora(config, parts, staging, as_lora, device)
                card = replace(card, lora=lora)
            (staging / "README.md").write_text(trial_card(parts.plan, card))
        except OSError as exc:  # a full disk, a quota, a folder made read-only
            raise EvomergeError(
                f"cannot write the export of trial {trial.number} in {target.parent}: "
                f"{exc.strerror or exc}; nothing was left at {target}"
            ) from None
        failpoint("export_before_rename")  # a test kills the export with every file written
        _move_into_place(staging, target, force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    store.record_export(study, trial.number, str(target), verify)
    fidelity, metrics = trial.search_scores
    return ExportResult(
        path=target,
        number=trial.number,
        label=trial.label,
        role=trial.role,
        metrics=dict(metrics),
        fidelity=fidelity,
        verified=verify and card.verified,
        mergekit_written=parts.mergekit is not None,
        mergekit_reason=parts.card.mergekit_reason,
        images=tuple(path for path, _ in card.images),
        images_skipped=tuple(skipped),
        holdout=dict(trial.holdout) or None,
        as_written=as_written,
        written_dtype=written,
        device=device,
        notes=tuple(notes),
        lora=lora,
    )


def draws_random_masks(plan: MergePlan) -> bool:
    """Whether merging ``plan`` drops entries at random (a DARE/DELLA source below density 1)."""
    from evomerge.merge.registry import get_method

    return any(
        float(params.get("density", 1.0)) < 1.0
        for job in plan.jobs
        if get_method(plan.method_of(job)).random_masks
        for params in job.per_source_dicts()
    )


def export_device(config: Mapping[str, Any], device: str | None) -> tuple[str, list[str]]:
    """Where to merge and verify: ``device`` if given, else the study's own device; a study
    run on GPUs exported on a machine without one merges on the CPU, and a note says so."""
    if device is not None:
        return device, []
    wanted = str(config.get("device") or "cpu")
    import torch

    kind = torch.device(wanted).type
    if kind == "cuda" and not torch.cuda.is_available():
        return "cpu", [
            f"the study ran on {wanted} but this machine has no GPU: merged on cpu (random "
            "masks are the same on every device; float rounding may differ slightly)"
        ]
    return wanted, []


@dataclass(frozen=True)
class _Parts:
    """Everything an export writes, worked out before anything is written."""

    plan: MergePlan
    recipe: Recipe
    recipe_yaml: str
    mergekit: dict[str, Any] | None
    card: TrialCard


def _prepare(
    store: StudyStore,
    study: str,
    trial: TrialView,
    target: Path,
    dtype: str | None,
    as_lora: int | None = None,
) -> _Parts:
    from evomerge.merge.recipe import open_fisher_folders, open_recipe_models, plan_recipe

    how = None
    if is_dataflow_recipe(trial.recipe):
        path = trial_path_recipe(trial, study, dtype)
        if as_lora is not None:
            raise ConfigError(
                f"trial {trial.number} is a layer path ({len(path.path)} layers); --as-lora "
                "writes a merge's delta over its base, which a path does not have"
            )
        plan = plan_dataflow(path)
        mergekit, reason = path_to_mergekit(path)
        recipe: Any = path
        how = f"a layer path of {path.describe()}"
        config_folder = _open_config_model(plan)
    else:
        recipe = trial_recipe(trial, study, dtype)
        models = open_recipe_models(recipe)
        plan = plan_recipe(recipe, models, open_fisher_folders(recipe))
        mergekit, reason = mergekit_config(recipe)
        config_folder = models[plan.config_model]
    _check_not_a_model(target, plan)
    recipe_yaml = yaml.safe_dump(
        recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False
    )
    fidelity, metrics = trial.search_scores
    card = TrialCard(
        study=study,
        number=trial.number,
        label=trial.label,
        role=trial.role,
        base_model=base_model_name(config_folder),
        metrics=metrics,
        fidelity=fidelity,
        holdout=trial.holdout,
        scored_with=trial.scored_with,
        recipe_yaml=recipe_yaml,
        mergekit_reason=reason,
        export_command=export_command(store, study, trial.number, dtype, as_lora),
        inspection=store.inspection(study),
        how=how,
    )
    return _Parts(plan, recipe, recipe_yaml, mergekit, card)


def _open_config_model(plan: MergePlan) -> ModelFolder:
    from evomerge.checkpoint import ModelFolder

    return ModelFolder(plan.models[plan.config_model], label=plan.labels[plan.config_model])


def _write(
    parts: _Parts, staging: Path, *, device: str, shard_size: int, progress: Progress | None
) -> None:
    """The merged weights, config, tokenizer, card, recipe and mergekit config, in ``staging``."""
    from evomerge.merge.engine import merge_to_folder

    merge_to_folder(
        parts.plan,
        staging,
        device=device,
        shard_size=shard_size,
        model_card=trial_card(parts.plan, parts.card),
        progress=progress,
    )
    (staging / RECIPE_FILE).write_text(parts.recipe_yaml)
    if parts.mergekit is not None:
        (staging / MERGEKIT_FILE).write_text(yaml.safe_dump(parts.mergekit, sort_keys=False))


def lora_folder(rank: int) -> str:
    """The adapter's folder inside the export."""
    return f"lora-r{rank}"


def _write_lora(
    config: Mapping[str, Any], parts: _Parts, staging: Path, rank: int, device: str
) -> LoraReport:
    """The merged delta over the study's base as a LoRA adapter in ``staging/lora-rRANK``,
    read tensor by tensor from the base and the staged weights."""
    from evomerge.lora_export import export_lora

    base = parts.recipe.base or config.get("base")
    if base is None:
        raise ConfigError(
            "--as-lora needs the base model the adapter applies to; the trial's recipe has none"
        )
    name = parts.card.base_model
    if name == Path(base).name:  # no hub id: the folder itself
        name = str(Path(base).expanduser().resolve())
    folder = lora_folder(rank)
    report = export_lora(base, staging, staging / folder, rank, base_model=name, device=device)
    return replace(report, path=folder)


def _draw_images(
    store: StudyStore, study: str, trial: TrialView, parts: _Parts, staging: Path
) -> tuple[TrialCard, list[str]]:
    """The study's plots in ``staging/images`` (see :func:`~evomerge.plots.images.study_images`),
    and the card that shows them."""
    from evomerge.plots.images import study_images

    drawn, skipped = study_images(
        store, study, trial, parts.plan, parts.recipe, staging / IMAGES_FOLDER
    )
    return replace(parts.card, images=tuple(drawn)), skipped


def export_settings(config: Mapping[str, Any], study: str) -> ExportConfig:
    """The stored config's ``export`` section (its defaults when absent)."""
    from evomerge.study.config import ExportConfig
    from evomerge.util import pydantic_message

    try:
        return ExportConfig.model_validate(config.get("export") or {})
    except ValidationError as exc:
        raise ConfigError(f"study '{study}' export: {pydantic_message(exc)}") from None


def _shard_bytes(text: str, study: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"study '{study}' export.shard_size: {exc}") from None


def mergekit_config(recipe: Recipe) -> tuple[dict[str, Any] | None, str | None]:
    """``(config, None)`` when a mergekit config merges like ``recipe``, else ``(None, why)``."""
    from evomerge.merge.mergekit_compat import recipe_to_mergekit

    try:
        return recipe_to_mergekit(recipe), None
    except ConfigError as exc:
        return None, str(exc)


def base_model_name(folder: ModelFolder) -> str:
    """The model card's ``base_model``: the config's hub id if it has one, else the folder name."""
    name = folder.config.get("_name_or_path")
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and not Path(name).exists():
        return name
    return folder.path.name


def export_command(
    store: StudyStore, study: str, number: int, dtype: str | None, as_lora: int | None = None
) -> str:
    """The command line that exports this trial again (the password masked)."""
    words = ["evomerge", "export", "--storage", mask_url(store.url), "--study", study]
    words += ["--trial", str(number), "--out", "OUT"]
    if dtype is not None:
        words += ["--dtype", dtype]
    if as_lora is not None:
        words += ["--as-lora", str(as_lora)]
    return " ".join(shlex.quote(word) for word in words)


def _check_target(target: Path, force: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"output {target} exists and is not a folder")
    if not force:
        raise ConfigError(
            f"output folder {target} already exists (pass --force to replace it once the "
            "export has succeeded)"
        )


def _check_not_a_model(target: Path, plan: MergePlan) -> None:
    for label, path in zip(plan.labels, plan.models):
        model = Path(path).resolve()
        if target == model or target in model.parents:
            raise ConfigError(
                f"output folder {target} would replace model '{label}' ({model}); "
                "choose another folder"
            )


def _move_into_place(staging: Path, target: Path, force: bool) -> None:
    """Rename the finished folder to ``target``; an existing one is removed only afterwards."""
    try:
        if not target.exists():
            os.replace(staging, target)
            return
        if not force:
            raise ConfigError(f"output folder {target} appeared during the export; not replaced")
        old = target.parent / f".{target.name}.evomerge-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise EvomergeError(f"cannot move the export into {target}: {exc}") from None


# -- verification ----------------------------------------------------------------------------


def fidelity_limit(fidelity: str | None) -> int | float | None:
    """``"full"`` -> None, ``"limit=20"`` -> 20, ``"limit=0.5"`` -> 0.5."""
    if fidelity is None or fidelity == "full":
        return None
    if fidelity.startswith("anchors="):
        raise ConfigError(
            f"this trial has only an estimated score ({fidelity}: its full score estimated from "
            "anchor documents), which a re-score cannot reproduce; export it without --verify, "
            "or export a promoted trial (scored on all documents)"
        )
    try:
        if not fidelity.startswith("limit="):
            raise ValueError(fidelity)
        value = float(fidelity.removeprefix("limit="))
    except ValueError:
        raise ConfigError(f"unknown fidelity '{fidelity}' in the study database") from None
    return int(value) if value.is_integer() else value


def working_dtype(trial: TrialView) -> str:
    """The dtype the worker scored the trial in (``float32`` for trials recorded before it was)."""
    recorded = (trial.scored_with or "").split(" on ", 1)[0]
    return recorded if recorded in ("float32", "float16", "bfloat16", "float64") else "float32"


def written_dtype(folder: Path) -> str:
    """The dtype a checkpoint folder says it is stored in (its config's ``dtype``)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.")


def _verify(
    staging: Path,
    config: Mapping[str, Any],
    trial: TrialView,
    device: str,
    written: str,
    changed: str | None,
    out: Path,
) -> dict[str, float] | None:
    """Score the staged folder as the worker did (its working dtype and batch sizes) and
    require the recorded metrics; when it is written in another dtype, also score it as
    written: those scores, else None. When the export merged to another dtype than the trial
    (``changed`` says how), the worker's scores cannot be reproduced: it is scored as written
    only, to be shown beside them."""
    fidelity, recorded = trial.search_scores
    if not recorded:
        raise ConfigError(f"trial {trial.number} has no recorded metrics to verify against")
    evaluators = config.get("evaluators") or []
    if not evaluators:
        raise ConfigError("the study stores no evaluators; export without verification")
    from evomerge.evaluate.suite import score_folder

    working = working_dtype(trial)
    limit = fidelity_limit(fidelity)
    batches = trial.timings.get("batch_sizes") or None  # as the worker ran them
    if changed is not None:
        return score_folder(staging, evaluators, limit, device, written, batch_sizes=batches)
    measured = score_folder(staging, evaluators, limit, device, working, batch_sizes=batches)
    problem = first_mismatch(recorded, measured)
    if problem is not None:
        scored = trial.scored_with or f"{working} (not recorded)"
        raise ExportVerificationError(
            f"verification of trial {trial.number} at fidelity {fidelity} failed: {problem} "
            f"(the worker scored {scored}; re-scored as {working} on {device}); nothing was "
            f"written to {out}"
        )
    if written == working:
        return None
    return score_folder(staging, evaluators, limit, device, written, batch_sizes=batches)


def _dtype_change(trial: TrialView, recipe: Recipe) -> str | None:
    """How the export's output dtype differs from the one the trial was merged to, or None."""
    scored = (trial.recipe or {}).get("dtype")
    if recipe.dtype is None or recipe.dtype == scored:
        return None
    return f"exported as {recipe.dtype}, the trial was merged as {scored or 'the base dtype'}"
