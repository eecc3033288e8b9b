"""``evomerge studies``, ``status``, ``pareto`` and ``confirm``: reading a study back, and
scoring its answer on the documents it never saw."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evomerge.cli.args import add_storage, add_study
from evomerge.errors import ConfigError


def add_commands(commands: Any) -> None:
    """Register ``studies``, ``status`` and ``pareto``."""
    studies = commands.add_parser("studies", help="list the studies in a study database")
    add_storage(studies)
    studies.set_defaults(handler=cmd_studies)

    status = commands.add_parser(
        "status",
        help="progress, failures, best trials and workers of a study",
        description="Summarise a study: its progress against the budget, trials by state, "
        "throughput, failure reasons, the best trial per objective and by the weighted sum, "
        "the Pareto front's size and what each worker did.",
    )
    add_study(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=cmd_status)

    pareto = commands.add_parser(
        "pareto",
        help="the Pareto front of a study, as a table (and a plot)",
        description="List the Pareto front, best weighted sum first. The # column numbers the "
        "rows: 'evomerge export --trial pareto:K' exports row K.",
    )
    add_study(pareto)
    pareto.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pareto.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the trials and the front here"
    )
    pareto.set_defaults(handler=cmd_pareto)

    confirm = commands.add_parser(
        "confirm",
        help="score a study's front and baselines on its held-out documents",
        description="Re-score trials on the documents the search never saw (the evaluators' "
        "'holdout' share) and store the scores as fidelity 'holdout', beside the searched-on "
        "ones in status, pareto, the dashboard and exported model cards. A study does this by "
        "itself when it ends; run it for a study that was stopped, or for other trials.",
    )
    add_study(confirm)
    confirm.add_argument(
        "--trials",
        default="pareto",
        help="pareto (the front and the baselines; the default), best (the best and the "
        "baselines) or trial numbers: 3,7,12",
    )
    confirm.add_argument(
        "--redo", action="store_true", help="score again the trials already confirmed"
    )
    confirm.add_argument(
        "--device", default=None, help="where to merge and score (default: the study's device)"
    )
    confirm.add_argument("--quiet", action="store_true", help="no progress bar")
    confirm.set_defaults(handler=cmd_confirm)


def cmd_studies(args: argparse.Namespace) -> int:
    from evomerge.study.read import open_store
    from evomerge.study.report import studies_table

    print(studies_table(open_store(args.storage)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from evomerge.study.read import open_store
    from evomerge.study.report import format_status
    from evomerge.study.status import study_status
    from evomerge.util import json_safe

    status = study_status(open_store(args.storage), args.study)
    if args.json:
        print(json.dumps(json_safe(status), indent=2))
    else:
        print(format_status(status))
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from evomerge.plots.pareto import plot_pareto
    from evomerge.plots.png import check_png_path
    from evomerge.study.read import open_store, study_objectives
    from evomerge.study.report import pareto_json, pareto_text

    plot = check_png_path(args.plot, "--plot") if args.plot is not None else None
    store = open_store(args.storage)
    objectives = study_objectives(store, args.study)
    front = store.pareto(args.study, objectives)
    if plot is not None and not front:
        raise ConfigError(
            f"study '{args.study}' has no complete trial with all objectives yet; nothing to plot"
        )
    trials = store.trials(args.study) if plot is not None else []
    if args.json:
        print(pareto_json(front, objectives))
    else:
        print(pareto_text(front, objectives, args.study))
    if plot is not None:
        plot_pareto(plot, args.study, trials, front, objectives)
        if not args.json:
            print(f"plot written to {plot}")
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    from evomerge.cli.args import check_device
    from evomerge.progress import no_transformers_bars, progress_bar
    from evomerge.study.confirm import confirm_study
    from evomerge.study.read import open_store, study_objectives
    from evomerge.study.report import pareto_text

    device = None if args.device is None else check_device(args.device)
    store = open_store(args.storage)
    with (
        no_transformers_bars(),
        progress_bar("confirming", total=0, enabled=not args.quiet) as advance,
    ):
        result = confirm_study(
            store, args.study, args.trials, device=device, redo=args.redo, progress=advance
        )
    if not result.confirmed and not result.failed:
        print(
            f"nothing to confirm: the trials chosen by --trials {args.trials} have held-out "
            "scores already (--redo scores them again)"
        )
    else:
        print(f"scored {len(result.confirmed)} trial(s) on the held-out documents")
    for number, error in sorted(result.failed.items()):
        print(f"trial {number} failed: {error}")
    objectives = study_objectives(store, args.study)
    print(pareto_text(store.pareto(args.study, objectives), objectives, args.study))
    return 1 if result.failed else 0
