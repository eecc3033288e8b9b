"""A search described in one YAML file, run in one process: ``evomerge search FILE``.

```yaml
name: toy
base: zoo/base                      # paths are relative to this file
sources: [zoo/ft_a, zoo/ft_b]
space: task_arithmetic_per_layer    # a ready space, a YAML file, or an inline mapping
proposer: {kind: cma, seed: 0}      # cma, tpe, nsga2, optuna-cmaes, gp, random, qmc
objectives:
  - {metric: toy_facts_a/acc, direction: maximize, weight: 0.5}
  - {metric: toy_facts_b/acc, direction: maximize, weight: 0.5}
evaluators:
  - {kind: lm_eval, tasks: [toy_facts_a, toy_facts_b]}
budget: 200                         # evaluations, baselines included
```

Results go to ``output`` (default ``<name>-results`` beside the file): ``trials.jsonl`` (one
line per evaluated candidate), ``best_recipe.yaml`` (the best by the weighted objectives, an
ordinary recipe for ``evomerge merge``) and ``pareto.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.checkpoint import ModelFolder
from evomerge.errors import ConfigError
from evomerge.evaluate.registry import anchor_evaluator_paths, parse_evaluator_config
from evomerge.merge.recipe import load_yaml, pydantic_message
from evomerge.optimize import Objective, parse_proposer_config
from evomerge.search.loop import InProcessSearch, SearchResult, Trial, build_space_proposer
from evomerge.space import space_from_setting


class SearchConfig(BaseModel):
    """One search: models, space, proposer, objectives, evaluators, budget."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="search", min_length=1)
    base: str
    sources: list[str] = Field(min_length=1)
    space: str | dict[str, Any]
    proposer: dict[str, Any] = Field(default_factory=lambda: {"kind": "cma"})
    objectives: list[Objective] = Field(min_length=1)
    evaluators: list[dict[str, Any]] = Field(min_length=1)
    budget: int = Field(ge=1)
    limit: int | float | None = None
    baselines: bool = True
    device: str = "cpu"
    output: str | None = None


def load_search_config(path: Path) -> tuple[SearchConfig, Path]:
    """The validated config and the folder its relative paths are relative to."""
    data = load_yaml(path)
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {pydantic_message(exc)}") from None
    folder = path.expanduser().resolve().parent
    for index, evaluator in enumerate(config.evaluators):
        anchor_evaluator_paths(evaluator, folder)
        parse_evaluator_config(evaluator, where=f"{path}: evaluators[{index}]")
    parse_proposer_config(config.proposer, where=f"{path}: proposer")
    return config, folder


def _resolve(path: str, folder: Path) -> Path:
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else folder / resolved


def run_search_file(path: Path, *, on_trial=None) -> tuple[SearchResult, Path]:  # type: ignore[no-untyped-def]
    """Run the search a file describes; write its results; return them and the output folder."""
    config, folder = load_search_config(path)
    base = _resolve(config.base, folder)
    sources = [_resolve(s, folder) for s in config.sources]
    labels = [ModelFolder(s).label for s in sources]
    space = space_from_setting(config.space, folder).bind(ModelFolder(base), labels)
    search = InProcessSearch(
        space,
        base,
        sources,
        config.objectives,
        config.evaluators,
        limit=config.limit,
        device=config.device,
    )
    proposer = build_space_proposer(config.proposer, space, config.objectives)
    output = _resolve(config.output, folder) if config.output else folder / f"{config.name}-results"
    result = search.run(proposer, config.budget, baselines=config.baselines, on_trial=on_trial)
    write_results(result, output)
    return result, output


def trial_record(trial: Trial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "role": trial.role,
        "label": trial.label,
        "status": trial.status,
        "error": trial.error,
        "values": trial.values,
        "metrics": trial.metrics,
        "merge_seconds": round(trial.merge_seconds, 6),
        "eval_seconds": round(trial.eval_seconds, 6),
        "genome": None if trial.genome is None else trial.genome.tolist(),
    }


def write_results(result: SearchResult, output: Path) -> None:
    """trials.jsonl, pareto.json, best_recipe.yaml; each file written whole, then renamed."""
    output.mkdir(parents=True, exist_ok=True)
    _write(
        output / "trials.jsonl", "".join(json.dumps(trial_record(t)) + "\n" for t in result.trials)
    )
    front = [trial_record(t) for t in result.pareto()]
    _write(output / "pareto.json", json.dumps(front, indent=2) + "\n")
    best = max(
        (t for t in result.complete if t.recipe is not None),
        key=lambda t: _scalar(result, t),
        default=None,
    )
    if best is not None and best.recipe is not None:
        recipe = best.recipe.model_dump(exclude_defaults=True)
        header = f"# best of search: trial {best.number}, objectives {best.values}\n"
        _write(output / "best_recipe.yaml", header + yaml.safe_dump(recipe, sort_keys=False))


def _scalar(result: SearchResult, trial: Trial) -> float:
    from evomerge.optimize import scalarize

    return scalarize(result.objectives, trial.values or [])


def _write(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
