#!/usr/bin/env python
"""Load test: a long study (2,000 trials, 8 workers, no-op evaluator) on one machine.

Checks the reliability requirement "a study of 2,000 trials with a no-op evaluator and 8
workers on one machine completes with flat memory in the driver and a database that stays
small". Each study runs ``StudyDriver.run`` on the toy zoo in a fresh child process (so one
study's memory never counts against the next), with real Ray workers (``cluster.workers`` 8,
``cpus_per_worker`` 0.25 so they fit on 2 cores) and a python evaluator that returns two
numbers hashed from a few merged weights (distinct per genome, anti-correlated so the Pareto
front is not a single point). The child samples its own RSS every ``--sample-every`` finished
trials from the driver's ``on_progress`` hook, then measures the database (file size or
``pg_total_relation_size`` of the ``evomerge_`` tables), the proposer snapshots kept, and the
time of ``StudyStore.pareto`` / ``trials`` / ``study_status`` and of the ``evomerge status`` and
``evomerge pareto`` commands on the finished study. Nothing in the package is changed.

    .venv/bin/python scripts/bench_load.py                                  # SQLite, cma
    .venv/bin/python scripts/bench_load.py --storage sqlite,postgresql --proposer cma,random \\
        --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_report import markers, write_section  # noqa: E402

NAME = "bench_load"
MARK_BEGIN, MARK_END = markers(NAME)
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MILESTONES = (100, 500, 1000, 1500, 2000)
HELD = ("recipes", "values", "front", "jobs", "queue", "promotions", "batch")
"""StudyDriver attributes that could grow with the trials (those present are measured)."""
OBJECTIVES = [{"metric": "load/a"}, {"metric": "load/b"}]

EVALUATOR = '''
import hashlib

import torch


def noop(model, tokenizer):
    """Two numbers in [0, 1] hashed from the first entries of every merged tensor (one pair per
    genome); b falls as a rises, so many trials are on the Pareto front."""
    with torch.no_grad():
        head = torch.cat([p.detach().reshape(-1)[:4] for p in model.parameters()])
    digest = hashlib.blake2b(head.numpy().tobytes(), digest_size=16).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    v = int.from_bytes(digest[8:], "little") / 2**64
    return {"a": u, "b": (1.0 - u) * (0.9 + 0.1 * v)}
'''


# -- measuring -------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def deep_size(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of ``value`` and everything it holds (dicts, lists, tuples, scalars)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        size += sum(deep_size(v, seen) for v in value)
    return size


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (trials, MB) in MB per 1000 trials."""
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of ``repeats`` calls, and the last call's value."""
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return times, value


@contextlib.contextmanager
def database(kind: str, folder: Path, postgres: str) -> Iterator[tuple[str, str | None]]:
    """A fresh database: (URL, PostgreSQL schema or None); the schema is dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'load.db'}", None
        return
    import sqlalchemy

    schema = f"evomerge_load_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(postgres)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
        try:
            yield f"{postgres}?options=-csearch_path%3D{schema}", schema
        finally:
            with engine.begin() as connection:
                connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        engine.dispose()


def sqlite_size(path: Path) -> dict[str, Any]:
    """Bytes of the file (and any -wal / -shm left), per table with its indexes (dbstat),
    and the free pages."""
    import sqlite3

    files = {p.name: p.stat().st_size for p in path.parent.glob(path.name + "*")}
    connection = sqlite3.connect(str(path))
    try:
        page = connection.execute("PRAGMA page_size").fetchone()[0]
        free = connection.execute("PRAGMA freelist_count").fetchone()[0] * page
        tables: dict[str, int] = {}
        try:
            rows = connection.execute(
                "SELECT s.name, m.tbl_name, SUM(s.pgsize) FROM dbstat s "
                "LEFT JOIN sqlite_master m ON m.name = s.name GROUP BY s.name"
            ).fetchall()
            for name, table, size in rows:
                key = table or name
                tables[key] = tables.get(key, 0) + int(size)
        except sqlite3.OperationalError:  # no dbstat in this SQLite build
            pass
    finally:
        connection.close()
    return {"total": sum(files.values()), "files": files, "tables": tables, "free": free}


def postgres_size(postgres: str, schema: str) -> dict[str, Any]:
    """pg_total_relation_size (heap + TOAST + indexes) of every evomerge_ table in ``schema``
    as the run left them, the dead tuples autovacuum had not reclaimed yet, and the total
    after ``VACUUM FULL`` (the live data alone; the schema is dropped right after)."""
    import sqlalchemy

    query = sqlalchemy.text(
        "SELECT c.relname, pg_total_relation_size(c.oid), coalesce(s.n_dead_tup, 0) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
        "WHERE n.nspname = :schema AND c.relkind = 'r' AND c.relname LIKE 'evomerge%'"
    )
    engine = sqlalchemy.create_engine(postgres, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            rows = connection.execute(query, {"schema": schema}).fetchall()
            for name, _, _ in rows:
                connection.execute(sqlalchemy.text(f'VACUUM FULL "{schema}"."{name}"'))
            after = connection.execute(query, {"schema": schema}).fetchall()
    finally:
        engine.dispose()
    tables = {name: int(size) for name, size, _ in rows}
    return {
        "total": sum(tables.values()),
        "tables": tables,
        "dead_tuples": {name: int(dead) for name, _, dead in rows},
        "vacuumed": sum(int(size) for _, size, _ in after),
    }


def cli_times(url: str, study: str, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of whole ``evomerge`` commands (a new interpreter each, imports included)."""
    exe = Path(sys.executable).with_name("evomerge")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "evomerge.cli"]
    commands = {
        "version": [*base, "--version"],
        "status": [*base, "status", "--storage", url, "--study", study],
        "pareto": [*base, "pareto", "--storage", url, "--study", study],
    }
    out: dict[str, list[float]] = {}
    for name, command in commands.items():
        out[name] = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=os.environ.copy())
            out[name].append(time.perf_counter() - start)
    return out


# -- one study (child process) -----------------------------------------------------------------


def proposer_config(kind: str, popsize: int) -> dict[str, Any]:
    if kind == "cma":
        # A popsize that is a multiple of the workers (no idle worker at a generation's end)
        # and restarts so pycma's stop criteria cannot end the study before its budget.
        return {"kind": "cma", "seed": 0, "popsize": popsize, "restarts": 1000}
    return {"kind": kind, "seed": 0}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import func, select

    from evomerge.optimize import Objective, pareto_front
    from evomerge.study.config import parse_study_config
    from evomerge.study.driver import StudyDriver
    from evomerge.study.schema import SnapshotRow, TrialRow
    from evomerge.study.status import study_status
    from evomerge.study.store import StudyStore
    from evomerge.toy_zoo import build_toy_zoo

    zoo = build_toy_zoo(args.zoo.resolve())  # built by the parent: reused as is
    storage, kind = args.storage, args.proposer
    objectives = [Objective(**o) for o in OBJECTIVES]
    out: dict[str, Any] = {
        "storage": storage,
        "proposer": kind,
        "trials": args.trials,
    }
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        folder = Path(tmp)
        evaluator = folder / "load_evaluator.py"
        evaluator.write_text(EVALUATOR)
        with database(storage, folder, args.postgres) as (url, schema):
            name = f"load_{kind}"
            config = parse_study_config(
                {
                    "name": name,
                    "storage": url,
                    "base": str(zoo["base"]),
                    "sources": [str(zoo["ft_a"]), str(zoo["ft_b"])],
                    "space": args.space,
                    "proposer": proposer_config(kind, args.popsize),
                    "objectives": OBJECTIVES,
                    "evaluators": [
                        {"name": "load", "kind": "python", "function": f"{evaluator}:noop"}
                    ],
                    "budget": args.trials,
                    "cluster": {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker},
                    "baselines": False,
                },
                name,
            )
            store = StudyStore(url)
            driver = StudyDriver(store, config)
            snapshots = {"written": 0, "last_bytes": 0, "bytes": 0}
            add_snapshot = store._add_snapshot

            def counted(session: Any, study_id: int, state: bytes, told: int) -> None:
                snapshots["written"] += 1
                snapshots["last_bytes"] = len(state)
                snapshots["bytes"] += len(state)
                add_snapshot(session, study_id, state, told)

            store._add_snapshot = counted  # type: ignore[method-assign]
            samples: list[dict[str, Any]] = []
            marks = {"first": None}
            next_mark = [0]

            def on_progress(progress: Any) -> None:
                if progress.finished >= 1 and marks["first"] is None:
                    marks["first"] = time.perf_counter()
                if progress.finished < next_mark[0]:
                    return
                next_mark[0] = (progress.finished // args.sample_every + 1) * args.sample_every
                samples.append(
                    {
                        "finished": progress.finished,
                        "seconds": time.perf_counter() - started,
                        "blocks": sys.getallocatedblocks(),
                        **proc_status(),
                    }
                )

            started = time.perf_counter()
            summary = driver.run(on_progress=on_progress)
            ended = time.perf_counter()
            out["status"] = proc_status()
            out["summary"] = {"finished": summary.finished, "reason": summary.reason}
            out["wall"] = ended - started
            out["dispatch_wall"] = ended - (marks["first"] or started)
            out["samples"] = samples
            out["snapshots"] = snapshots
            # What the driver keeps per trial (attributes of this version of the driver).
            out["held"] = {
                name: {"entries": len(value), "bytes": deep_size(value)}
                for name in HELD
                if isinstance(value := getattr(driver, name, None), dict | list)
            }
            if hasattr(driver.proposer, "study"):
                out["proposer_trials"] = len(driver.proposer.study.trials)
            out["state_dict_bytes"] = len(driver.proposer.state_dict())
            store.engine.dispose()

            # -- the finished study, read back ---------------------------------------------------
            reader = StudyStore(url)
            trials = reader.trials(name)
            out["states"] = {
                s: sum(t.state == s for t in trials) for s in {t.state for t in trials}
            }
            out["numbers_ok"] = [t.number for t in trials] == list(range(args.trials))
            with reader.session() as session:
                out["snapshots_kept"] = session.scalar(select(func.count(SnapshotRow.id)))
                out["json_bytes"] = {
                    column: float(session.scalar(select(func.avg(func.length(field)))) or 0)
                    for column, field in (
                        ("recipe", TrialRow.recipe),
                        ("genome", TrialRow.genome),
                        ("told_values", TrialRow.told_values),
                    )
                }
            reads: dict[str, list[float]] = {}
            reads["trials"], _ = timed(lambda: reader.trials(name), args.repeats)
            reads["pareto"], front = timed(lambda: reader.pareto(name, objectives), args.repeats)
            points = [t.values(objectives) or [] for t in trials if t.state == "COMPLETE"]
            reads["pareto_front"], _ = timed(lambda: pareto_front(points, objectives), args.repeats)
            reads["study_status"], _ = timed(lambda: study_status(reader, name), args.repeats)
            out["front"] = len(front)
            reader.engine.dispose()
            out["reads"] = reads
            out["cli"] = cli_times(url, name, args.repeats)
            if storage == "sqlite":
                out["db"] = sqlite_size(folder / "load.db")
            else:
                out["db"] = postgres_size(args.postgres, schema or "")
    return out


# -- the report --------------------------------------------------------------------------------


def at(samples: list[dict[str, Any]], finished: int, key: str = "VmRSS") -> float | None:
    """MB of ``key`` at the first sample with at least ``finished`` trials."""
    for s in samples:
        if s["finished"] >= finished:
            return s[key] / 2**20
    return None


def half_slope(run: dict[str, Any], key: str, second: bool = True) -> float:
    trials = run["trials"]
    lo, hi = (trials // 2, trials) if second else (first_sample(run), trials // 2)
    points = [(s["finished"], s[key] / 2**20) for s in run["samples"] if lo <= s["finished"] <= hi]
    return slope(points)


def first_sample(run: dict[str, Any]) -> int:
    """The first sample after the workers started (the one at 0 trials is before Ray)."""
    later = [s["finished"] for s in run["samples"] if s["finished"] > 0]
    return min(later) if later else 0


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_text() -> str:
    import ray
    import sqlalchemy
    import torch

    memory = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) * 1024
    gpu = "CPU only (no GPU)" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {memory / 2**30:.1f} GiB RAM, {gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}, "
        f"SQLAlchemy {sqlalchemy.__version__}, SQLite {__import__('sqlite3').sqlite_version}"
    )


def postgres_version(url: str) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(sqlalchemy.text("SHOW server_version")).scalar())
    except sqlalchemy.exc.OperationalError:
        return ""
    finally:
        engine.dispose()


def label(run: dict[str, Any]) -> str:
    return run["proposer"]


def memory_table(runs: list[dict[str, Any]]) -> list[str]:
    marks = [m for m in MILESTONES if m <= max(r["trials"] for r in runs)]
    head = " | ".join(f"RSS @{m}" for m in marks)
    lines = [
        f"| proposer | storage | trials | complete | wall s | trials/s | RSS before Ray | {head} "
        "| slope 1st half | slope 2nd half | anon slope 2nd half | peak RSS |",
        "|---|---|---|---|---|---|---|" + "---|" * len(marks) + "---|---|---|---|",
    ]
    for r in runs:
        cells = " | ".join(fmt(at(r["samples"], m)) for m in marks)
        complete = r["states"].get("COMPLETE", 0)
        lines.append(
            f"| {label(r)} | {r['storage']} | {r['summary']['finished']} | {complete} | "
            f"{r['wall']:.1f} | {r['trials'] / r['dispatch_wall']:.1f} | "
            f"{r['samples'][0]['VmRSS'] / 2**20:.0f} | {cells} | "
            f"{half_slope(r, 'VmRSS', second=False):+.1f} | {half_slope(r, 'VmRSS'):+.1f} | "
            f"{half_slope(r, 'RssAnon'):+.1f} | {r['status']['VmHWM'] / 2**20:.0f} |"
        )
    return lines


def database_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| proposer | storage | database | bytes / trial | trials table | metrics table | "
        "snapshots table | other | free / dead | snapshots kept / written | last snapshot |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        db, tables = r["db"], r["db"]["tables"]
        n = r["trials"]
        trials, metrics = tables.get("evomerge_trials", 0), tables.get("evomerge_metrics", 0)
        snaps = tables.get("evomerge_snapshots", 0)
        other = sum(tables.values()) - trials - metrics - snaps
        if r["storage"] == "sqlite":
            free = f"{db['free'] / 1024:.0f} KB free pages"
        else:
            dead = db["dead_tuples"]
            free = ", ".join(f"{k.removeprefix('evomerge_')} {v}" for k, v in dead.items() if v)
            free = (free or "0") + " dead tuples; "
            free += f"{db['vacuumed'] / r['trials']:.0f} B/trial after `VACUUM FULL`"
        snap = r["snapshots"]
        lines.append(
            f"| {label(r)} | {r['storage']} | {db['total'] / 2**20:.2f} MB | "
            f"{db['total'] / n:.0f} | {trials / 2**20:.2f} MB ({trials / n:.0f} B/trial) | "
            f"{metrics / 2**20:.2f} MB ({metrics / n:.0f} B/trial) | {snaps / 1024:.0f} KB | "
            f"{other / 1024:.0f} KB | {free} | "
            f"{r['snapshots_kept']} / {snap['written']} | {snap['last_bytes'] / 1024:.0f} KB |"
        )
    return lines


def reads_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| proposer | storage | front | `trials()` | `pareto()` | of which `pareto_front` | "
        "`study_status()` | `evomerge status` | `evomerge pareto` | `evomerge --version` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        reads, cli = r["reads"], r["cli"]
        lines.append(
            f"| {label(r)} | {r['storage']} | {r['front']} | "
            f"{1000 * median(reads['trials']):.0f} ms | {1000 * median(reads['pareto']):.0f} ms | "
            f"{1000 * median(reads['pareto_front']):.0f} ms | "
            f"{1000 * median(reads['study_status']):.0f} ms | {median(cli['status']):.2f} s | "
            f"{median(cli['pareto']):.2f} s | {median(cli['version']):.2f} s |"
        )
    return lines


def held_text(runs: list[dict[str, Any]]) -> list[str]:
    parts = []
    for r in runs:
        held = ", ".join(
            f"`driver.{name}` {v['entries']} entries, {v['bytes'] / 2**20:.2f} MB "
            f"({v['bytes'] / r['trials']:.0f} B/trial)"
            for name, v in r["held"].items()
            if v["entries"]
        )
        text = (
            f"{label(r)}/{r['storage']}: {held}; proposer `state_dict()` "
            f"{r['state_dict_bytes'] / 1024:.0f} KB"
        )
        if "proposer_trials" in r:
            text += f" (Optuna in-memory study: {r['proposer_trials']} trials)"
        parts.append(text)
    return parts


def verdicts(runs: list[dict[str, Any]], flat_mb: float, db_bytes: float) -> list[str]:
    out = []
    for r in runs:
        complete = r["states"].get("COMPLETE", 0)
        done = r["summary"]["finished"] == r["trials"] == complete and r["numbers_ok"]
        growth = half_slope(r, "VmRSS")
        per_trial = r["db"]["total"] / r["trials"]
        out.append(
            f"- {label(r)}/{r['storage']}: budget {'completed' if done else 'NOT completed'} "
            f"({complete}/{r['trials']} COMPLETE); driver RSS over the second half "
            f"{growth:+.1f} MB per 1000 trials ({'flat' if growth <= flat_mb else 'NOT flat'} "
            f"by the <= {flat_mb:g} MB / 1000 trials bar); database {per_trial:.0f} bytes per "
            f"trial ({'small' if per_trial <= db_bytes else 'NOT small'} by the <= "
            f"{db_bytes:g} bar)."
        )
    return out


def source_text() -> str:
    """The commit measured, and the package files changed on top of it (read-only git)."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "evomerge").splitlines()]
    if not changed:
        return f"commit {commit}"
    return f"commit {commit} plus uncommitted changes in {', '.join(changed)}"


def measurement_meta(seconds: float, load: tuple[float, float], pg_version: str) -> dict[str, Any]:
    env = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 "
    env += "TOKENIZERS_PARALLELISM=false"
    command = shlex.join([".venv/bin/python", "scripts/bench_load.py", *sys.argv[1:]])
    return {
        "date": datetime.date.today().isoformat(),
        "command": f"{env} {command}",
        "machine": machine_text(),
        "source": source_text(),
        "seconds": seconds,
        "load": list(load),
        "pg_version": pg_version,
    }


def report(args: argparse.Namespace, runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    pg_version, load = meta["pg_version"], meta["load"]
    pg = f" PostgreSQL {pg_version} on the same machine (trust auth)." if pg_version else ""
    lines = [
        MARK_BEGIN,
        "## Load: a 2,000-trial study, 8 workers, no-op evaluator (`scripts/bench_load.py`)",
        "",
        f"Measured {meta['date']} on {meta['source']}. Command: `{meta['command']}`. Machine: "
        f"{meta['machine']}.{pg} Load average (1 min) before / after {load[0]:.2f} / "
        f"{load[1]:.2f}; **another engineer ran tests on the same 2 cores during the "
        "measurement**, so wall times, trials/s and read times are noisy (memory and sizes "
        f"are not). Total run time of the script {meta['seconds']:.0f} s.",
        "",
        f"Each study runs `StudyDriver.run` in a fresh child process on the toy zoo (space "
        f"`{args.space}`, {args.workers} Ray workers with `cpus_per_worker: "
        f"{args.cpus_per_worker:g}`, `baselines: false`, budget {args.trials} trials, two "
        "objectives) with a python evaluator that hashes the first entries of every merged "
        "tensor into `a` in [0, 1] and `b = (1 - a)(0.9 + 0.1 v)`, so no two genomes score "
        "the same and many trials sit on the Pareto front. Proposers: `cma` "
        f"(popsize {args.popsize}, restarts allowed so it never stops early; bounded state) "
        "and `random` (Optuna; its in-memory study holds every trial). The child samples its "
        f"own `/proc/self/status` every {args.sample_every} finished trials from the "
        "driver's `on_progress` hook.",
        "",
        "### Driver memory",
        "",
        "RSS in MB at the first result on or after N finished trials (before Ray: the sample "
        "at 0 trials, taken before the local Ray instance and the workers start); slopes are "
        "least-squares fits of the samples, MB per 1000 trials, first half from the first "
        f"sample after the start ({args.sample_every} trials) to trial "
        f"{args.trials // 2}, second half from {args.trials // 2} to {args.trials}; "
        "anon = `RssAnon` (heap, without file-backed pages). wall s = `run()` from start "
        "(Ray and worker start-up included) to end; trials/s over the time from the first "
        "result to the end.",
        "",
        *memory_table(runs),
        "",
        "What the driver holds per trial at the end (deep `sys.getsizeof`): "
        + "; ".join(held_text(runs))
        + ".",
        "",
        "### Database size",
        "",
        "SQLite: the database file after the driver closed it (the WAL is checkpointed away "
        "on close), per table with its indexes from `dbstat`. PostgreSQL: "
        "`pg_total_relation_size` (heap, TOAST, indexes) of the `evomerge_` tables right "
        "after the run, dead tuples from `pg_stat_user_tables` (not yet vacuumed), and the "
        "size per trial after a `VACUUM FULL` of those tables (the live rows alone; autovacuum "
        "makes dead rows' space reusable but never gives it back to the disk). The driver "
        "writes the proposer state every 50 results and keeps the newest 2.",
        "",
        *database_table(runs),
        "",
        "Mean stored JSON per trial row: "
        + "; ".join(
            f"{label(r)}/{r['storage']}: recipe {r['json_bytes']['recipe']:.0f} B, genome "
            f"{r['json_bytes']['genome']:.0f} B, told values {r['json_bytes']['told_values']:.0f} B"
            for r in runs
        )
        + ".",
        "",
        "### Reading the finished study",
        "",
        f"In-process on a fresh `StudyStore` (median of {args.repeats}): `trials(name)`, "
        "`pareto(name, objectives)` (`trials` of the COMPLETE ones + `pareto_front`), "
        "`pareto_front` alone on the 2-objective points, `study_status` (what "
        "`evomerge status` computes). Commands: whole `evomerge` processes, interpreter "
        f"start and imports included (median of {args.repeats}); `--version` is the start-up "
        "floor.",
        "",
        *reads_table(runs),
        "",
        f"Verdicts (bars of this benchmark: flat = RSS slope over the second half <= "
        f"{args.flat_mb:g} MB per 1000 trials, i.e. about {args.flat_mb:g} KB per trial, less "
        "than a trial's own row in the database; small = <= "
        f"{args.db_bytes:g} bytes per trial, about twice the JSON a trial row holds):",
        "",
        *verdicts(runs, args.flat_mb, args.db_bytes),
        MARK_END,
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cpus-per-worker", type=float, default=0.25)
    parser.add_argument("--storage", default="sqlite", help="sqlite, postgresql or both (comma)")
    parser.add_argument("--proposer", default="cma", help="proposer kinds, comma-separated")
    parser.add_argument("--popsize", type=int, default=16, help="CMA-ES popsize")
    parser.add_argument("--space", default="task_arithmetic_per_layer")
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed reads and commands")
    parser.add_argument("--flat-mb", type=float, default=2.0, help="MB / 1000 trials bar")
    parser.add_argument("--db-bytes", type=float, default=4096, help="bytes / trial bar")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--postgres", default=POSTGRES, help="database to make schemas in")
    parser.add_argument("--write", type=Path, help=f"update this Markdown file's {NAME} part")
    parser.add_argument("--save-json", type=Path, help="also write every run's raw numbers here")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="only render the report of a --save-json file (give the same study options)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trials < 2 or args.workers < 1 or args.sample_every < 1:
        parser.error("--trials >= 2, --workers >= 1, --sample-every >= 1")
    return args


def child_command(args: argparse.Namespace, storage: str, proposer: str, out: Path) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(out),
        "--trials",
        str(args.trials),
        "--workers",
        str(args.workers),
        "--cpus-per-worker",
        str(args.cpus_per_worker),
        "--storage",
        storage,
        "--proposer",
        proposer,
        "--popsize",
        str(args.popsize),
        "--space",
        args.space,
        "--sample-every",
        str(args.sample_every),
        "--repeats",
        str(args.repeats),
        "--zoo",
        str(args.zoo),
        "--postgres",
        args.postgres,
    ]


def main() -> int:
    args = parse_args()
    if args.child is not None:
        args.child.write_text(json.dumps(run_child(args)))
        return 0
    if args.from_json is not None:  # render a saved measurement again
        saved = json.loads(args.from_json.read_text())
        text = report(args, saved["runs"], saved["meta"])
        print(text)
        if args.write:
            write_section(args.write, NAME, text)
        return 0
    from evomerge.toy_zoo import build_toy_zoo

    storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    proposers = [p.strip() for p in args.proposer.split(",") if p.strip()]
    pg_version = postgres_version(args.postgres) if "postgresql" in storages else ""
    if "postgresql" in storages and not pg_version:
        print(f"PostgreSQL at {args.postgres} is not reachable: SQLite only", file=sys.stderr)
        storages.remove("postgresql")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    build_toy_zoo(args.zoo.resolve())
    plan = [(storage, proposer) for storage in storages for proposer in proposers]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        for index, (storage, proposer) in enumerate(plan):
            out = Path(tmp) / f"run{index}.json"
            begun = time.perf_counter()
            subprocess.run(child_command(args, storage, proposer, out), check=True)
            run = json.loads(out.read_text())
            runs.append(run)
            print(
                f"{label(run)}/{storage}: {run['summary']['finished']} trials, "
                f"{run['states']}, {run['wall']:.1f} s run, RSS "
                + ", ".join(f"{fmt(at(run['samples'], m), '.0f')}" for m in MILESTONES)
                + f" MB, slope 2nd half {half_slope(run, 'VmRSS'):+.1f} MB/1000, db "
                f"{run['db']['total'] / run['trials']:.0f} B/trial, pareto "
                f"{1000 * median(run['reads']['pareto']):.0f} ms; "
                f"{time.perf_counter() - begun:.0f} s",
                file=sys.stderr,
            )
    seconds = time.perf_counter() - started
    meta = measurement_meta(seconds, (load_before, os.getloadavg()[0]), pg_version)
    if args.save_json:
        args.save_json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    text = report(args, runs, meta)
    print(text)
    if args.write:
        write_section(args.write, NAME, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
