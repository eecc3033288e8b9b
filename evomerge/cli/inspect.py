"""``evomerge inspect``: task-vector statistics of fine-tunes against their base, and with
``--evaluator`` interpolation scans and their barriers (the numbers are
:mod:`evomerge.inspect`, the figures :mod:`evomerge.plots.inspect`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evomerge.cli.args import add_device, add_quiet, add_storage, parse_limit
from evomerge.errors import ConfigError


def add_commands(commands: Any) -> None:
    """Register ``inspect`` on the CLI's sub-parsers."""
    inspect = commands.add_parser(
        "inspect",
        help="task-vector statistics of fine-tunes (norms, cosines, sign conflicts, barriers)",
        description="Stream over the tensors of a base and its fine-tunes (or a study's models) "
        "and write, per layer and tensor kind: task-vector norms and their balance, pairwise "
        "cosines, sign-conflict rates (all entries, and those TIES keeps at --density), the "
        "mass TIES/DARE keep; with --evaluator, interpolation scans between the base and each "
        "source and between each pair of sources, with their barriers. Writes inspect.json, "
        "PNG heatmaps, scan.png and SUMMARY.md into --out.",
    )
    inspect.add_argument("sources", nargs="*", metavar="SOURCE", help="fine-tuned model folders")
    inspect.add_argument("--base", type=Path, help="the base model folder")
    add_storage(inspect, required=False, help="a study's database: inspect its base and sources")
    inspect.add_argument("--study", help="the study whose models to inspect (with --storage)")
    inspect.add_argument(
        "--evaluator",
        type=Path,
        help="YAML file of evaluator mapping(s) or a bundled preset: run interpolation scans",
    )
    inspect.add_argument(
        "--points", type=int, default=11, help="points per scan, ends included (default 11)"
    )
    inspect.add_argument(
        "--limit", type=parse_limit, help="documents per task for the scans (count or fraction)"
    )
    inspect.add_argument("--metric", help="the scanned metric (default: the first reported)")
    inspect.add_argument(
        "--lower-is-better", action="store_true", help="the metric is a loss (perplexity...)"
    )
    inspect.add_argument(
        "--density", type=float, default=0.2, help="TIES/DARE density for kept mass and "
        "top-entry conflicts (default 0.2)",
    )  # fmt: skip
    inspect.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    add_device(inspect)
    add_quiet(inspect)
    inspect.set_defaults(handler=cmd_inspect)


def _models(args: argparse.Namespace) -> tuple[str, list[str]]:
    if args.storage is not None or args.study is not None:
        if args.base is not None or args.sources:
            raise ConfigError("give either --base and SOURCE folders or --storage and --study")
        if args.storage is None or args.study is None:
            raise ConfigError("--storage and --study go together")
        from evomerge.study.read import open_store, stored_study_config

        config = stored_study_config(open_store(args.storage), args.study)
        return config.base, list(config.sources)
    if args.base is None:
        raise ConfigError("give --base BASE and one or more SOURCE folders (or --storage/--study)")
    if not args.sources:
        raise ConfigError("give one or more SOURCE folders after --base")
    return str(args.base), [str(s) for s in args.sources]


def cmd_inspect(args: argparse.Namespace) -> int:
    from evomerge.checkpoint import ModelFolder, check_compatible, source_labels
    from evomerge.cli.args import check_device
    from evomerge.inspect import inspect_models, summary_markdown, summary_remarks
    from evomerge.progress import progress_bar

    if not 0 < args.density <= 1:
        raise ConfigError(f"--density {args.density}: give a share in (0, 1]")
    if args.points < 2:
        raise ConfigError(f"--points {args.points}: a scan needs at least 2 points")
    device = check_device(args.device)
    base_path, source_paths = _models(args)
    mappings = None
    if args.evaluator is not None:
        from evomerge.cli.models import load_evaluator_file
        from evomerge.evaluate import parse_evaluator_config

        mappings = load_evaluator_file(args.evaluator)
        for mapping in mappings:
            parse_evaluator_config(mapping, str(args.evaluator))
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder")
    base = ModelFolder(base_path, label="base")
    labels = source_labels(source_paths)
    sources = [ModelFolder(p, label=label) for p, label in zip(source_paths, labels, strict=True)]
    check_compatible([base, *sources])
    if len(sources) < 2:
        print("one source: pairwise statistics (cosine, sign conflicts) are skipped")
    with progress_bar("inspecting tensors", len(base.tensors), not args.quiet) as advance:
        report = inspect_models(base, sources, labels, args.density, device, on_tensor=advance)
    report["base"] = str(base.path)
    report["paths"] = {label: str(s.path) for label, s in zip(labels, sources, strict=True)}
    if mappings is not None:
        report |= _scans(args, base, sources, labels, mappings, device)
    for folder in (base, *sources):
        folder.close()
    summary = summary_markdown(report)
    _write(args.out, report, summary)
    for remark in summary_remarks(report):
        print(f"- {remark}")
    print(f"inspection written to {args.out.resolve()}")
    if args.study is not None:  # an export's model card of this study links it
        from evomerge.study.read import open_store

        open_store(args.storage).record_inspection(args.study, str(args.out.resolve()), summary)
    return 0


def _scans(
    args: argparse.Namespace,
    base: Any,
    sources: list[Any],
    labels: list[str],
    mappings: list[dict[str, Any]],
    device: str,
) -> dict[str, Any]:
    from evomerge.evaluate.model_loading import load_model_for_eval
    from evomerge.evaluate.suite import score_model
    from evomerge.inspect import run_scan, scan_paths, scan_points
    from evomerge.progress import no_transformers_bars, progress_bar

    with no_transformers_bars():
        model, tokenizer = load_model_for_eval(base.path, device=device)
    names = [n for n in model.state_dict() if n in base.tensors]
    endpoints = {
        label: {name: folder.read(name, device).float() for name in names}
        for label, folder in zip(["base", *labels], [base, *sources], strict=True)
    }
    chosen: dict[str, str] = {}

    def score(current: Any) -> float:
        metrics, _ = score_model(current, tokenizer, mappings, args.limit)
        if "name" not in chosen:
            candidates = sorted(k for k in metrics if not k.endswith("_stderr"))
            name = args.metric or (candidates[0] if candidates else None)
            if name not in metrics:
                raise ConfigError(f"--metric {name}: the evaluators report {', '.join(candidates)}")
            chosen["name"] = name
        return float(metrics[chosen["name"]])

    paths = scan_paths(labels)
    ts = scan_points(args.points)
    with progress_bar("scanning", len(paths) * len(ts), not args.quiet) as advance:
        scans = run_scan(
            model, endpoints, paths, ts, score, not args.lower_is_better, on_point=advance
        )
    return {"metric": chosen.get("name"), "lower_is_better": args.lower_is_better, "scans": scans}


def _write(out: Path, report: dict[str, Any], summary: str) -> None:
    from evomerge.plots.inspect import (
        balance_grid,
        conflict_grid,
        cosine_grid,
        grid_figure,
        scan_figure,
    )
    from evomerge.plots.png import save_png
    from evomerge.util import json_safe

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "inspect.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
        (out / "SUMMARY.md").write_text(summary)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    grids = {
        "cosine.png": cosine_grid(report),
        "conflict.png": conflict_grid(report),
        "balance.png": balance_grid(report),
    }
    for name, grid in grids.items():
        if grid is not None:
            save_png(grid_figure(grid), out / name, "--out")
    if report.get("scans"):
        save_png(scan_figure(report["scans"], report["metric"]), out / "scan.png", "--out")
