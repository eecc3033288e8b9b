"""The checks ``search``, ``resume`` and ``check`` make before a study runs, so that a mistake
costs neither a database entry nor a worker start."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, EvomergeError

if TYPE_CHECKING:
    from evomerge.checkpoint import ModelFolder
    from evomerge.study.config import StudyConfig


def preflight(config: StudyConfig, where: str) -> None:
    """Check what the driver can check by itself, so that a mistake costs neither a database
    entry nor a worker start: the models are there and can be merged, the space binds to
    them, the proposer takes it, and each evaluator's files, function and tasks exist and
    can produce the objectives' metrics. An evaluator whose metrics are known only by running
    it (a python function) is run once on a tiny stand-in model (:func:`stand_in_model`): one
    that returns no metrics, or not the objectives', is refused here rather than in every
    trial. Errors name ``where`` (the YAML) and the field."""
    from evomerge.adapters import open_source
    from evomerge.checkpoint import ModelFolder, check_compatible, source_labels
    from evomerge.evaluate.registry import preflight_evaluator, probe_evaluator
    from evomerge.space import build_space_proposer, space_from_setting

    with _naming(where, "base"):
        base = ModelFolder(config.base, label="base")
    with _naming(where, "sources"):
        labels = source_labels(config.sources)
    sources = []
    for index, (path, label) in enumerate(zip(config.sources, labels, strict=True)):
        with _naming(where, f"sources[{index}]"):
            sources.append(open_source(path, label=label, base=base))  # a LoRA adapter too
    with _naming(where, "sources"):
        check_compatible([base, *sources])  # type: ignore[list-item]  # an adapter mirrors its base
    with _naming(where, "space"):
        space = space_from_setting(config.space).bind(base, labels)
    _check_fisher(config, where, base, labels, "fisher" in space.method.aux, space.method.name)
    with _naming(where, "proposer"):
        build_space_proposer(config.proposer, space, config.objectives)
    prefixes: set[str] | None = set()
    named: list[str] = []
    unprobed: set[str] = set()  # prefixes of evaluators preflight does not run
    for index, evaluator in enumerate(config.evaluators):
        found = preflight_evaluator(evaluator, f"{where}: evaluators[{index}]")
        prefixes = None if found is None or prefixes is None else prefixes | found
        named += evaluator.get("tasks") or sorted(found or [])
        if not _probed_kind(evaluator):
            unprobed |= found or set()
    for index, objective in enumerate(config.objectives):
        prefix = objective.metric.split("/", 1)[0]
        if prefixes is not None and (prefix not in prefixes or "/" not in objective.metric):
            raise ConfigError(
                f"{where}: objectives[{index}].metric: no evaluator produces "
                f"'{objective.metric}'; their metrics are named "
                f"{', '.join(f'{name}/...' for name in named)}"
            )
    probed: dict[str, list[str]] = {}  # prefix -> the exact metric names a probe found
    to_probe = [(i, e) for i, e in enumerate(config.evaluators) if _probed_kind(e)]
    stand_in = stand_in_model(base) if to_probe else None
    for index, evaluator in to_probe if stand_in is not None else []:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            found_names = probe_evaluator(evaluator, *stand_in, f"{where}: evaluators[{index}]")
        for name in found_names or []:
            probed.setdefault(name.split("/", 1)[0], []).append(name)
    for index, objective in enumerate(config.objectives):
        prefix = objective.metric.split("/", 1)[0]
        if prefix in probed and prefix not in unprobed and objective.metric not in probed[prefix]:
            raise ConfigError(
                f"{where}: objectives[{index}].metric: no evaluator produces "
                f"'{objective.metric}'; the {prefix} evaluator returned "
                f"{', '.join(sorted(probed[prefix]))} when preflight ran it"
            )


def _probed_kind(evaluator: Any) -> bool:
    from evomerge.evaluate.registry import evaluator_class

    try:
        return evaluator_class(str(evaluator.get("kind"))).probe_at_preflight
    except EvomergeError:
        return False


def stand_in_model(base: ModelFolder) -> tuple[Any, Any] | None:
    """A tiny random causal LM (one Llama layer, width 32) with ``base``'s tokenizer, its
    vocabulary size and its context length: what preflight runs user evaluators on to learn
    their metric names without loading the real model. None when ``base`` has no tokenizer
    that loads (the probe is skipped)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    except Exception:
        return None
    vocab = max(len(tokenizer), _positive_int(base.config.get("vocab_size")) or 0, 2)
    context = _positive_int(base.config.get("max_position_embeddings")) or 2048
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id")
    }
    llama = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        **{k: v for k, v in special.items() if isinstance(v, int)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama).eval()
    return model, tokenizer


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_fisher(
    config: StudyConfig,
    where: str,
    base: ModelFolder,
    labels: list[str],
    needed: bool,
    method: str,
) -> None:
    """``fisher`` is given exactly when the space's method uses it, one folder per source,
    each with a float32-or-wider diagonal of the base's shape for every float tensor."""
    from evomerge.checkpoint import ModelFolder

    if needed and not config.fisher:
        raise ConfigError(
            f"{where}: fisher: the space merges with method '{method}', which weighs each "
            "source by its Fisher diagonal: give one folder per source, in the order of "
            "sources (make them with: evomerge fisher SOURCE --out DIR --tasks ...)"
        )
    if config.fisher and not needed:
        raise ConfigError(
            f"{where}: fisher: the space's method '{method}' does not use Fisher diagonals; "
            "remove 'fisher', or search a space of method fisher (e.g. fisher_per_layer)"
        )
    for index, path in enumerate(config.fisher or []):
        with _naming(where, f"fisher[{index}]"):
            folder = ModelFolder(path, label=f"fisher of {labels[index]}", require_config=False)
            for name, info in base.tensors.items():
                if not info.dtype.is_floating_point:
                    continue
                held = folder.tensors.get(name)
                if held is None:
                    raise ConfigError(
                        f"{folder.path} has no Fisher diagonal for tensor {name} (is it the "
                        f"Fisher of {labels[index]}, a fine-tune of this base?)"
                    )
                if held.shape != info.shape:
                    raise ConfigError(
                        f"{folder.path}: the Fisher diagonal of {name} has shape "
                        f"{list(held.shape)}, the base's tensor {list(info.shape)}"
                    )
            folder.close()


@contextmanager
def _naming(where: str, field: str) -> Iterator[None]:
    """Prefix an input error raised in the block with ``where: field: ``."""
    try:
        yield
    except EvomergeError as exc:
        raise type(exc)(f"{where}: {field}: {exc}") from None
