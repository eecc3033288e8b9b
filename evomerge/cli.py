"""The ``evomerge`` command line. User mistakes end in one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from evomerge import __version__
from evomerge.errors import ConfigError, EvomergeError


def main(argv: Sequence[str] | None = None) -> int:
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
    from evomerge.merge.recipe import load_yaml, parse_recipe

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


if __name__ == "__main__":
    raise SystemExit(main())
