#!/usr/bin/env python
"""Study service overhead: driver + database time per trial, worker utilization, CMA-ES boundaries.

Every study runs on the toy zoo through ``StudyDriver.run`` with real Ray workers and
``baselines: false``; the driver is timed from outside (its ``next_task`` and ``on_result``,
the store's writes, the proposer's ask/tell/state_dict, SQL statements, commits and pings are
wrapped on the instances; nothing in the package is changed).

1. Overhead: a no-op python evaluator (two numbers hashed from a few merged weights, so CMA-ES
   sees distinct values: constant ones end its run after one generation by its tie rule), per
   proposer and storage (SQLite file, PostgreSQL schema).
2. Utilization: an evaluator that sleeps a duration drawn from a hash of the merged weights
   (uniform ``--sleep``), 2 workers; busy = merge + eval seconds of every trial, over workers x
   the wall time from the first ``next_task`` to the last result (worker start-up excluded).

Writes a Markdown section into BENCHMARKS.md with ``--write``.

    .venv/bin/python scripts/bench_service.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_report import markers, write_section  # noqa: E402

NAME = "bench_service"
MARK_BEGIN, MARK_END = markers(NAME)
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
OVERHEAD_TARGET_MS = 5.0
UTILIZATION_TARGET = 0.95
ASYNC_KINDS = ("random", "tpe", "nsga2", "qmc")
WINDOW = 100
"""Trials in the first / last window when comparing early and late per-trial cost."""

EVALUATORS = '''
import hashlib
import random
import time

import torch


def _rng(model):
    """A generator seeded by a few entries of every merged tensor: one per genome."""
    with torch.no_grad():
        head = torch.cat([p.detach().reshape(-1)[:4] for p in model.parameters()])
    return random.Random(hashlib.blake2b(head.numpy().tobytes(), digest_size=16).digest())


def noop(model, tokenizer):
    rng = _rng(model)
    return {"a": rng.random(), "b": rng.random()}


def sleepy(model, tokenizer, low, high):
    rng = _rng(model)
    time.sleep(rng.uniform(low, high))
    return {"a": rng.random(), "b": rng.random()}
'''


# -- measuring a driver from outside ---------------------------------------------------------


@dataclass
class Cost:
    """One driver call: wall and thread CPU seconds, and seconds (or counts) per part."""

    wall: float = 0.0
    cpu: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def __add__(self, other: Cost) -> Cost:
        parts: dict[str, float] = defaultdict(float, self.parts)
        for key, value in other.parts.items():
            parts[key] += value
        return Cost(self.wall + other.wall, self.cpu + other.cpu, parts)


class Recorder:
    """Wraps a StudyDriver's per-trial calls (on the instance) and records what they cost and
    when workers sat idle."""

    def __init__(self, driver: Any, workers: int) -> None:
        self.driver = driver
        self.workers = workers
        self.current: Cost | None = None
        self.asks: dict[int, Cost] = {}
        self.results: dict[int, Cost] = {}
        self.empty = Cost()
        """``next_task`` calls that returned None."""
        self.none_returns: dict[str, int] = defaultdict(int)
        self.events: list[tuple[float, int, str]] = []
        """(time, tasks in flight after it, what idle workers wait for from then on)."""
        self.busy = 0.0
        self.first: float | None = None
        self.last = 0.0
        self.snapshot_bytes = 0
        self._install()

    def _install(self) -> None:
        from sqlalchemy import event

        driver, store = self.driver, self.driver.store
        for name in ("add_trial", "finish_trial", "set_state", "add_metrics"):
            self._time(store, name, "db")
        self._time(store.engine.dialect, "do_commit", "commit")
        self._time(store.engine.dialect, "do_rollback", "commit")
        self._time(store.engine.dialect, "do_ping", "ping")
        event.listen(store.engine, "before_cursor_execute", self._before_sql)
        event.listen(store.engine, "after_cursor_execute", self._after_sql)
        for name in ("ask", "tell", "tell_failed", "state_dict"):
            self._time(driver.proposer, name, "tell" if name == "tell_failed" else name)
        self._time(driver, "_recipe", "recipe")
        self._next_task, self._on_result = driver.next_task, driver.on_result
        driver.next_task, driver.on_result = self.next_task, self.on_result

    def _time(self, owner: Any, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                value = inner(*args, **kwargs)
            finally:
                self._add(part, time.perf_counter() - start)
            if name == "state_dict":
                self.snapshot_bytes = len(value)
            return value

        setattr(owner, name, timed)

    def _add(self, part: str, value: float) -> None:
        if self.current is not None:
            self.current.parts[part] += value

    def _before_sql(self, conn: Any, *_: Any) -> None:
        conn.info["bench_sql_start"] = time.perf_counter()
        self._add("statements", 1)

    def _after_sql(self, conn: Any, *_: Any) -> None:
        self._add("sql", time.perf_counter() - conn.info.pop("bench_sql_start"))

    def _timed_call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, Cost]:
        cost = Cost()
        self.current = cost
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            value = fn(*args)
        finally:
            cost.wall, cost.cpu = time.perf_counter() - wall, time.thread_time() - cpu
            self.current = None
        return value, cost

    def _budget_left(self) -> bool:
        driver = self.driver
        if driver.proposer.finished:
            return False
        return driver.budget is None or driver.finished + len(driver.jobs) < driver.budget

    def next_task(self) -> Any:
        if self.first is None:
            self.first = time.perf_counter()
            self.events.append((self.first, 0, "driver"))
        task, cost = self._timed_call(self._next_task)
        if task is None:
            self.empty += cost
            label = "starved" if self._budget_left() else "end"
            self.none_returns[label] += 1
        else:
            self.asks[task.key] = cost
            label = "driver"
        self.events.append((time.perf_counter(), len(self.driver.jobs), label))
        return task

    def on_result(self, result: Any) -> None:
        self.events.append((time.perf_counter(), len(self.driver.jobs) - 1, "driver"))
        _, cost = self._timed_call(self._on_result, result)
        self.results[result.key] = cost
        self.busy += result.merge_seconds + result.eval_seconds
        self.last = time.perf_counter()

    # -- derived ---------------------------------------------------------------------------

    @property
    def wall(self) -> float:
        return self.last - (self.first or self.last)

    def driver_ms(self) -> float:
        """All ``next_task`` and ``on_result`` time (None returns included) per trial, ms."""
        calls = [*self.asks.values(), *self.results.values(), self.empty]
        return 1000 * sum(c.wall for c in calls) / max(1, len(self.results))

    def per_trial(self) -> list[Cost]:
        """Each trial's ``next_task`` + ``on_result`` cost, in dispatch order."""
        return [self.asks[k] + self.results[k] for k in sorted(self.asks) if k in self.results]

    def idle(self) -> dict[str, float]:
        """Idle worker-seconds by what the idle workers waited for: ``driver`` (handling a
        result, asking for the next task), ``starved`` (the proposer had nothing to propose),
        ``end`` (the budget was used up), ``other`` (a task in flight but the worker neither
        merging nor evaluating: Ray's transport, the worker's own bookkeeping, a result waiting
        while the driver handles another)."""
        out: dict[str, float] = defaultdict(float)
        for (start, running, label), (stop, _, _) in zip(self.events, self.events[1:]):
            stop = min(stop, self.last)
            if stop > start:
                out[label] += (self.workers - running) * (stop - start)
        total = self.workers * self.wall - self.busy
        out["other"] = total - sum(out.values())
        return out


# -- studies -----------------------------------------------------------------------------------


@dataclass
class Setup:
    zoo: dict[str, Path]
    space: str
    evaluators: Path
    folder: Path
    postgres: str
    workers: int


@contextmanager
def storage(kind: str, setup: Setup, name: str) -> Iterator[str]:
    """A fresh database: an SQLite file, or a PostgreSQL schema dropped afterwards."""
    if kind == "sqlite":
        yield str(setup.folder / f"{name}_{uuid.uuid4().hex[:6]}.db")
        return
    import sqlalchemy

    schema = f"evomerge_bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(setup.postgres)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
        try:
            yield f"{setup.postgres}?options=-csearch_path%3D{schema}"
        finally:
            with engine.begin() as connection:
                connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        engine.dispose()


def postgres_reachable(url: str) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect():
            return True
    except sqlalchemy.exc.OperationalError:
        return False
    finally:
        engine.dispose()


ASK_AHEAD: str = "0"
"""CMA-ES ``ask_ahead`` of the utilization runs: a number, or ``popsize`` (as many as the
population): ``--ask-ahead``."""


def proposer_config(kind: str, popsize: int | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": kind, "seed": 0}
    if popsize is not None:
        config["popsize"] = popsize
        ahead = popsize if ASK_AHEAD == "popsize" else int(ASK_AHEAD)
        if ahead:
            config["ask_ahead"] = ahead
    return config


def run_study(
    setup: Setup,
    name: str,
    database: str,
    proposer: dict[str, Any],
    evaluator: dict[str, Any],
    trials: int,
    attempts: int = 3,
) -> tuple[Recorder, Any]:
    """One study to its budget on ``setup.workers`` workers; the recorder and the summary.
    A pool whose workers fail to start (Ray on a loaded, shared machine) is tried again."""
    from evomerge.errors import EvomergeError

    for attempt in range(1, attempts + 1):
        try:
            return _run_once(setup, name, database, proposer, evaluator, trials)
        except EvomergeError as exc:
            if "start" not in str(exc) or attempt == attempts:
                raise
            print(f"{name}: {exc}; trying again", file=sys.stderr)
    raise AssertionError("unreachable")


def _run_once(
    setup: Setup,
    name: str,
    database: str,
    proposer: dict[str, Any],
    evaluator: dict[str, Any],
    trials: int,
) -> tuple[Recorder, Any]:
    from evomerge.study.config import parse_study_config
    from evomerge.study.driver import StudyDriver
    from evomerge.study.store import StudyStore

    with storage(database, setup, name) as url:
        config = parse_study_config(
            {
                "name": name,
                "storage": url,
                "base": str(setup.zoo["base"]),
                "sources": [str(setup.zoo["ft_a"]), str(setup.zoo["ft_b"])],
                "space": setup.space,
                "proposer": proposer,
                "objectives": [{"metric": "bench/a"}, {"metric": "bench/b"}],
                "evaluators": [{"name": "bench", **evaluator}],
                "budget": trials,
                "cluster": {"workers": setup.workers},
                "baselines": False,
            },
            name,
        )
        store = StudyStore(url)
        try:
            driver = StudyDriver(store, config)
            recorder = Recorder(driver, setup.workers)
            summary = driver.run()
        finally:
            store.engine.dispose()
    return recorder, summary


# -- part 1: overhead per trial ------------------------------------------------------------------


def window_size(trials: int) -> int:
    return min(WINDOW, trials // 2)


@dataclass
class OverheadRow:
    proposer: str
    storage: str
    trials: int
    recorder: Recorder
    popsize: int | None

    def mean(self, part: str | None, costs: list[Cost] | None = None) -> float:
        """Mean milliseconds per trial of ``part`` (None: the whole calls)."""
        costs = self.recorder.per_trial() if costs is None else costs
        values = [c.wall if part is None else c.parts.get(part, 0.0) for c in costs]
        return 1000 * statistics.fmean(values) if values else float("nan")

    def count(self, part: str) -> float:
        """Mean count of ``part`` (e.g. SQL statements) per trial."""
        costs = self.recorder.per_trial()
        return statistics.fmean(c.parts.get(part, 0.0) for c in costs) if costs else 0.0

    def total_mean(self) -> float:
        return self.recorder.driver_ms()

    def p95(self) -> float:
        walls = [c.wall for c in self.recorder.per_trial()]
        return 1000 * statistics.quantiles(walls, n=20, method="inclusive")[-1]

    def cpu(self) -> float:
        costs = self.recorder.per_trial()
        return 1000 * statistics.fmean(c.cpu for c in costs)

    def window(self, part: str | None, last: bool) -> float:
        costs = self.recorder.per_trial()
        size = window_size(len(costs))
        return self.mean(part, costs[-size:] if last else costs[:size])

    def trend(self, part: str | None) -> str:
        """Mean ms over the first and the last trials, as ``first → last``."""
        return f"{self.window(part, False):.2f} → {self.window(part, True):.2f}"

    def proposer_ms(self, costs: list[Cost] | None = None) -> float:
        return sum(self.mean(p, costs) for p in ("ask", "tell", "state_dict"))


def measure_overhead(setup: Setup, kinds: list[str], storages: list[str], trials: int) -> list:
    rows = []
    evaluator = {"kind": "python", "function": f"{setup.evaluators}:noop"}
    for database in storages:
        for kind in kinds:
            name = f"overhead_{kind}_{database}"
            started = time.perf_counter()
            recorder, summary = run_study(
                setup, name, database, proposer_config(kind), evaluator, trials
            )
            popsize = getattr(recorder.driver.proposer, "popsize", None)
            row = OverheadRow(kind, database, len(recorder.results), recorder, popsize)
            rows.append(row)
            print(
                f"overhead {kind:6s} {database:10s}: {row.trials} trials, "
                f"{row.total_mean():.2f} ms/trial (p95 {row.p95():.2f}), db "
                f"{row.mean('db'):.2f}, proposer {row.proposer_ms():.2f}; "
                f"{summary.reason}; {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )
    return rows


# -- part 2: utilization ----------------------------------------------------------------------


@dataclass
class UtilizationRow:
    proposer: str
    popsize: int | None
    trials: int
    recorder: Recorder
    generations: int | None
    model: float
    """Utilization of greedy scheduling of the same evaluation times with zero overhead."""

    @property
    def utilization(self) -> float:
        rec = self.recorder
        return rec.busy / (rec.workers * rec.wall)

    def utilization_before_end(self) -> float:
        rec = self.recorder
        return rec.busy / (rec.workers * rec.wall - rec.idle()["end"])


def simulated_utilization(
    trials: int,
    generation: int | None,
    sleep: tuple[float, float],
    workers: int,
    rounds: int = 300,
) -> float:
    """Busy / (workers x makespan) when each task goes to the first free worker and a new
    generation starts only when the previous one is complete (``generation`` None: one batch)."""
    rng = random.Random(0)
    busy = span = 0.0
    for _ in range(rounds):
        left = trials
        while left:
            size = min(generation or left, left)
            free = [0.0] * workers
            for _ in range(size):
                duration = rng.uniform(*sleep)
                busy += duration
                free[free.index(min(free))] += duration
            span += max(free)
            left -= size
    return busy / (workers * span)


def measure_utilization(
    setup: Setup, kinds: list[str], popsizes: list[int], trials: int, sleep: tuple[float, float]
) -> list[UtilizationRow]:
    rows = []
    evaluator = {
        "kind": "python",
        "function": f"{setup.evaluators}:sleepy",
        "options": {"low": sleep[0], "high": sleep[1]},
    }
    plan = [(k, None) for k in kinds if k != "cma"]
    if "cma" in kinds:
        plan += [("cma", p) for p in popsizes]
    for kind, popsize in plan:
        name = f"utilization_{kind}{popsize or ''}"
        started = time.perf_counter()
        recorder, summary = run_study(
            setup, name, "sqlite", proposer_config(kind, popsize), evaluator, trials
        )
        generations = getattr(recorder.driver.proposer, "generation", None)
        model = simulated_utilization(trials, popsize, sleep, setup.workers)
        row = UtilizationRow(kind, popsize, len(recorder.results), recorder, generations, model)
        rows.append(row)
        idle = recorder.idle()
        print(
            f"utilization {kind}{'' if popsize is None else f' popsize {popsize}'}: "
            f"{100 * row.utilization:.1f}% (model {100 * model:.1f}%), starved "
            f"{recorder.none_returns['starved']}x / {idle['starved']:.2f} worker-s; "
            f"{summary.reason}; {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
    return rows


# -- the report ------------------------------------------------------------------------------


def overhead_tables(rows: list[OverheadRow]) -> list[str]:
    size = window_size(min(r.trials for r in rows))
    main = [
        "| proposer | storage | trials | mean ms/trial | p95 | CPU ms | database | proposer "
        "(ask / tell / state_dict) | recipe | other | trials/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    growth = [
        f"| proposer | storage | mean ms, first {size} → last {size} | database | "
        "state_dict | ask | SQL statements / trial | SQL / commit / ping ms | "
        "final snapshot KB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec = r.recorder
        known = r.mean("db") + r.proposer_ms() + r.mean("recipe")
        name = r.proposer + (f" (popsize {r.popsize})" if r.popsize else "")
        main.append(
            f"| {name} | {r.storage} | {r.trials} | {r.total_mean():.2f} | {r.p95():.2f} | "
            f"{r.cpu():.2f} | {r.mean('db'):.2f} | {r.proposer_ms():.2f} ({r.mean('ask'):.2f} / "
            f"{r.mean('tell'):.2f} / {r.mean('state_dict'):.2f}) | {r.mean('recipe'):.2f} | "
            f"{r.mean(None) - known:.2f} | {r.trials / rec.wall:.0f} |"
        )
        growth.append(
            f"| {name} | {r.storage} | {r.trend(None)} | {r.trend('db')} | "
            f"{r.trend('state_dict')} | {r.trend('ask')} | {r.count('statements'):.1f} | "
            f"{r.mean('sql'):.2f} / {r.mean('commit'):.2f} / {r.mean('ping'):.2f} | "
            f"{rec.snapshot_bytes / 1024:.0f} |"
        )
    return [*main, "", *growth]


def growth_text(rows: list[OverheadRow]) -> list[str]:
    """What grows with the number of trials, per proposer (from its first storage's run)."""
    size = window_size(min(r.trials for r in rows))
    seen: dict[str, OverheadRow] = {}
    for r in rows:
        seen.setdefault(r.proposer, r)
    parts = [
        f"{r.proposer} {r.recorder.snapshot_bytes / 1024:.0f} KB after {r.trials} trials "
        f"(`state_dict` {r.trend('state_dict')} ms, `ask` {r.trend('ask')} ms)"
        for r in seen.values()
    ]
    return [
        "",
        "The driver writes the proposer's whole pickled state (`state_dict()`) as a snapshot "
        "every 50 results or 30 s (in the transaction of the result that triggers it; the "
        "results told since are replayed from the trials on resume). The Optuna proposers' "
        "state holds every trial they were told, so it grows linearly with the study; the "
        "CMA-ES state does not grow. TPE's own `ask` also grows with the trials it models. "
        f"Final snapshot size, and first {size} → last {size} trials: " + "; ".join(parts) + ".",
    ]


def utilization_table(rows: list[UtilizationRow]) -> list[str]:
    lines = [
        "| proposer | trials | wall s | utilization | before the end | zero-overhead model | "
        "driver ms/trial | generations | starved (None with a free worker) | idle worker-s: "
        "starved / end / driver and Ray |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        idle = r.recorder.idle()
        name = r.proposer + (f" popsize {r.popsize}" if r.popsize else "")
        lines.append(
            f"| {name} | {r.trials} | {r.recorder.wall:.1f} | {100 * r.utilization:.1f}% | "
            f"{100 * r.utilization_before_end():.1f}% | {100 * r.model:.1f}% | "
            f"{r.recorder.driver_ms():.1f} | {'—' if r.generations is None else r.generations} | "
            f"{r.recorder.none_returns['starved']} | {idle['starved']:.2f} / {idle['end']:.2f} / "
            f"{idle['driver'] + idle['other']:.2f} |"
        )
    return lines


def verdicts(overhead: list[OverheadRow], utilization: list[UtilizationRow]) -> list[str]:
    out = []
    limit = OVERHEAD_TARGET_MS
    if overhead:
        worst = max(overhead, key=lambda r: r.total_mean())
        wall = [f"{r.proposer}/{r.storage}" for r in overhead if r.total_mean() <= limit]
        cpu = [f"{r.proposer}/{r.storage}" for r in overhead if r.cpu() <= limit]
        out.append(
            f"- Driver + database overhead <= {limit:g} ms per trial: by mean wall time met for "
            f"{', '.join(wall) or 'none'}; by the driver's CPU time for "
            f"{', '.join(cpu) or 'none'}; worst {worst.proposer}/{worst.storage} "
            f"{worst.total_mean():.2f} ms ({worst.cpu():.2f} ms CPU)."
        )
    asynchronous = [r for r in utilization if r.proposer in ASYNC_KINDS]
    if asynchronous:
        text = ", ".join(f"{r.proposer} {100 * r.utilization:.1f}%" for r in asynchronous)
        ok = all(r.utilization >= UTILIZATION_TARGET for r in asynchronous)
        out.append(
            f"- Utilization >= {100 * UTILIZATION_TARGET:.0f}% for asynchronous proposers: "
            f"{'met' if ok else 'not met'} ({text})."
        )
    return out


def cma_text(
    rows: list[UtilizationRow], workers: int, sleep: tuple[float, float], trials: int
) -> list[str]:
    cma = [r for r in rows if r.proposer == "cma"]
    if not cma:
        return []
    lines = [
        "**CMA-ES at a generation boundary.** `ask()` hands out the `popsize` candidates of a "
        "generation and then returns None until all of them are told (pycma updates its "
        "distribution from the whole generation), so `next_task()` returns None and "
        "`dispatch` waits for results. A worker that finishes one of the last candidates of a "
        "generation stays idle until the generation's slowest candidate is done; then the "
        f"next generation starts on all {workers} workers at once. Each generation thus costs "
        f"its makespan on {workers} workers, not its mean load. With equal evaluation times "
        "only a popsize that is not a multiple of the workers loses (the last candidates run "
        "on fewer workers); with spread-out times every generation waits for its slowest "
        "candidates, and the loss shrinks as popsize grows (boundaries come less often). "
        "Measured:",
        "",
    ]
    for r in cma:
        rec, idle = r.recorder, r.recorder.idle()
        generations = max(1, r.generations or 1)
        multiple = "a multiple" if (r.popsize or 0) % workers == 0 else "not a multiple"
        lines.append(
            f"- popsize {r.popsize} ({multiple} of {workers}): {r.generations} generations; "
            f"`next_task()` returned None {rec.none_returns['starved']} times with a worker "
            f"free; idle while starved {idle['starved']:.1f} worker-s "
            f"({idle['starved'] / generations:.2f} per generation, "
            f"{100 * idle['starved'] / (workers * rec.wall):.1f}% of the worker time); "
            f"utilization {100 * r.utilization:.1f}% (zero-overhead model {100 * r.model:.1f}%)."
        )
    middle = (sleep[0] + sleep[1]) / 2

    def model(times: tuple[float, float]) -> str:
        return ", ".join(
            f"{p}: {100 * simulated_utilization(trials, p, times, workers, rounds=100):.1f}%"
            for p in range(2, 17)
        )

    lines += [
        "",
        f"Zero-overhead model (each evaluation to the first free one of {workers} workers, "
        f"generation by generation, {trials} trials) by popsize, for uniform {sleep[0]:g}–"
        f"{sleep[1]:g} s evaluations: {model(sleep)}; for equal {middle:g} s evaluations: "
        f"{model((middle, middle))}. The difference between a measured utilization and its "
        "model is the per-trial driver and Ray time (the driver and in-flight idle columns), "
        "which the asynchronous proposers pay as well.",
    ]
    return lines


def machine_text() -> str:
    import ray
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only (no GPU), Python "
        f"{platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}"
    )


def report(
    args: argparse.Namespace,
    overhead: list[OverheadRow],
    utilization: list[UtilizationRow],
    notes: list[str],
    seconds: float,
    load: tuple[float, float],
) -> str:
    command = shlex.join([".venv/bin/python", "scripts/bench_service.py", *sys.argv[1:]])
    lines = [
        MARK_BEGIN,
        "## Study service overhead and worker utilization (`scripts/bench_service.py`)",
        "",
        f"Measured {datetime.date.today().isoformat()}. Command: `{command}`. Machine: "
        f"{machine_text()}; load average (1 min) before / after {load[0]:.2f} / {load[1]:.2f}. "
        f"Every study runs `StudyDriver.run` on the toy zoo (space `{args.space}`, "
        f"{args.workers} Ray workers of 1 CPU each, `baselines: false`, two objectives); "
        "the driver is timed from outside by wrapping methods of the driver, store, proposer "
        "and SQLAlchemy dialect instances. Total run time of the script "
        f"{seconds:.0f} s.",
    ]
    if overhead:
        lines += [
            "",
            "### Driver + database time per trial (no-op evaluator)",
            "",
            "A python evaluator that returns two numbers hashed from a few merged weights "
            "(instant; distinct per genome so CMA-ES keeps going). Per trial: the "
            "`next_task()` call that dispatched it plus its `on_result()` call, wall clock "
            "(the driver shares the 2 cores with both workers, which merge continuously). "
            "Mean ms/trial also spreads the `next_task()` calls that returned None over the "
            "trials. Database = the store's `add_trial` / `finish_trial` (with the proposer "
            "snapshot) / `set_state`; proposer = `ask` + `tell` + `state_dict` (pickled "
            "every 50 results or 30 s); recipe = decoding the genome; other = the rest of "
            "the two calls. CPU ms = the driver thread's CPU time. trials/s = trials over the "
            "wall time from the first dispatch to the last result.",
            "",
            *overhead_tables(overhead),
            *growth_text(overhead),
        ]
    if utilization:
        lines += [
            "",
            "### Worker utilization with uneven evaluation times",
            "",
            f"{args.workers} workers; the evaluator sleeps uniform {args.sleep[0]:g}–"
            f"{args.sleep[1]:g} s (drawn from a hash of the merged weights), SQLite storage. "
            "Utilization = sum of the trials' merge + eval seconds / (workers x wall time from "
            "the first `next_task()` to the last result); before the end = the same without the "
            "idle time after the budget ran out (the last trials finishing on fewer workers). "
            "Driver ms/trial = `next_task()` + `on_result()` time per trial in that run (the "
            "workers sleep, so unlike the no-op runs the driver has the cores to itself). "
            "Idle worker-seconds by cause: starved (the proposer returned None while a worker "
            "was free), end (budget used up), driver and Ray (the rest: a task in Ray's "
            "transport, the worker's bookkeeping, a result waiting while the driver handles "
            "another; `dispatch` asks one task ahead while every worker is busy and gives it "
            "to a freed worker before recording the result that freed it).",
            "",
            *utilization_table(utilization),
            "",
            *cma_text(utilization, args.workers, args.sleep, args.util_trials),
        ]
    lines += ["", "Targets:", "", *verdicts(overhead, utilization), *notes, MARK_END]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300, help="trials per overhead study")
    parser.add_argument("--util-trials", type=int, default=200, help="trials per utilization run")
    parser.add_argument("--proposers", default="random,tpe,cma")
    parser.add_argument("--storages", default="sqlite,postgresql")
    parser.add_argument("--popsizes", default="4,6,9", help="CMA-ES popsizes for utilization")
    parser.add_argument(
        "--sleep",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        default=(0.05, 0.5),
        help="LOW,HIGH seconds of the utilization evaluator",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--ask-ahead",
        default="0",
        help="CMA-ES ask_ahead of the utilization runs: a number, or 'popsize'",
    )
    parser.add_argument("--parts", default="overhead,utilization")
    parser.add_argument("--space", default="task_arithmetic_per_layer")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--postgres", default=POSTGRES, help="database to make schemas in")
    parser.add_argument("--write", type=Path, help=f"update this Markdown file's {NAME} part")
    args = parser.parse_args()
    if args.trials < 2 or args.util_trials < 1 or args.workers < 1 or len(args.sleep) != 2:
        parser.error("--trials >= 2, --util-trials >= 1, --workers >= 1, --sleep LOW,HIGH")
    return args


def main() -> int:
    global ASK_AHEAD
    args = parse_args()
    ASK_AHEAD = args.ask_ahead
    import ray

    from evomerge.toy_zoo import build_toy_zoo

    kinds = [k.strip() for k in args.proposers.split(",") if k.strip()]
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    parts = {p.strip() for p in args.parts.split(",")}
    notes: list[str] = []
    if "postgresql" in storages and "overhead" in parts and not postgres_reachable(args.postgres):
        storages.remove("postgresql")
        notes.append(f"- PostgreSQL at {args.postgres} was not reachable: SQLite only.")
        print(notes[-1], file=sys.stderr)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    zoo = build_toy_zoo(args.zoo.resolve())
    ray.init(
        address="local",  # a private instance, never a cluster some other process started
        num_cpus=max(2, args.workers),
        include_dashboard=False,
        object_store_memory=100_000_000,
        log_to_driver=False,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench_service_") as folder:
            evaluators = Path(folder) / "bench_evaluators.py"
            evaluators.write_text(EVALUATORS)
            setup = Setup(zoo, args.space, evaluators, Path(folder), args.postgres, args.workers)
            overhead = (
                measure_overhead(setup, kinds, storages, args.trials) if "overhead" in parts else []
            )
            popsizes = [int(p) for p in args.popsizes.split(",") if p.strip()]
            utilization = (
                measure_utilization(setup, kinds, popsizes, args.util_trials, args.sleep)
                if "utilization" in parts
                else []
            )
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - started
    text = report(args, overhead, utilization, notes, seconds, (load_before, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(args.write, NAME, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
