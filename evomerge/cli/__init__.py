"""The ``evomerge`` command line: one module per command group, shared arguments in
:mod:`evomerge.cli.args`. User mistakes end in one line on stderr and exit code 1.

Only this package imports ``argparse`` or ``evomerge.cli``; the command modules import the
library inside their handlers, so ``evomerge --help`` and ``--version`` load none of it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence

from evomerge import __version__
from evomerge.errors import EvomergeError

COMMAND_GROUPS = (
    "merge",
    "models",
    "fisher",
    "run",
    "study",
    "plot",
    "inspect",
    "export",
    "align",
    "dashboard",
    "reference",
)
"""The modules of this package that register commands, in the order ``--help`` lists them."""


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
    import importlib

    parser = argparse.ArgumentParser(
        prog="evomerge", description="Search for, and build, merges of fine-tuned language models."
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        importlib.import_module(f"evomerge.cli.{group}").add_commands(commands)
    return parser
