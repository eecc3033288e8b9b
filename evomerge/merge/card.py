"""The model card (README.md) written next to a merged checkpoint."""

from __future__ import annotations

from evomerge import __version__
from evomerge.merge.plan import MergePlan


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
        f"Merged with evomerge {__version__} using **{plan.method}** "
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
