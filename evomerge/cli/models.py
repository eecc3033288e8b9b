"""``evomerge zoo``, ``eval`` and ``demo``: build the toy zoo, score a model folder, and run
the whole tour on it."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.cli.args import (
    add_allow_pickle,
    add_device,
    add_quiet,
    check_device,
    parse_limit,
)
from evomerge.cli.output import format_metrics
from evomerge.errors import ConfigError
from evomerge.util import DTYPES, json_safe


def add_commands(commands: Any) -> None:
    """Register ``demo``, ``zoo`` and ``eval``."""
    demo = commands.add_parser("demo", help="build a tiny model family and merge it")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("demo_output"),
        help="where the models and the merge go (default ./demo_output)",
    )
    demo.set_defaults(handler=cmd_demo)

    zoo = commands.add_parser(
        "zoo",
        help="train the toy zoo: a tiny model family in which merging visibly matters",
        description="Train the toy zoo (a base and 1-4 fine-tunes, each knowing its own set of "
        "key = value facts) into a folder, and print each model's accuracy per fact set. A "
        "folder that already holds the same zoo is reused.",
    )
    zoo.add_argument("--out", type=Path, required=True, help="folder to build the zoo in")
    zoo.add_argument("--seed", type=int, default=0, help="initialisation and batch seed (0)")
    zoo.add_argument(
        "--sources", type=int, default=2, help="number of fine-tunes, 1 to 4 (default 2)"
    )
    add_quiet(zoo)
    zoo.set_defaults(handler=cmd_zoo)

    evaluate = commands.add_parser(
        "eval",
        help="score one model folder with lm-eval tasks or evaluators from a YAML file",
        description="Load a model folder and score it with lm-eval tasks (--tasks, default "
        "toy_facts) or with the evaluators in a YAML file (--evaluator: one evaluator mapping "
        "or a list of them; relative paths in it are relative to the file).",
    )
    evaluate.add_argument("model_dir", type=Path, help="Hugging Face model folder")
    what = evaluate.add_mutually_exclusive_group()
    what.add_argument("--tasks", help="comma-separated lm-eval tasks or groups (default toy_facts)")
    what.add_argument(
        "--evaluator",
        type=Path,
        help="YAML file of evaluator mapping(s), or the name of a bundled preset "
        "(toy_facts, toy_perplexity)",
    )
    evaluate.add_argument(
        "--limit",
        type=parse_limit,
        help="documents per task (or windows): a count >= 1 or a fraction in (0, 1)",
    )
    evaluate.add_argument("--batch-size", type=int, help="lm-eval batch size (default 64)")
    evaluate.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples")
    evaluate.add_argument(
        "--include-path",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of lm-eval task YAMLs (repeatable)",
    )
    add_device(evaluate, help="cpu, cuda, cuda:1 ... (default cpu)")
    evaluate.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="load dtype (default: float32, what study workers score in, on every device)",
    )
    add_allow_pickle(evaluate)
    evaluate.add_argument(
        "--json", action="store_true", help='print {"metrics": {...}, "seconds": s}'
    )
    evaluate.set_defaults(handler=cmd_eval)


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.demo import run_demo

    run_demo(args.workdir)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from evomerge.progress import no_transformers_bars, progress_bar
    from evomerge.toy_zoo import ToyZooSpec, build_toy_zoo, read_manifest, total_training_steps

    spec = ToyZooSpec(seed=args.seed, sources=args.sources)
    spec.check()
    out: Path = args.out.expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    existing = _read_zoo_manifest(out, read_manifest)
    reused = existing is not None and existing.get("fingerprint") == spec.fingerprint()
    total = total_training_steps(spec)
    done = 0
    start = time.perf_counter()
    with (
        no_transformers_bars(),
        progress_bar(
            "training the toy zoo", total=total, enabled=not args.quiet and not reused
        ) as advance,
    ):

        def on_step() -> None:
            nonlocal done
            done += 1
            advance(done, total)

        folders = build_toy_zoo(out, spec, on_step=on_step)
    manifest = _read_zoo_manifest(out, read_manifest)
    if manifest is None:
        raise ConfigError(f"{out}: the toy zoo was built but its manifest is missing")
    where = out.resolve()
    if reused:
        print(f"reused the existing toy zoo in {where} (same seed {spec.seed}, same spec)")
    else:
        print(
            f"built the toy zoo in {where} in {time.perf_counter() - start:.1f} s "
            f"(seed {spec.seed}, {total} training steps)"
        )
    models = manifest.get("models", {})
    width = max(len(name) for name in folders)
    for name, folder in folders.items():
        accuracy = models.get(name, {}).get("accuracy", {})
        scores = "  ".join(f"{fact_set} {value:.2f}" for fact_set, value in accuracy.items())
        print(f"  {name + ':':<{width + 1}} {scores}  {folder.resolve()}")
    return 0


def _read_zoo_manifest(out: Path, read_manifest: Callable[[Path], dict | None]) -> dict | None:
    if not out.is_dir():
        return None
    try:
        manifest = read_manifest(out)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{out}: unreadable toy zoo manifest ({exc})") from None
    if manifest is not None and not isinstance(manifest, dict):
        raise ConfigError(f"{out}: the toy zoo manifest is not a JSON object")
    return manifest


DEFAULT_EVAL_TASKS = "toy_facts"


def cmd_eval(args: argparse.Namespace) -> int:
    from evomerge.evaluate import parse_evaluator_config
    from evomerge.evaluate.model_loading import load_model_for_eval
    from evomerge.evaluate.suite import MetricClashError, score_model
    from evomerge.progress import no_transformers_bars

    if args.evaluator is not None:
        for flag, value in (
            ("--batch-size", args.batch_size),
            ("--num-fewshot", args.num_fewshot),
            ("--include-path", args.include_path or None),
        ):
            if value is not None:
                raise ConfigError(f"{flag} applies to --tasks; set it in {args.evaluator} instead")
        mappings = load_evaluator_file(args.evaluator)
        where = str(args.evaluator)
    else:
        mappings = [lm_eval_mapping(args)]
        where = "--tasks"
    for index, mapping in enumerate(mappings):
        parse_evaluator_config(
            mapping, f"{where} evaluator {index}" if len(mappings) > 1 else where
        )
    device = check_device(args.device)
    with no_transformers_bars():
        model, tokenizer = load_model_for_eval(
            args.model_dir, device=device, dtype=args.dtype, allow_pickle=args.allow_pickle
        )
    try:
        metrics, seconds = score_model(model, tokenizer, mappings, args.limit)
    except MetricClashError as exc:
        raise ConfigError(f"{where}: {exc}; give them different tasks or names") from None
    if args.json:
        print(
            json.dumps(
                json_safe({"metrics": dict(sorted(metrics.items())), "seconds": round(seconds, 4)}),
                indent=2,
            )
        )
    else:
        print(format_metrics(metrics))
        print(f"evaluated {args.model_dir} in {seconds:.2f} s")
    return 0


def lm_eval_mapping(args: argparse.Namespace) -> dict[str, Any]:
    """The lm_eval evaluator mapping that ``--tasks`` and its flags describe."""
    tasks = [t.strip() for t in (args.tasks or DEFAULT_EVAL_TASKS).split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks names no task")
    mapping: dict[str, Any] = {"kind": "lm_eval", "tasks": tasks}
    if args.batch_size is not None:
        mapping["batch_size"] = args.batch_size
    if args.num_fewshot is not None:
        mapping["num_fewshot"] = args.num_fewshot
    if args.include_path:
        mapping["include_paths"] = [str(p) for p in args.include_path]
    return mapping


def load_evaluator_file(path: Path) -> list[dict[str, Any]]:
    """The evaluator mapping(s) in a YAML file (or a bundled preset named without a folder or
    suffix), relative paths anchored at the file's folder."""
    import yaml

    from evomerge.bundled import bundled_folder

    preset = bundled_folder("evaluators") / "presets" / f"{path}.yaml"
    if not path.exists() and path.name == str(path) and not path.suffix and preset.is_file():
        path = preset
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        names = sorted(p.stem for p in preset.parent.glob("*.yaml"))
        hint = f"; bundled presets: {', '.join(names)}" if names and not path.suffix else ""
        raise ConfigError(f"evaluator file {path} does not exist{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read evaluator file {path} ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, dict) for item in items):
        raise ConfigError(
            f"{path} must hold one evaluator mapping (with a 'kind') or a list of them"
        )
    folder = path.expanduser().resolve().parent
    from evomerge.evaluate.registry import anchor_evaluator_paths

    return [anchor_evaluator_paths(dict(item), folder) for item in items]
