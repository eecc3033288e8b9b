"""The model card (README.md) written next to a merged checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from evomerge import __version__
from evomerge.merge.plan import MergePlan

if TYPE_CHECKING:
    from evomerge.lora_export import LoraReport


def model_card(
    plan: MergePlan, config_text: str | None = None, config_kind: str = "evomerge"
) -> str:
    """Markdown with the models, the method, the plan fingerprint and the config as given."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- evomerge",
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with evomerge {__version__} using **{plan.describe_methods()}** "
        f"(plan fingerprint `{plan.fingerprint()}`, seed {plan.seed}).",
        "",
        "## Models",
        "",
    ]
    lines += [f"- `{label}`" for label in plan.labels]
    if config_text is not None:
        lines += [
            "",
            f"## Configuration ({config_kind})",
            "",
            "```yaml",
            config_text.rstrip(),
            "```",
        ]
    return "\n".join([*lines, ""])


@dataclass(frozen=True)
class TrialCard:
    """What a model card says about a study trial exported as a checkpoint."""

    study: str
    number: int
    label: str
    role: str
    base_model: str
    metrics: Mapping[str, float]
    fidelity: str | None
    recipe_yaml: str
    mergekit_reason: str | None
    """None when ``mergekit_config.yml`` was written; else why no mergekit config can merge it."""
    export_command: str
    verified: bool = False
    images: tuple[tuple[str, str], ...] = ()
    """``(path relative to the card, one-line caption)`` per plot beside the weights."""
    holdout: Mapping[str, float] = field(default_factory=dict)
    """Scores on the held-out documents the search never saw (``evomerge confirm``)."""
    scored_with: str | None = None
    """How the worker scored the trial (``float32 on cuda``)."""
    as_written: Mapping[str, float] = field(default_factory=dict)
    """Scores of the checkpoint loaded in its own dtype, when that is not the working dtype."""
    written_dtype: str | None = None
    unverified_reason: str | None = None
    """Why verification could not compare with the recorded scores (another output dtype)."""
    lora: LoraReport | None = None
    """The merged delta as a LoRA adapter (``--as-lora``): its folder and errors."""
    inspection: Mapping[str, Any] | None = None
    """The latest ``evomerge inspect`` of the study's models (``path``, ``summary``)."""
    how: str | None = None
    """How the model is built, when not a merge method (a layer path: its layers); None: the
    plan's methods."""


def trial_card(plan: MergePlan, trial: TrialCard) -> str:
    """Markdown with YAML front matter for an exported trial: scores, recipe, how to rebuild."""
    front = yaml.safe_dump(
        {
            "base_model": trial.base_model,
            "library_name": "transformers",
            "tags": ["merge", "evomerge"],
        },
        sort_keys=False,
    )
    lines = [
        "---",
        front.rstrip(),
        "---",
        "",
        f"# {trial.study}: trial {trial.number}",
        "",
        f"Trial {trial.number} (`{trial.label}`, {trial.role}) of the evomerge study "
        f"`{trial.study}`, merged with evomerge {__version__} using "
        f"**{trial.how or plan.describe_methods()}** "
        f"(plan fingerprint `{plan.fingerprint()}`, seed {plan.seed}).",
        "",
        "## Models",
        "",
        *(f"- `{label}`: `{path}`" for label, path in zip(plan.labels, plan.models)),
        "",
        "## Scores",
        "",
        *_score_lines(trial),
        "",
        *_image_lines(trial),
        "## Recipe",
        "",
        "```yaml",
        trial.recipe_yaml.rstrip(),
        "```",
        "",
        _mergekit_line(trial.mergekit_reason),
        "",
        *_lora_lines(trial.lora),
        *_inspection_lines(trial.inspection),
        "## Reproduce",
        "",
        "```bash",
        trial.export_command,
        "evomerge merge evomerge_recipe.yaml OUT",
        "```",
    ]
    return "\n".join([*lines, ""])


def _score_lines(trial: TrialCard) -> list[str]:
    if not trial.metrics:
        return ["The study database holds no scores for this trial."]
    where = (
        "on all searched-on documents (full fidelity)"
        if trial.fidelity == "full"
        else f"at fidelity `{trial.fidelity}` (a subset of the searched-on documents)"
    )
    how = f", {trial.scored_with}" if trial.scored_with else ""
    columns: list[tuple[str, Mapping[str, float]]] = [(f"search ({trial.fidelity})", trial.metrics)]
    if trial.holdout:
        columns.append(("held out", trial.holdout))
    if trial.as_written:
        columns.append((f"as written ({trial.written_dtype})", trial.as_written))
    names = [n for n in sorted(trial.metrics) if not _is_stderr_of_other(n, trial.metrics)]
    has_stderr = any(f"{n}_stderr" in trial.metrics for n in names)
    header = "| metric | " + " | ".join(title for title, _ in columns) + " |"
    header += " stderr |" if has_stderr else ""
    lines = [
        f"As recorded in the study database, scored {where}{how}.",
        *_column_notes(trial),
        "",
        header,
        "|---|" + "---|" * len(columns) + ("---|" if has_stderr else ""),
    ]
    for name in names:
        cells = [_value(values.get(name)) for _, values in columns]
        row = f"| {name} | " + " | ".join(cells) + " |"
        if has_stderr:
            stderr = trial.metrics.get(f"{name}_stderr")
            row += f" {'' if stderr is None else format(stderr, '.4g')} |"
        lines.append(row)
    if trial.verified:
        lines += [
            "",
            "Verified: this folder was loaded and scored again when it was exported, as the "
            "study's worker scored it; every searched-on metric matched the database.",
        ]
    elif trial.unverified_reason:
        lines += ["", f"Not verified: {trial.unverified_reason}; compare the columns."]
    return lines


def _column_notes(trial: TrialCard) -> list[str]:
    notes = []
    if trial.holdout:
        notes.append(
            "*held out*: on documents the search never saw (the search's own score is the best "
            "of many tries on its documents, so it is optimistic)."
        )
    if trial.as_written:
        notes.append(
            f"*as written*: this checkpoint loaded in its stored dtype, {trial.written_dtype}, "
            "rather than the working dtype the search scored in."
        )
    return [""] + [f"- {note}" for note in notes] if notes else []


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _image_lines(trial: TrialCard) -> list[str]:
    if not trial.images:
        return []
    lines = ["## Plots", ""]
    for path, caption in trial.images:
        name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        lines += [f"{caption}", "", f"![{name}]({path})", ""]
    return lines


def _inspection_lines(inspection: Mapping[str, Any] | None) -> list[str]:
    """The study's latest ``evomerge inspect``: where it is, and its summary one level down."""
    if not inspection:
        return []
    summary = [
        f"#{line}" if line.startswith("#") else line
        for line in str(inspection["summary"]).strip().splitlines()
    ]
    return [
        "## Inspection of the sources",
        "",
        f"`evomerge inspect` of this study's models, in `{inspection['path']}` "
        "(inspect.json, heatmaps and scans there):",
        "",
        *summary,
        "",
    ]


def _lora_lines(report: LoraReport | None) -> list[str]:
    """The section on the adapter beside the weights: errors per kind, what it leaves out."""
    if report is None:
        return []
    lines = [
        f"## LoRA adapter (rank {report.rank})",
        "",
        f"`{report.path}/` holds the merge's change to the base as a PEFT LoRA adapter: a "
        f"truncated SVD (rank at most {report.rank}) of each attention and MLP Linear weight's "
        "delta. Load it with `PeftModel.from_pretrained(base_model, "
        f'"{report.path}")`. Relative error per tensor: `||delta - B A|| / ||delta||` '
        "(Frobenius norms).",
        "",
        "| kind | tensors | mean relative error | max relative error |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k.kind} | {k.tensors} | {k.mean:.3e} | {k.max:.3e} |" for k in report.by_kind()]
    if report.left_out:
        lines += [
            "",
            "Changed by the merge but not in the adapter (a Linear LoRA cannot carry them; "
            "relative change `||delta|| / ||base||`):",
            "",
        ]
        lines += [f"- `{t.name}` ({t.kind}): {t.change:.3e}" for t in report.left_out]
    else:
        lines += ["", "Every tensor the merge changed is in the adapter."]
    return [*lines, ""]


def _is_stderr_of_other(name: str, metrics: Mapping[str, float]) -> bool:
    return name.endswith("_stderr") and name.removesuffix("_stderr") in metrics


def _mergekit_line(reason: str | None) -> str:
    if reason is None:
        return "`mergekit_config.yml` is the same merge as a mergekit config."
    return f"No mergekit config was written: {reason.rstrip('.')}."
