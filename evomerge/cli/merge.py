"""``evomerge merge``, ``methods``, ``recipe`` and ``space``: build a merge from a recipe, and
look at methods, recipes and search spaces."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evomerge.cli.args import (
    add_allow_pickle,
    add_device,
    add_quiet,
    check_device,
    parse_size,
)
from evomerge.errors import ConfigError
from evomerge.util import DTYPES


def add_commands(commands: Any) -> None:
    """Register ``merge``, ``methods``, ``recipe`` and ``space``."""
    merge = commands.add_parser(
        "merge",
        help="merge models from an evomerge recipe or a mergekit YAML",
        description="Merge models from an evomerge recipe or a mergekit YAML (auto-detected) "
        "into a Hugging Face folder. The folder appears only when the merge is complete. "
        "A source may be a PEFT LoRA adapter folder (adapter_config.json + "
        "adapter_model.safetensors) of the base: it merges as the exact fine-tune "
        "base + B@A*alpha/r (alpha/sqrt(r) with rsLoRA). In a recipe, name the adapter folder as "
        "a source (the recipe needs a base); in a mergekit YAML, write 'model: BASE+ADAPTER' "
        "(the adapter applied to BASE) or name the adapter folder alone (applied to "
        "base_model). DoRA, trained biases, modules_to_save, alpha_pattern and embedding LoRA "
        "are refused.",
    )
    merge.add_argument("config", type=Path, help="recipe or mergekit YAML")
    merge.add_argument("out_dir", type=Path, help="output folder (must be empty or absent)")
    add_device(merge)
    merge.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="output dtype (default: the recipe's, else the base's)",
    )
    merge.add_argument(
        "--shard-size",
        default="5GB",
        type=parse_size,
        help="largest safetensors shard, e.g. 2GB, 500MB (default 5GB)",
    )
    merge.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    add_allow_pickle(merge)
    add_quiet(merge)
    merge.set_defaults(handler=cmd_merge)

    methods = commands.add_parser(
        "methods", help="list merge methods (one line each), or show the named ones in full"
    )
    methods.add_argument("names", nargs="*", metavar="NAME", help="methods to show in full")
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


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.card import model_card
    from evomerge.merge.config_file import plan_from_file
    from evomerge.merge.engine import merge_to_folder
    from evomerge.progress import progress_bar

    device = check_device(args.device)
    plan, kind = plan_from_file(args.config, allow_pickle=args.allow_pickle)
    if args.dtype:
        import dataclasses

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


def cmd_methods(args: argparse.Namespace) -> int:
    from evomerge.merge.registry import available_methods, get_method

    names = args.names or available_methods()
    methods = [get_method(name) for name in names]  # an unknown name lists what exists
    if not args.names:
        width = max(len(m.name) for m in methods)
        for method in methods:
            print(f"{method.name:<{width}}  {method.summary}")
        print("\n`evomerge methods NAME` shows a method's parameters.")
        return 0
    for number, method in enumerate(methods):
        if number:
            print()
        print(f"{method.name}: {method.summary}")
        base = "optional" if method.base_optional else "yes" if method.uses_base else "no"
        print(f"  base model: {base}; sources besides the base: {method.source_count_text}")
        print(f"  mergekit: {method.mergekit_name or 'no equivalent'}")
        fixed, per_source = method.temporaries
        print(
            f"  merge temporaries: {fixed:g} + {per_source:g} x sources copies of the largest "
            "tensor (float32, the memory plan's merge term)"
        )
        if method.aux:
            print(f"  needs per source: {', '.join(method.aux)}")
        if not method.params:
            print("  parameters: none")
        for spec in method.params:
            default = "required" if spec.required else f"default {spec.default!r}"
            scope = "per source" if spec.scope == "per_source" else "shared"
            print(f"  {spec.name} ({scope}, {default}, {spec.range_text()}): {spec.doc}")
    return 0


def cmd_recipe_show(args: argparse.Namespace) -> int:
    from collections import Counter

    from evomerge.merge.config_file import plan_from_file

    plan, kind = plan_from_file(args.config)
    print(
        f"{kind} config: method {plan.method}, {len(plan.jobs)} tensors, "
        f"fingerprint {plan.fingerprint()}"
    )
    if kind == "path":
        from evomerge.dataflow.recipe import parse_dataflow_recipe
        from evomerge.util import load_yaml

        path = parse_dataflow_recipe(load_yaml(args.config), str(args.config))
        print(f"  a layer path of {path.describe()}; outer model {path.outer}")
    elif len(plan.methods_used()) > 1:
        print(f"  methods: {plan.describe_methods()}")
    for index, label in enumerate(plan.labels):
        print(f"  model {index}: {label}  ({plan.models[index]})")
    if args.tensors:
        for job in plan.jobs:
            own = f"[{job.method}] " if job.method else ""
            scaled = f" x{job.scale:g}" if job.scale is not None else ""
            print(f"  {job.name}: {own}{job.shared_dict()} {job.per_source_dicts()}{scaled}")
    else:
        distinct = Counter(
            repr((job.method, job.shared, job.per_source, job.scale)) for job in plan.jobs
        )
        print(f"  {len(distinct)} distinct parameter settings (--tensors lists them)")
    return 0


def cmd_to_mergekit(args: argparse.Namespace) -> int:
    import yaml

    from evomerge.dataflow.recipe import is_dataflow_recipe
    from evomerge.merge.mergekit_compat import recipe_to_mergekit
    from evomerge.merge.recipe import parse_recipe
    from evomerge.util import load_yaml

    data = load_yaml(args.config)
    if is_dataflow_recipe(data):
        config = _path_to_mergekit(data, args.config)
    else:
        config = recipe_to_mergekit(parse_recipe(data, str(args.config)), args.config.parent)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.output:
        args.output.write_text(text)
    else:
        print(text, end="")
    return 0


def _path_to_mergekit(data: dict, file: Path) -> dict:
    """A path recipe file as mergekit passthrough slices (folders resolved against the file),
    or the reason mergekit cannot express it, as an error."""
    from evomerge.dataflow.mergekit import path_to_mergekit
    from evomerge.dataflow.recipe import parse_dataflow_recipe
    from evomerge.merge.recipe import resolve_path

    recipe = parse_dataflow_recipe(data, str(file))
    models = [
        m.model_copy(update={"model": resolve_path(m.model, file.parent)}) if m.model else m
        for m in recipe.models
    ]
    config, reason = path_to_mergekit(recipe.model_copy(update={"models": models}))
    if config is None:
        raise ConfigError(f"{file}: mergekit cannot express this path: {reason}")
    return config


def cmd_space_show(args: argparse.Namespace) -> int:
    from evomerge.checkpoint import ModelFolder, source_labels
    from evomerge.dataflow.space import DataflowSpace
    from evomerge.space import load_space

    space = load_space(args.space)
    base = ModelFolder(args.base)
    for source in args.source or []:
        ModelFolder(source)  # a missing or unreadable folder is named here
    labels = source_labels(args.source) if args.source else ["s0", "s1"]
    dataflow = isinstance(space, DataflowSpace)
    if not dataflow and space.method == "slerp" and not args.source:
        labels = ["s0"]
    try:
        bound = space.bind(base, labels)
    except ConfigError as exc:
        raise ConfigError(f"{args.space}: {exc}") from None
    rows = [("gene", "scope", "bounds", "scale"), *bound.table()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    kind = "data-flow (layer path)" if dataflow else space.method
    print(f"{space.name}: {kind}, {space.description.strip()}".rstrip(", "))
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    sources = ", ".join(labels) + ("" if args.source else " (placeholders; pass --source)")
    if dataflow:
        print(f"dimension {bound.dimension}: {bound.shape_text()}; sources {sources}")
        for merge in space.unresolved():
            print(f"merge '{merge.label}': study {merge.study}, resolved when a study is created")
        return 0
    fixed = ", ".join(f"{k}={v}" for k, v in space.fixed.items()) or "none"
    print(f"dimension {bound.dimension}; sources {sources}; fixed {fixed}; seed {space.seed}")
    return 0
