"""``evomerge search``, ``resume`` and ``check``: run a study on the Ray workers, and check
everything a run needs before it starts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.cli.args import add_quiet, add_storage, add_study
from evomerge.errors import ConfigError

if TYPE_CHECKING:  # the driver imports torch: loaded only by the commands that run it
    from evomerge.study.config import StudyConfig
    from evomerge.study.driver import RunSummary, StudyDriver
    from evomerge.study.store import StudyStore


def add_commands(commands: Any) -> None:
    """Register ``search``, ``resume`` and ``check``."""
    search = commands.add_parser(
        "search",
        help="start a study described in a YAML file, on Ray workers",
        description="Create the study in its database (the YAML's 'storage', default "
        "evomerge_studies.db beside the YAML) and run it: baselines, then proposals merged "
        "in place and scored on Ray workers, until the budget. Ctrl-C stops cleanly; "
        "'evomerge resume' continues.",
    )
    search.add_argument("config", type=Path, help="study YAML file")
    add_storage(search, required=False, help="database URL or SQLite file (overrides the YAML)")
    add_quiet(search, help="no progress display")
    search.set_defaults(handler=cmd_search)

    resume = commands.add_parser(
        "resume",
        help="continue a stopped or crashed study from its database",
        description="Continue a study with the config stored in its database: trials left "
        "running are re-run with the same recipes, the proposer is restored, and the study "
        "ends with exactly its budget of finished trials. Name the study by its YAML (its "
        "storage and name are read from it) or by --storage and --study.",
    )
    resume.add_argument(
        "config", type=Path, nargs="?", help="the study's YAML file (only its storage and name)"
    )
    add_study(resume, required=False, overrides=True)
    add_quiet(resume, help="no progress display")
    resume.set_defaults(handler=cmd_resume)

    check = commands.add_parser(
        "check",
        help="check a study YAML, its database, the Ray cluster, GPUs and disk before a run",
        description="Check, without creating anything, what a study run needs: the YAML and "
        "what 'search' checks before it starts (models, space, proposer, evaluators, "
        "objectives), that the database answers and takes writes, that the study name is free, "
        "that the Ray cluster has the CPUs and GPUs the workers ask for, CUDA for device: cuda, "
        "that a worker's memory plan fits its GPU and host memory, and disk space for an "
        "export. Exit code 0 only if every check passes.",
    )
    check.add_argument("config", type=Path, help="study YAML file")
    add_storage(check, required=False, help="database URL or SQLite file (overrides the YAML)")
    check.add_argument(
        "--address",
        help="Ray cluster to check (HOST:PORT, auto, ray://HOST:10001); default: the YAML's "
        "cluster.address, else RAY_ADDRESS, else this machine",
    )
    check.add_argument(
        "--resume",
        action="store_true",
        help="the study exists and is to be continued with 'evomerge resume'",
    )
    check.add_argument(
        "--offline",
        action="store_true",
        help="contact nothing: skip the database, study, Ray and CUDA checks (the YAML, the "
        "models' headers, the memory plan and the disk are checked from files)",
    )
    check.add_argument(
        "--json", action="store_true", help="print one JSON object: the checks and the memory plan"
    )
    check.add_argument(
        "--gpu-memory",
        type=_size,
        metavar="SIZE",
        help="one GPU's memory for the memory plan, in bytes as written: 80GB is 80x10^9, "
        "80GiB is 80x2^30 (an '80 GB' H100 shows about 79.6 GiB); default: this machine's GPU "
        "(none when --offline)",
    )
    check.add_argument(
        "--host-memory",
        type=_size,
        metavar="SIZE",
        help="one node's memory for the memory plan (e.g. 512GB); default: this machine's",
    )
    check.set_defaults(handler=cmd_check)


def _size(text: str) -> int:
    from evomerge.util import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a size like 80GB, 80GiB or 85899345920"
        ) from None


def cmd_search(args: argparse.Namespace) -> int:
    from evomerge.study.config import load_study_config
    from evomerge.study.driver import StudyDriver
    from evomerge.study.preflight import preflight
    from evomerge.study.read import check_storage, open_store

    config = load_study_config(args.config)
    if args.storage:
        config = config.model_copy(update={"storage": args.storage})
    what = "--storage" if args.storage else f"{args.config}: storage"
    check_storage(config.storage or "", what=what)
    preflight(config, str(args.config))  # before the database is opened or a worker starts
    store = open_store(config.storage or "", what=what, create=True)
    driver = StudyDriver(store, config)
    return _run(driver, store, quiet=args.quiet, config=_yaml_alone(args))


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.study.driver import StudyDriver
    from evomerge.study.preflight import preflight
    from evomerge.study.read import open_store, stored_study_config
    from evomerge.study.store import mask_url

    storage, name, yaml_config = _resume_target(args)
    what = "--storage" if args.storage or yaml_config is None else f"{args.config}: storage"
    store = open_store(storage, what=what)
    store.check_free(name)  # a study another driver runs is refused before any check
    preflight(stored_study_config(store, name), f"study '{name}' in {mask_url(store.url)}")
    if yaml_config is not None:
        note = config_changes_note(args.config, yaml_config, store.study_config(name), name)
        if note:
            print(note, file=sys.stderr)
    driver = StudyDriver.for_stored(store, name)
    print(
        f"resuming study '{name}': {driver.finished} trials finished, "
        f"{len(driver.queue)} to re-run or start, {len(driver.promotions)} promotions pending",
        file=sys.stderr,
    )
    return _run(driver, store, quiet=args.quiet, config=_yaml_alone(args))


def _resume_target(args: argparse.Namespace) -> tuple[str, str, StudyConfig | None]:
    """The storage and study name that ``resume`` was given, from its flags or its YAML (the
    YAML's config too, to compare with the stored one)."""
    if args.config is None:
        if not (args.storage and args.study):
            raise ConfigError(
                "resume: give the study's YAML (evomerge resume STUDY.yaml), or both "
                "--storage and --study"
            )
        return args.storage, args.study, None
    from evomerge.study.config import load_study_config

    config = load_study_config(args.config)
    return args.storage or config.storage or "", args.study or config.name, config


def config_changes_note(
    path: Path, config: StudyConfig, stored: dict[str, Any], name: str
) -> str | None:
    """A warning when the YAML was edited since the study started (resume runs the stored
    config), or None when it was not."""
    mine = config.model_dump(mode="json")
    changed = sorted(
        key
        for key in mine.keys() | stored.keys()
        if key not in ("storage", "name") and mine.get(key) != stored.get(key)
    )
    if not changed:
        return None
    return (
        f"note: {path} differs from the config study '{name}' started with "
        f"({', '.join(changed)}); resume runs the stored config"
    )


def _yaml_alone(args: argparse.Namespace) -> Path | None:
    """The command's YAML if no flag overrode where it says the study is."""
    return None if args.storage or getattr(args, "study", None) else args.config


def _run(driver: StudyDriver, store: StudyStore, quiet: bool, config: Path | None = None) -> int:
    from evomerge.progress import no_transformers_bars
    from evomerge.study.live import live_progress
    from evomerge.study.store import resume_command

    driver.resume_hint = resume_command(driver.name, store.url, config)
    with no_transformers_bars(), live_progress(driver.name, enabled=not quiet) as show:
        summary = driver.run(on_progress=show)
    _report(summary, driver, store)
    if summary.status == "stopped":
        return 1 if driver.abort_reason else 130
    return 0


def _report(summary: RunSummary, driver: StudyDriver, store: StudyStore) -> None:
    from evomerge.study.report import pareto_report

    if summary.status == "stopped":
        why = f"{summary.reason}; " if driver.abort_reason else ""
        print(
            f"stopped: {why}{summary.finished} trials recorded ({summary.ran} in this run); "
            f"continue with: {driver.resume_hint}",
            file=sys.stderr,
        )
        return
    budget = f"/{summary.budget}" if summary.budget else ""
    print(f"study '{driver.name}' finished: {summary.finished}{budget} trials ({summary.reason})")
    print(pareto_report(store, driver.name))


def cmd_check(args: argparse.Namespace) -> int:
    from evomerge.study.check import ray_join_stuck, run_checks

    checks = run_checks(
        args.config,
        storage=args.storage,
        address=args.address,
        resume=args.resume,
        offline=args.offline,
        gpu_memory=args.gpu_memory,
        host_memory=args.host_memory,
    )
    failed = [c.name for c in checks if c.state == "FAIL"]
    if args.json:
        memory = next((c.data for c in checks if c.name == "memory"), None)
        report = {
            "ok": not failed,
            "checks": [{"name": c.name, "state": c.state, "detail": c.detail} for c in checks],
            "memory": memory,
        }
        print(json.dumps(report, indent=2), flush=True)
    else:
        for check in checks:
            print(check.line(), flush=True)
        skipped = [c.name for c in checks if c.state == "skip"]
        if failed:
            print(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}")
        elif skipped:
            print(f"no check failed; {len(skipped)} skipped: {', '.join(skipped)}")
        else:
            print(f"all {len(checks)} checks passed")
    if ray_join_stuck.is_set():  # Ray's threads would hold the interpreter at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if failed else 0)
    return 1 if failed else 0
