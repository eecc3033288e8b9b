"""The ``evomerge`` command line. User mistakes end in one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.errors import ConfigError, EvomergeError


def main(argv: Sequence[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A command started in the background of a script inherits SIGINT ignored; every
        # command here stops cleanly on it (search and resume: the trials in flight requeued).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("evomerge: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Search for, and build, merges of fine-tuned language models."
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge",
        help="merge models from an evomerge recipe or a mergekit YAML",
        description="Merge models from an evomerge recipe or a mergekit YAML (auto-detected) "
        "into a Hugging Face folder. The folder appears only when the merge is complete.",
    )
    merge.add_argument("config", type=Path, help="recipe or mergekit YAML")
    merge.add_argument("out_dir", type=Path, help="output folder (must be empty or absent)")
    merge.add_argument("--device", default="cpu", help="where to compute: cpu, cuda, cuda:1 ...")
    merge.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="output dtype (default: the recipe's, else the base's)",
    )
    merge.add_argument(
        "--shard-size",
        default="5GB",
        type=parse_size,
        help="largest safetensors shard, e.g. 2GB, 500MB (default 5GB)",
    )
    merge.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin checkpoints (loaded with weights_only=True)",
    )
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(handler=cmd_merge)

    methods = commands.add_parser("methods", help="list merge methods and their parameters")
    methods.set_defaults(handler=cmd_methods)

    recipe = commands.add_parser("recipe", help="inspect or convert a recipe")
    recipe_cmds = recipe.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    show = recipe_cmds.add_parser("show", help="resolve a recipe or mergekit YAML and summarise it")
    show.add_argument("config", type=Path)
    show.add_argument("--tensors", action="store_true", help="print every tensor's parameters")
    show.set_defaults(handler=cmd_recipe_show)
    to_mk = recipe_cmds.add_parser("to-mergekit", help="write an evomerge recipe as mergekit YAML")
    to_mk.add_argument("config", type=Path)
    to_mk.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    to_mk.set_defaults(handler=cmd_to_mergekit)

    demo = commands.add_parser("demo", help="build a tiny model family and merge it")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("demo_output"),
        help="where the models and the merge go (default ./demo_output)",
    )
    demo.set_defaults(handler=cmd_demo)

    from evomerge.study import check as study_check
    from evomerge.study import dashboard as study_dashboard
    from evomerge.study import export as study_export
    from evomerge.study import launch as study_launch
    from evomerge.study import plots as study_plots
    from evomerge.study import report as study_report

    study_launch.add_commands(commands)
    study_report.add_commands(commands)
    study_export.add_commands(commands)
    study_check.add_commands(commands)
    study_plots.add_commands(commands)
    study_dashboard.add_commands(commands)

    from evomerge import config_reference

    config_reference.add_commands(commands)

    space = commands.add_parser("space", help="inspect search spaces")
    space_cmds = space.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    space_show = space_cmds.add_parser(
        "show",
        help="list a search space's genes for a base model and sources",
        description="Bind a search space (a YAML file, or the name of a ready one in "
        "search_spaces/) to a base model and print its genes: name, scope, bounds, scale.",
    )
    space_show.add_argument("space", help="search space YAML file or ready space name")
    space_show.add_argument("--base", type=Path, required=True, help="base model folder")
    space_show.add_argument(
        "--source",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="source model folder (repeatable; default: two sources named s0, s1)",
    )
    space_show.set_defaults(handler=cmd_space_show)

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
    zoo.add_argument("--quiet", action="store_true", help="no progress bar")
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
    what.add_argument("--evaluator", type=Path, help="YAML file of evaluator mapping(s)")
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
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    evaluate.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="load dtype (default: float32 on cpu, the checkpoint's elsewhere)",
    )
    evaluate.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin checkpoints (loaded with weights_only=True)",
    )
    evaluate.add_argument(
        "--json", action="store_true", help='print {"metrics": {...}, "seconds": s}'
    )
    evaluate.set_defaults(handler=cmd_eval)
    return parser


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5*10**9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 5GB, 500MB or 1000000")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1]] if unit else 0
    base = 1024 if "i" in unit else 1000
    size = int(number * base**power)
    if size <= 0:
        raise argparse.ArgumentTypeError("the shard size must be positive")
    return size


def parse_limit(text: str) -> int | float:
    """'50' -> 50, '0.25' -> 0.25; the evaluators check the range."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a number (a count like 50 or a fraction like 0.25)"
        ) from None
    return int(value) if value.is_integer() else value


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.card import model_card
    from evomerge.merge.config_file import plan_from_file
    from evomerge.merge.engine import merge_to_folder
    from evomerge.progress import progress_bar

    device = check_device(args.device)
    plan, kind = plan_from_file(args.config, allow_pickle=args.allow_pickle)
    if args.dtype:
        plan = dataclasses.replace(plan, out_dtype=args.dtype)
    card = model_card(plan, args.config.read_text(), kind)
    with progress_bar("merging", total=len(plan.jobs), enabled=not args.quiet) as advance:
        out = merge_to_folder(
            plan,
            args.out_dir,
            device=device,
            shard_size=args.shard_size,
            force=args.force,
            model_card=card,
            progress=advance,
            allow_pickle=args.allow_pickle,
        )
    print(f"merged {len(plan.jobs)} tensors with {plan.method} ({kind} config) into {out}")
    return 0


def check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"--device '{device}' is not a device name (cpu, cuda, cuda:0, ...)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from evomerge.merge.registry import available_methods, get_method

    table = Table(title="merge methods")
    for column in ("method", "base", "sources", "parameters", "mergekit"):
        table.add_column(column)
    for name in available_methods():
        method = get_method(name)
        params = ", ".join(
            f"{p.name}{'' if p.required else '=' + repr(p.default)}"
            + (" (per source)" if p.scope == "per_source" else "")
            for p in method.params
        )
        count = (
            f"{method.min_sources}+"
            if method.max_sources is None
            else str(method.min_sources)
            if method.max_sources == method.min_sources
            else f"{method.min_sources}-{method.max_sources}"
        )
        table.add_row(
            name, "yes" if method.uses_base else "no", count, params, method.mergekit_name or "-"
        )
    Console().print(table)
    return 0


def cmd_recipe_show(args: argparse.Namespace) -> int:
    from collections import Counter

    from evomerge.merge.config_file import plan_from_file

    plan, kind = plan_from_file(args.config)
    print(
        f"{kind} config: method {plan.method}, {len(plan.jobs)} tensors, "
        f"fingerprint {plan.fingerprint()}"
    )
    for index, label in enumerate(plan.labels):
        print(f"  model {index}: {label}  ({plan.models[index]})")
    if args.tensors:
        for job in plan.jobs:
            print(f"  {job.name}: {job.shared_dict()} {job.per_source_dicts()}")
    else:
        distinct = Counter(repr((job.shared, job.per_source)) for job in plan.jobs)
        print(f"  {len(distinct)} distinct parameter settings (--tensors lists them)")
    return 0


def cmd_to_mergekit(args: argparse.Namespace) -> int:
    import yaml

    from evomerge.merge.mergekit_compat import recipe_to_mergekit
    from evomerge.merge.recipe import parse_recipe
    from evomerge.util import load_yaml

    recipe = parse_recipe(load_yaml(args.config), str(args.config))
    text = yaml.safe_dump(recipe_to_mergekit(recipe, args.config.parent), sort_keys=False)
    if args.output:
        args.output.write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.demo import run_demo

    run_demo(args.workdir)
    return 0


def cmd_space_show(args: argparse.Namespace) -> int:
    from evomerge.checkpoint import ModelFolder
    from evomerge.space import load_space

    space = load_space(args.space)
    base = ModelFolder(args.base)
    labels = [ModelFolder(s).label for s in args.source] if args.source else ["s0", "s1"]
    if space.method == "slerp" and not args.source:
        labels = ["s0"]
    try:
        bound = space.bind(base, labels)
    except ConfigError as exc:
        raise ConfigError(f"{args.space}: {exc}") from None
    rows = [("gene", "scope", "bounds", "scale"), *bound.table()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"{space.name}: {space.method}, {space.description.strip()}".rstrip(", "))
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    fixed = ", ".join(f"{k}={v}" for k, v in space.fixed.items()) or "none"
    sources = ", ".join(labels) + ("" if args.source else " (placeholders; pass --source)")
    print(f"dimension {bound.dimension}; sources {sources}; fixed {fixed}; seed {space.seed}")
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
    from evomerge.evaluate import build_evaluator, parse_evaluator_config
    from evomerge.evaluate.model_loading import load_model_for_eval

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
    configs = [
        parse_evaluator_config(
            mapping, f"{where} evaluator {index}" if len(mappings) > 1 else where
        )
        for index, mapping in enumerate(mappings)
    ]
    from evomerge.progress import no_transformers_bars

    device = check_device(args.device)
    with no_transformers_bars():
        model, tokenizer = load_model_for_eval(
            args.model_dir, device=device, dtype=args.dtype, allow_pickle=args.allow_pickle
        )
    metrics: dict[str, float] = {}
    seconds = 0.0
    for config in configs:
        evaluator = build_evaluator(config, model, tokenizer)
        try:
            result = evaluator.evaluate(args.limit)
        finally:
            evaluator.close()
        clash = sorted(set(result.metrics) & set(metrics))
        if clash:
            raise ConfigError(
                f"{where}: two evaluators both produce metric {clash[0]}; give them "
                "different tasks or names"
            )
        metrics.update(result.metrics)
        seconds += result.seconds
    if args.json:
        print(
            json.dumps(
                {
                    "metrics": {k: _json_number(v) for k, v in sorted(metrics.items())},
                    "seconds": round(seconds, 4),
                },
                indent=2,
            )
        )
    else:
        print(format_metrics(metrics))
        print(f"evaluated {args.model_dir} in {seconds:.2f} s")
    return 0


def lm_eval_mapping(args: argparse.Namespace) -> dict[str, Any]:
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
    """The evaluator mapping(s) in a YAML file, relative paths anchored at the file's folder."""
    import yaml

    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"evaluator file {path} does not exist") from None
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


def format_metrics(metrics: dict[str, float]) -> str:
    """One row per metric (sorted); a ``<metric>_stderr`` value is shown as ``± x`` beside it."""
    rows = []
    for key in sorted(metrics):
        if key.endswith("_stderr") and key.removesuffix("_stderr") in metrics:
            continue
        value = f"{metrics[key]:.4f}"
        stderr = metrics.get(f"{key}_stderr")
        if stderr is not None:
            value += f" ± {stderr:.4f}"
        rows.append((key, value))
    width = max([len("metric"), *(len(key) for key, _ in rows)])
    lines = [f"{'metric':<{width}}  value"]
    lines += [f"{key:<{width}}  {value}" for key, value in rows]
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    raise SystemExit(main())
