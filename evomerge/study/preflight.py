"""The checks ``search``, ``resume`` and ``check`` make before a study runs, so that a mistake
costs neither a database entry nor a worker start."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError, EvomergeError

if TYPE_CHECKING:
    from evomerge.study.config import StudyConfig


def preflight(config: StudyConfig, where: str) -> None:
    """Check what the driver can check by itself, so that a mistake costs neither a database
    entry nor a worker start: the models are there and can be merged, the space binds to
    them, the proposer takes it, and each evaluator's files, function and tasks exist and
    can produce the objectives' metrics. Errors name ``where`` (the YAML) and the field."""
    from evomerge.checkpoint import ModelFolder, check_compatible
    from evomerge.evaluate.registry import preflight_evaluator
    from evomerge.space import build_space_proposer, space_from_setting

    with _naming(where, "base"):
        base = ModelFolder(config.base, label="base")
    sources = []
    for index, path in enumerate(config.sources):
        with _naming(where, f"sources[{index}]"):
            sources.append(ModelFolder(path))
    with _naming(where, "sources"):
        check_compatible([base, *sources])
    with _naming(where, "space"):
        space = space_from_setting(config.space).bind(base, [s.label for s in sources])
    with _naming(where, "proposer"):
        build_space_proposer(config.proposer, space, config.objectives)
    prefixes: set[str] | None = set()
    named: list[str] = []
    for index, evaluator in enumerate(config.evaluators):
        found = preflight_evaluator(evaluator, f"{where}: evaluators[{index}]")
        prefixes = None if found is None or prefixes is None else prefixes | found
        named += evaluator.get("tasks") or sorted(found or [])
    if prefixes is None:
        return
    for index, objective in enumerate(config.objectives):
        if objective.metric.split("/", 1)[0] not in prefixes or "/" not in objective.metric:
            raise ConfigError(
                f"{where}: objectives[{index}].metric: no evaluator produces "
                f"'{objective.metric}'; their metrics are named "
                f"{', '.join(f'{name}/...' for name in named)}"
            )


@contextmanager
def _naming(where: str, field: str) -> Iterator[None]:
    """Prefix an input error raised in the block with ``where: field: ``."""
    try:
        yield
    except EvomergeError as exc:
        raise type(exc)(f"{where}: {field}: {exc}") from None
