"""``evomerge config-reference``: every config field, generated from the code."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


def add_commands(commands: Any) -> None:
    """Register ``config-reference``."""
    reference = commands.add_parser(
        "config-reference",
        help="print the reference of every config file's fields (generated from the code)",
        description="Print, as Markdown, every field of the study YAML, proposers, evaluators, "
        "search spaces and recipes: type, bounds, default and meaning. --write FILE replaces "
        "the generated block in FILE (the README keeps one).",
    )
    reference.add_argument("--write", type=Path, metavar="FILE", help="update the block in FILE")
    reference.set_defaults(handler=cmd_config_reference)


def cmd_config_reference(args: argparse.Namespace) -> int:
    from evomerge.config_reference import generate, replace_block

    text = generate()
    if args.write is None:
        print(text, end="")
        return 0
    try:
        document = args.write.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--write {args.write}: {exc.strerror or exc}") from None
    updated = replace_block(document, text, str(args.write))
    if updated != document:
        args.write.write_text(updated, encoding="utf-8")
        print(f"updated the config reference in {args.write}")
    else:
        print(f"the config reference in {args.write} is up to date")
    return 0
