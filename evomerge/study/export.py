"""``evomerge export``: one trial of a study, as a Hugging Face checkpoint.

The trial's stored recipe is merged by the streaming engine into a hidden staging folder next
to the output folder. The recipe (``evomerge_recipe.yaml``), a mergekit config when one merges
the same way (``mergekit_config.yml``), the study's plots (``images/pareto.png``,
``history.png``, ``recipe.png``) and a model card (``README.md``) that shows them are written
beside the weights; a plot that cannot be drawn is reported and left out, it fails nothing.
With ``verify`` the staged folder is loaded and scored again at the fidelity the database
recorded, and must match it. Only then is the folder renamed into place: after an
error or Ctrl-C nothing is left at the output folder or beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from evomerge.errors import ConfigError, EvomergeError
from evomerge.failpoints import failpoint
from evomerge.merge.card import TrialCard, trial_card
from evomerge.merge.plan import MergePlan
from evomerge.optimize import Objective, parse_objectives, scalarize
from evomerge.staging import remove_abandoned, staging_folder
from evomerge.study.store import StudyStore, TrialView, mask_url

if TYPE_CHECKING:  # torch-heavy; imported where used so `evomerge --help` stays fast
    from evomerge.checkpoint import ModelFolder
    from evomerge.merge.recipe import Recipe
    from evomerge.study.config import ExportConfig

Progress = Callable[[int, int], None]
DTYPES = ("float32", "float16", "bfloat16")
TOLERANCE = 1e-6
"""Largest absolute difference between a re-scored metric and the recorded one."""
RECIPE_FILE = "evomerge_recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"
IMAGES_FOLDER = "images"

_SELECTOR = re.compile(r"(best)|(\d+)|pareto:(\d+)")
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


# -- choosing the trial ----------------------------------------------------------------------


def select_trial(store: StudyStore, study: str, selector: str) -> TrialView:
    """The trial ``selector`` names: ``best``, a trial number, or ``pareto:K`` (1-based row of
    the Pareto front, best scalarized first). Only a COMPLETE trial is returned."""
    match = _SELECTOR.fullmatch(selector.strip())
    if match is None:
        raise ConfigError(
            f"trial selector '{selector}' is not 'best', a trial number or 'pareto:K' (K >= 1)"
        )
    best, number, row = match.groups()
    if number is not None:
        return _numbered(store, study, int(number))
    objectives = study_objectives(store, study)
    if best:
        return _best(store, study, objectives)
    return _pareto_row(store, study, objectives, int(row))


def study_objectives(store: StudyStore, study: str) -> list[Objective]:
    """The objectives in the study's stored config."""
    raw = store.study_config(study).get("objectives")
    if not raw:
        raise ConfigError(f"study '{study}' stores no objectives; select a trial by its number")
    return parse_objectives(raw, where=f"study '{study}' objectives")


def _numbered(store: StudyStore, study: str, number: int) -> TrialView:
    trials = store.trials(study)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None:
        have = f"its trials are {_ranges([t.number for t in trials])}" if trials else "no trials"
        raise ConfigError(f"study '{study}' has no trial {number}; {have}")
    if trial.state != "COMPLETE":
        why = f" ({_first_line(trial.error)})" if trial.error else ""
        raise ConfigError(
            f"trial {number} of study '{study}' is {trial.state}{why}, not COMPLETE; "
            "only a complete trial can be exported"
        )
    return trial


def _best(store: StudyStore, study: str, objectives: Sequence[Objective]) -> TrialView:
    pool = [t for t in store.trials(study, ["COMPLETE"]) if t.values(objectives) is not None]
    if not pool:
        raise _nothing_complete(store, study)
    # The pool is ordered by number and max keeps the first maximum: ties go to the lower one.
    return max(pool, key=lambda t: scalarize(objectives, t.values(objectives) or []))


def _pareto_row(
    store: StudyStore, study: str, objectives: Sequence[Objective], row: int
) -> TrialView:
    front = store.pareto(study, objectives)
    if not front:
        raise _nothing_complete(store, study)
    if not 1 <= row <= len(front):
        raise ConfigError(
            f"pareto:{row}: the Pareto front of study '{study}' has {len(front)} trial(s); "
            f"choose pareto:1 to pareto:{len(front)}"
        )
    return front[row - 1]


def _nothing_complete(store: StudyStore, study: str) -> ConfigError:
    counts = Counter(t.state for t in store.trials(study))
    if not counts:
        return ConfigError(f"study '{study}' has no trials yet; there is nothing to export")
    states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    return ConfigError(
        f"study '{study}' has no complete trial with a score for every objective ({states})"
    )


def _ranges(numbers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else text


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
    device: str = "cpu",
    progress: Progress | None = None,
) -> ExportResult:
    """Merge a trial's recipe into ``out`` (see the module docstring); ``verify``, ``dtype``
    and ``shard_size`` default to the study's ``export`` settings."""
    config = store.study_config(study)
    settings = export_settings(config, study)
    verify = settings.verify if verify is None else verify
    if shard_size is None:
        shard_size = _shard_bytes(settings.shard_size, study)
    target = Path(out).expanduser().resolve()
    _check_target(target, force)
    trial = select_trial(store, study, selector)
    parts = _prepare(store, study, trial, target, dtype or settings.dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target, "evomerge-export")
    for abandoned in remove_abandoned(target, "evomerge-export"):  # an export killed earlier
        remove_abandoned(abandoned, "partial")  # ... and its writer's own hidden folder
    try:
        try:
            _write(parts, staging, device=device, shard_size=shard_size, progress=progress)
            card, skipped = _draw_images(store, study, trial, parts, staging)
            if verify:
                _verify(staging, config, trial, device, _dtype_note(trial, parts.recipe), target)
                card = replace(card, verified=True)
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
    return ExportResult(
        path=target,
        number=trial.number,
        label=trial.label,
        role=trial.role,
        metrics=dict(trial.metrics),
        fidelity=trial.fidelity,
        verified=verify,
        mergekit_written=parts.mergekit is not None,
        mergekit_reason=parts.card.mergekit_reason,
        images=tuple(path for path, _ in card.images),
        images_skipped=tuple(skipped),
    )


@dataclass(frozen=True)
class _Parts:
    """Everything an export writes, worked out before anything is written."""

    plan: MergePlan
    recipe: Recipe
    recipe_yaml: str
    mergekit: dict[str, Any] | None
    card: TrialCard


def _prepare(
    store: StudyStore, study: str, trial: TrialView, target: Path, dtype: str | None
) -> _Parts:
    from evomerge.merge.recipe import open_fisher_folders, open_recipe_models, plan_recipe

    recipe = trial_recipe(trial, study, dtype)
    models = open_recipe_models(recipe)
    plan = plan_recipe(recipe, models, open_fisher_folders(recipe))
    _check_not_a_model(target, plan)
    mergekit, reason = mergekit_config(recipe)
    recipe_yaml = yaml.safe_dump(
        recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False
    )
    card = TrialCard(
        study=study,
        number=trial.number,
        label=trial.label,
        role=trial.role,
        base_model=base_model_name(models[plan.config_model]),
        metrics=trial.metrics,
        fidelity=trial.fidelity,
        recipe_yaml=recipe_yaml,
        mergekit_reason=reason,
        export_command=export_command(store, study, trial.number, dtype),
    )
    return _Parts(plan, recipe, recipe_yaml, mergekit, card)


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


def _draw_images(
    store: StudyStore, study: str, trial: TrialView, parts: _Parts, staging: Path
) -> tuple[TrialCard, list[str]]:
    """The study's plots in ``staging/images`` (see :func:`~evomerge.study.plots.study_images`),
    and the card that shows them."""
    from evomerge.study.plots import study_images

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
    from evomerge.cli import parse_size

    try:
        return parse_size(text)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"study '{study}' export.shard_size: {exc}") from None


def trial_recipe(trial: TrialView, study: str, dtype: str | None = None) -> Recipe:
    """The trial's stored recipe with absolute model paths, its ``dtype`` replaced if given."""
    from evomerge.merge.recipe import parse_recipe

    if trial.recipe is None:
        raise ConfigError(f"trial {trial.number} of study '{study}' has no stored recipe")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    where = f"trial {trial.number} recipe"
    data = parse_recipe(trial.recipe, where).model_dump(mode="json", exclude_defaults=True)
    if data.get("base") is not None:
        data["base"] = _absolute(data["base"])
    for source in data["sources"]:
        source["model"] = _absolute(source["model"])
        if source.get("fisher"):
            source["fisher"] = _absolute(source["fisher"])
    if dtype is not None:
        data["dtype"] = dtype
    return parse_recipe(data, where)


def _absolute(path: str) -> str:
    """As a worker reads it: relative to the working directory."""
    return str(Path(path).expanduser().resolve())


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


def export_command(store: StudyStore, study: str, number: int, dtype: str | None) -> str:
    """The command line that exports this trial again (the password masked)."""
    words = ["evomerge", "export", "--storage", mask_url(store.url), "--study", study]
    words += ["--trial", str(number), "--out", "OUT"]
    if dtype is not None:
        words += ["--dtype", dtype]
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
    try:
        if not fidelity.startswith("limit="):
            raise ValueError(fidelity)
        value = float(fidelity.removeprefix("limit="))
    except ValueError:
        raise ConfigError(f"unknown fidelity '{fidelity}' in the study database") from None
    return int(value) if value.is_integer() else value


def score_folder(
    folder: Path,
    evaluators: Sequence[Mapping[str, Any]],
    limit: int | float | None,
    device: str = "cpu",
) -> dict[str, float]:
    """Load a model folder and score it with the evaluators, as a study worker would."""
    from evomerge.evaluate import build_evaluator
    from evomerge.evaluate.model_loading import load_model_for_eval
    from evomerge.search.loop import EvaluatorSuite

    model, tokenizer = load_model_for_eval(folder, device=device)
    built = []
    try:
        for config in evaluators:
            built.append(build_evaluator(dict(config), model, tokenizer))
        metrics, _ = EvaluatorSuite(built).evaluate(limit)
    finally:
        for evaluator in built:
            evaluator.close()
    return metrics


def first_mismatch(recorded: Mapping[str, float], measured: Mapping[str, float]) -> str | None:
    """The first recorded metric (by name, ``*_stderr`` included) the measurement does not
    reproduce within :data:`TOLERANCE`, described; None when all agree."""
    for name in sorted(recorded):
        want, got = recorded[name], measured.get(name)
        if got is None:
            return f"{name} is {want!r} in the study database but was not measured"
        if not _agree(got, want):
            return f"{name} is {got!r} in the exported model but {want!r} in the study database"
    return None


def _agree(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= TOLERANCE


def _verify(
    staging: Path, config: Mapping[str, Any], trial: TrialView, device: str, note: str, out: Path
) -> None:
    if not trial.metrics:
        raise ConfigError(f"trial {trial.number} has no recorded metrics to verify against")
    evaluators = config.get("evaluators") or []
    if not evaluators:
        raise ConfigError("the study stores no evaluators; export without verification")
    measured = score_folder(staging, evaluators, fidelity_limit(trial.fidelity), device)
    problem = first_mismatch(trial.metrics, measured)
    if problem is not None:
        raise ExportVerificationError(
            f"verification of trial {trial.number} at fidelity {trial.fidelity} failed: "
            f"{problem}{note}; nothing was written to {out}"
        )


def _dtype_note(trial: TrialView, recipe: Recipe) -> str:
    scored = (trial.recipe or {}).get("dtype")
    if recipe.dtype is None or recipe.dtype == scored:
        return ""
    return f" (exported as {recipe.dtype}; the trial was scored as {scored or 'the base dtype'})"


# -- the command line ------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Register ``export`` on the CLI's sub-parsers."""
    from evomerge.cli import parse_size

    export = commands.add_parser(
        "export",
        help="export one trial of a study as a Hugging Face checkpoint",
        description="Merge one trial of a study into a Hugging Face folder with its recipe, a "
        "mergekit config when one merges the same way, and a model card. The folder appears "
        "only when everything (and --verify) succeeded.",
    )
    export.add_argument("--storage", required=True, help="database URL or SQLite file")
    export.add_argument("--study", required=True, help="study name")
    export.add_argument(
        "--trial",
        required=True,
        help="best (highest weighted objectives), a trial number, or pareto:K (row K of "
        "`evomerge pareto`)",
    )
    export.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    export.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score the export again and require the recorded metrics (default: the study's "
        "export.verify)",
    )
    export.add_argument(
        "--dtype", choices=list(DTYPES), help="output dtype (default: export.dtype, the recipe's)"
    )
    export.add_argument(
        "--shard-size",
        type=parse_size,
        help="largest safetensors shard, e.g. 2GB (default: export.shard_size, 5GB)",
    )
    export.add_argument("--device", default="cpu", help="where to merge and verify (cpu, cuda)")
    export.add_argument(
        "--force", action="store_true", help="replace an existing --out, after success"
    )
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.cli import check_device, format_metrics
    from evomerge.progress import no_transformers_bars, progress_bar

    device = check_device(args.device)
    from evomerge.study.report import open_store

    store = open_store(args.storage)
    with (
        no_transformers_bars(),
        progress_bar("exporting", total=0, enabled=not args.quiet) as advance,
    ):
        result = export_trial(
            store,
            args.study,
            args.trial,
            args.out,
            verify=args.verify,
            dtype=args.dtype,
            shard_size=args.shard_size,
            force=args.force,
            device=device,
            progress=advance,
        )
    print(
        f"exported trial {result.number} ({result.label}, {result.role}) of study "
        f"'{args.study}' to {result.path}"
    )
    if result.metrics:
        print(format_metrics(result.metrics))
        print(f"scores as recorded at fidelity {result.fidelity}")
    if result.mergekit_written:
        print(f"{MERGEKIT_FILE}: written")
    else:
        print(f"{MERGEKIT_FILE}: not written ({result.mergekit_reason})")
    if result.images:
        print(f"plots: {', '.join(result.images)}")
    for skipped in result.images_skipped:
        print(f"plot not drawn: {skipped}")
    print(f"verified: {'yes' if result.verified else 'no'}")
    return 0
