"""The study database: studies, trials, metrics per fidelity, proposer snapshots, exports.

SQLite by default (a file; WAL journal so readers never block the one writer, the driver),
PostgreSQL for clusters (``postgresql+psycopg://user@host/db``). Several studies share one
database. Every write is one transaction, so a killed driver leaves whole rows or none. The
Pareto front is computed from the stored metrics on every call, never cached.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, delete, event, func, insert, inspect, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker

from evomerge.errors import ConfigError, EvomergeError
from evomerge.failpoints import failpoint
from evomerge.optimize import Objective, pareto_front, scalarize
from evomerge.study.schema import (
    SCHEMA_VERSION,
    Base,
    DocumentsRow,
    ExportRow,
    InspectionRow,
    Meta,
    MetricRow,
    SnapshotRow,
    StudyRow,
    TrialRow,
    utcnow,
)
from evomerge.util import first_line, json_safe

TERMINAL = ("COMPLETE", "FAILED")


class StorageError(EvomergeError):
    """The database cannot be opened, is of another schema version, or lost a write."""


class StudyBusy(ConfigError):
    """Another driver holds the study."""


LEASE_SECONDS = 60.0
"""A driver's lease on its study lapses this long after its last heartbeat."""

RETRY_SECONDS = float(os.environ.get("EVOMERGE_DB_RETRY_SECONDS", "120"))
"""How long a server database (PostgreSQL) may be unreachable before a write gives up."""

log = logging.getLogger("evomerge.study")
_Method = TypeVar("_Method", bound=Callable[..., Any])
_retrying = threading.local()
"""``active`` is True while a transaction runs again after a lost connection: it may have
been committed already, so the non-idempotent writes check first."""


def _retried(method: _Method) -> _Method:
    """Run one transaction again, with backoff, while a server database is unreachable
    (restarted, failed over, network blip) for up to the store's ``retry_seconds``."""

    @functools.wraps(method)
    def run(self: StudyStore, *args: Any, **kwargs: Any) -> Any:
        deadline: float | None = None
        delay = 0.25
        again = False
        while True:
            _retrying.active = again
            try:
                return method(self, *args, **kwargs)
            except StorageError as exc:
                if not self._transient(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_seconds
                    log.warning(
                        "evomerge: lost the database %s (%s); retrying for up to %.0f s",
                        mask_url(self.url),
                        _first_line(exc.__cause__ or exc),
                        self.retry_seconds,
                    )
                if now >= deadline:
                    raise StorageError(
                        f"database {mask_url(self.url)} unreachable for "
                        f"{self.retry_seconds:.0f} s: {_first_line(exc.__cause__ or exc)}"
                    ) from exc
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 5.0)
                again = True
            finally:
                _retrying.active = False

    return run  # type: ignore[return-value]


def _same_owner(owner: str | None) -> Any:
    return StudyRow.owner.is_(None) if owner is None else StudyRow.owner == owner


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` (``host:pid:token``) was a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _refuse_if_held(row: StudyRow, owner: str | None, stale_after: float) -> None:
    held, beat = row.owner, _aware(row.heartbeat_at)
    age = None if beat is None else (utcnow() - beat).total_seconds()
    free = held is None or held == owner or _dead_here(held)
    if not free and age is not None and age <= stale_after:
        raise StudyBusy(
            f"study '{row.name}' is being run by another driver ({held}, alive "
            f"{age:.0f} s ago); wait for it to finish or stop it, or, if it died on "
            f"another machine, retry after {stale_after:.0f} s without a heartbeat"
        )


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def resume_command(name: str, url: str, config: Path | None = None) -> str:
    """How to continue a study: by its YAML when that alone finds it (no database URL, whose
    password would be masked), else by ``--storage`` and ``--study``."""
    if config is not None:
        return f"evomerge resume {config}"
    return f"evomerge resume --storage {mask_url(url)} --study {name}"


def storage_url(value: str | Path) -> str:
    """A SQLAlchemy URL; a plain path means an SQLite file."""
    text = str(value)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    return text


FULL = "full"
"""The fidelity of a score on every searched document: the one fronts and ``best`` compare."""
HOLDOUT = "holdout"
"""The fidelity of a score on the held-out documents the search never saw."""


def fidelity_name(limit: int | float | None, split: str = "search") -> tuple[str, float]:
    """``("full", inf)`` for all searched documents, ``("limit=10", 10)`` for a subset,
    ``("holdout", -1)`` for the held-out documents (ranked below every search fidelity)."""
    if split == "holdout":
        return HOLDOUT, -1.0
    if limit is None:
        return FULL, math.inf
    return f"limit={limit:.12g}", float(limit)


@dataclass(frozen=True)
class Told:
    """What a proposer was told about a proposal: the ``seq``-th result it got, after
    ``asks_before`` proposals had been asked; ``values`` None means told as failed."""

    seq: int
    asks_before: int
    values: list[float] | None


@dataclass(frozen=True)
class TrialView:
    """A trial as read back: its row fields and its scores.

    ``scores`` holds every fidelity it was scored at (``full``, ``limit=N``, ``holdout``);
    ``metrics`` is its full-fidelity score, the only one fronts, ``best`` and progress compare
    (empty until the trial is scored on every searched document); ``fidelity`` is the highest
    search fidelity it reached.
    """

    number: int
    role: str
    label: str
    state: str
    genome: list[float] | None
    recipe: dict[str, Any] | None
    proposal_id: int | None
    worker: str | None
    attempts: int
    error: str | None
    fidelity: str | None
    metrics: dict[str, float]
    merge_seconds: float | None
    eval_seconds: float | None
    load_seconds: float | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    told: Told | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    scored_with: str | None = None
    """How the worker scored it: working dtype and device kind, e.g. ``float32 on cuda``."""
    timings: dict[str, Any] = field(default_factory=dict)
    """Where its time went: seconds per phase (``merge_math``, ``transfer``, ``copy``,
    ``evaluation``), the evaluators' ``batch_sizes`` and ``oom_retries``; empty if unrecorded."""

    def values(self, objectives: Sequence[Objective], fidelity: str = FULL) -> list[float] | None:
        """The objective values at ``fidelity`` (full by default), None if not scored so."""
        metrics = self.scores.get(fidelity, {}) if fidelity != FULL else self.metrics
        try:
            return [metrics[o.metric] for o in objectives]
        except KeyError:
            return None

    @property
    def holdout(self) -> dict[str, float]:
        """Metrics on the held-out documents (empty until ``confirm`` scored them)."""
        return self.scores.get(HOLDOUT, {})

    @property
    def search_scores(self) -> tuple[str | None, dict[str, float]]:
        """(fidelity, metrics) at the highest search fidelity reached: full if scored so,
        else the cheap score, labelled by its fidelity."""
        if self.fidelity is None:
            return None, {}
        return self.fidelity, self.scores.get(self.fidelity, {})


class StudyStore:
    """One database, opened once per process."""

    def __init__(self, url: str | Path, retry_seconds: float = RETRY_SECONDS) -> None:
        self.url = storage_url(url)
        self.retry_seconds = retry_seconds
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise StorageError(f"not a database URL: {mask_url(self.url)}") from None
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and parsed.database:
            folder = Path(parsed.database).parent
            if not folder.is_dir():
                raise StorageError(f"folder {folder} for the SQLite database does not exist")
        try:
            self.engine = self._engine()
            self._check_version()
        except (DatabaseError, ArgumentError, ImportError) as exc:  # refused, not a DB, no driver
            raise StorageError(
                f"cannot open the study database {mask_url(self.url)}: {_first_line(exc)}"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._ids: dict[str, int] = {}

    def _engine(self) -> Engine:
        if not self.is_sqlite:
            return create_engine(self.url, pool_pre_ping=True)
        engine = create_engine(self.url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record):  # type: ignore[no-untyped-def]
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine

    def _check_version(self) -> None:
        """Refuse a database of another schema version before touching it; stamp a new one.

        Several processes may open a new database at once (a driver starting while
        ``evomerge status`` polls it): the one that loses the race to create a table or the
        version row finds the winner's and goes on."""
        for attempt in range(_SCHEMA_RACE_ATTEMPTS):
            try:
                self._refuse_other_versions()
                Base.metadata.create_all(self.engine)
                with Session(self.engine) as session, session.begin():
                    if session.get(Meta, "schema_version") is None:
                        session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            except DBAPIError as exc:
                if attempt + 1 == _SCHEMA_RACE_ATTEMPTS or not _lost_creation_race(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _refuse_other_versions(self) -> None:
        if not inspect(self.engine).has_table(Meta.__tablename__):
            return
        with Session(self.engine) as session:
            row = session.get(Meta, "schema_version")
        version = int(row.value) if row is not None else None
        if version is not None and version > SCHEMA_VERSION:
            raise StorageError(
                f"{mask_url(self.url)} was written by a newer evomerge (schema "
                f"{version}; this one knows {SCHEMA_VERSION}); upgrade evomerge"
            )
        if version in (2, 3):
            self._upgrade_from(version)
            return
        if version is not None and version < SCHEMA_VERSION:
            raise StorageError(
                f"{mask_url(self.url)} was written by an earlier development version of "
                f"evomerge (schema {version}; this one needs {SCHEMA_VERSION}) and cannot "
                "be upgraded; keep using that version for it, or start a new database"
            )

    def _upgrade_from(self, version: int) -> None:
        """Schema 2 or 3 to 4: the nullable columns added since (``scored_with`` in 3,
        ``timings`` in 4), in one transaction; a concurrent upgrader that added them first is
        fine."""
        added = {"scored_with": "VARCHAR(64)", "timings": "TEXT"}
        with self.engine.begin() as connection:
            columns = {c["name"] for c in inspect(connection).get_columns(TrialRow.__tablename__)}
            for name, kind in added.items():
                if name not in columns:
                    connection.execute(
                        text(f"ALTER TABLE {TrialRow.__tablename__} ADD COLUMN {name} {kind}")
                    )
            connection.execute(
                update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION))
            )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        session = self._sessions()
        try:
            with session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise StorageError(f"database {mask_url(self.url)} failed: {_first_line(exc)}") from exc
        finally:
            session.close()

    def _transient(self, exc: StorageError) -> bool:
        """A lost connection to a server database: worth running the transaction again.
        SQLite waits for its locks itself, and its other errors (disk full) do not pass."""
        cause = exc.__cause__
        if self.is_sqlite or not isinstance(cause, DBAPIError):
            return False
        return cause.connection_invalidated or isinstance(cause, (OperationalError, InterfaceError))

    # -- studies -------------------------------------------------------------------------------

    @_retried
    def create_study(self, name: str, config: Mapping[str, Any], budget: int) -> None:
        with self.session() as session:
            stored = session.scalar(select(StudyRow.config).where(StudyRow.name == name))
            if stored is not None and getattr(_retrying, "active", False):
                if stored == json.dumps(config):
                    return  # the attempt that lost its connection had committed
            if stored is not None:
                raise ConfigError(
                    f"study '{name}' already exists in {mask_url(self.url)}; "
                    "resume it (evomerge resume) or choose another name"
                )
            session.add(StudyRow(name=name, config=json.dumps(config), budget=budget))

    @_retried
    def has_study(self, name: str) -> bool:
        with self.session() as session:
            return session.scalar(select(StudyRow.id).where(StudyRow.name == name)) is not None

    def _study(self, session: Session, name: str) -> StudyRow:
        row = session.scalar(select(StudyRow).where(StudyRow.name == name))
        if row is None:
            names = session.scalars(select(StudyRow.name).order_by(StudyRow.name)).all()
            raise ConfigError(
                f"no study '{name}' in {mask_url(self.url)}"
                + (f"; it has: {', '.join(names)}" if names else "; it has no studies")
            )
        return row

    def _study_id(self, session: Session, name: str) -> int:
        """The study's row id (cached: studies are never renamed or deleted)."""
        if name not in self._ids:
            self._ids[name] = self._study(session, name).id
        return self._ids[name]

    @_retried
    def study_config(self, name: str) -> dict[str, Any]:
        with self.session() as session:
            return json.loads(self._study(session, name).config)

    @_retried
    def study(self, name: str) -> dict[str, Any]:
        """One study's row: name, status, budget, elapsed_seconds, created_at, owner,
        heartbeat_at."""
        with self.session() as session:
            return _study_fields(self._study(session, name))

    # -- the driver lease: one driver per study -------------------------------------------------

    @_retried
    def acquire(self, name: str, owner: str, stale_after: float = LEASE_SECONDS) -> None:
        """Make ``owner`` the study's driver, or raise :class:`StudyBusy` naming the driver that
        holds it. A lease is free when released, when its heartbeat is older than
        ``stale_after`` seconds, or when it belongs to a process of this host that is gone."""
        with self.session() as session:
            row = self._study(session, name)
            held = row.owner
            _refuse_if_held(row, owner, stale_after)
            taken = session.execute(
                update(StudyRow)
                .where(StudyRow.id == row.id, _same_owner(held))
                .values(owner=owner, heartbeat_at=utcnow())
            ).rowcount
            if taken != 1:  # another driver took it between the read and the write
                raise StudyBusy(f"study '{name}' was just taken by another driver")

    @_retried
    def check_free(self, name: str) -> None:
        """Raise :class:`StudyBusy` if another driver holds the study (without taking it)."""
        with self.session() as session:
            _refuse_if_held(self._study(session, name), None, LEASE_SECONDS)

    @_retried
    def heartbeat(self, name: str, owner: str) -> bool:
        """Renew ``owner``'s lease; False if it no longer holds it."""
        with self.session() as session:
            return (
                session.execute(
                    update(StudyRow)
                    .where(StudyRow.name == name, StudyRow.owner == owner)
                    .values(heartbeat_at=utcnow())
                ).rowcount
                == 1
            )

    @_retried
    def release(self, name: str, owner: str) -> None:
        with self.session() as session:
            session.execute(
                update(StudyRow)
                .where(StudyRow.name == name, StudyRow.owner == owner)
                .values(owner=None, heartbeat_at=None)
            )

    @_retried
    def set_status(self, name: str, status: str) -> None:
        with self.session() as session:
            row = self._study(session, name)
            row.status = status
            row.updated_at = utcnow()

    @_retried
    def record_inspection(self, study: str, path: str, summary: str) -> None:
        """Note an ``evomerge inspect`` of the study's models (its folder and SUMMARY.md)."""
        with self.session() as session:
            study_id = self._study_id(session, study)
            session.add(InspectionRow(study_id=study_id, path=path, summary=summary))

    def inspection(self, study: str) -> dict[str, Any] | None:
        """The latest inspection of the study's models (``path``, ``summary``,
        ``created_at``), or None."""
        with self.session() as session:
            study_id = self._study_id(session, study)
            row = session.scalars(
                select(InspectionRow)
                .where(InspectionRow.study_id == study_id)
                .order_by(InspectionRow.id.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            return {"path": row.path, "summary": row.summary, "created_at": _aware(row.created_at)}

    def studies(self) -> list[dict[str, Any]]:
        """Every study with its budget, status and trial counts by state."""
        with self.session() as session:
            counts: dict[int, dict[str, int]] = {}
            for study_id, state, count in session.execute(
                select(TrialRow.study_id, TrialRow.state, func.count()).group_by(
                    TrialRow.study_id, TrialRow.state
                )
            ):
                counts.setdefault(study_id, {})[state] = count
            return [
                {**_study_fields(row), "trials": counts.get(row.id, {})}
                for row in session.scalars(select(StudyRow).order_by(StudyRow.created_at))
            ]

    # -- trials --------------------------------------------------------------------------------

    @_retried
    def add_trial(
        self,
        study: str,
        number: int,
        *,
        role: str,
        label: str,
        genome: Sequence[float] | None = None,
        recipe: Mapping[str, Any] | None = None,
        proposal_id: int | None = None,
        state: str = "RUNNING",
    ) -> None:
        with self.session() as session:
            study_id = self._study_id(session, study)
            if getattr(_retrying, "active", False) and session.scalar(
                select(TrialRow.id).where(TrialRow.study_id == study_id, TrialRow.number == number)
            ):
                return  # the attempt that lost its connection had committed
            session.execute(
                insert(TrialRow).values(
                    study_id=study_id,
                    number=number,
                    role=role,
                    label=label,
                    state=state,
                    genome=None if genome is None else json.dumps([float(g) for g in genome]),
                    recipe=None if recipe is None else json.dumps(recipe),
                    proposal_id=proposal_id,
                    attempts=0,
                    created_at=utcnow(),
                )
            )

    @_retried
    def finish_trial(
        self,
        study: str,
        number: int,
        *,
        state: str,
        metrics: Mapping[str, float] | None = None,
        limit: int | float | None = None,
        worker: str | None = None,
        attempts: int = 1,
        error: str | None = None,
        merge_seconds: float | None = None,
        eval_seconds: float | None = None,
        load_seconds: float | None = None,
        told: Told | None = None,
        snapshot: tuple[bytes, int] | None = None,
        elapsed_seconds: float | None = None,
        scored_with: str | None = None,
        timings: Mapping[str, Any] | None = None,
        fidelity: tuple[str, float] | None = None,
        documents: bytes | None = None,
    ) -> None:
        """Record a result and its metrics in one transaction, with what the proposer was told
        (``told``), optionally its state afterwards (``snapshot``: state, results told) and the
        study's wall time so far: a killed driver leaves the trials and the proposer consistent.
        ``fidelity`` (name, rank) names an estimated fidelity instead of ``limit``'s;
        ``documents`` are the per-document results (``evomerge.evaluate.documents`` bytes)."""
        if state not in TERMINAL:
            raise ValueError(f"a finished trial is COMPLETE or FAILED, not {state}")
        fidelity, rank = fidelity or fidelity_name(limit)
        values: dict[str, Any] = {
            "state": state,
            "worker": worker,
            "attempts": attempts,
            "error": error,
            "merge_seconds": merge_seconds,
            "eval_seconds": eval_seconds,
            "load_seconds": load_seconds,
            "finished_at": utcnow(),
        }
        if scored_with is not None:
            values["scored_with"] = scored_with
        if timings:
            values["timings"] = json.dumps(json_safe(dict(timings)))
        if told is not None:
            values["tell_seq"] = told.seq
            values["asks_before_tell"] = told.asks_before
            values["told_values"] = None if told.values is None else json.dumps(told.values)
        with self.session() as session:
            study_id = self._study_id(session, study)
            trial_id = self._update_trial(session, study, study_id, number, values)
            self._insert_metrics(session, trial_id, fidelity, rank, metrics or {})
            self._insert_documents(session, trial_id, fidelity, documents)
            if elapsed_seconds is not None:
                session.execute(
                    update(StudyRow)
                    .where(StudyRow.id == study_id)
                    .values(elapsed_seconds=elapsed_seconds)
                )
            if snapshot is not None:
                self._add_snapshot(session, study_id, *snapshot)
                failpoint("in_snapshot")  # killed before the commit: neither is written

    def _update_trial(
        self, session: Session, study: str, study_id: int, number: int, values: dict[str, Any]
    ) -> int:
        trial_id = session.execute(
            update(TrialRow)
            .where(TrialRow.study_id == study_id, TrialRow.number == number)
            .values(**values)
            .returning(TrialRow.id)
        ).scalar_one_or_none()
        if trial_id is None:
            raise ConfigError(f"study '{study}' has no trial {number}")
        return trial_id

    @staticmethod
    def _insert_documents(
        session: Session, trial_id: int, fidelity: str, documents: bytes | None
    ) -> None:
        """A trial's per-document results at one fidelity; a re-score replaces them."""
        if documents is None:
            return
        session.execute(
            delete(DocumentsRow).where(
                DocumentsRow.trial_id == trial_id, DocumentsRow.fidelity == fidelity
            )
        )
        session.execute(
            insert(DocumentsRow),
            [{"trial_id": trial_id, "fidelity": fidelity, "data": documents}],
        )

    @_retried
    def documents(self, study: str, fidelity: str = FULL) -> dict[int, bytes]:
        """Per trial number, its per-document results at ``fidelity`` (those that have them)."""
        with self.session() as session:
            row = self._study(session, study)
            rows = session.execute(
                select(TrialRow.number, DocumentsRow.data)
                .join(DocumentsRow, DocumentsRow.trial_id == TrialRow.id)
                .where(TrialRow.study_id == row.id, DocumentsRow.fidelity == fidelity)
                .order_by(TrialRow.number)
            ).all()
        return {number: bytes(data) for number, data in rows}

    @staticmethod
    def _insert_metrics(
        session: Session,
        trial_id: int,
        fidelity: str,
        rank: float,
        metrics: Mapping[str, float],
        replace: bool = False,
    ) -> None:
        """Insert a trial's metrics at one fidelity; ``replace``: a re-score replaces them."""
        if metrics and (replace or getattr(_retrying, "active", False)):
            session.execute(  # the attempt that lost its connection may have committed them
                delete(MetricRow).where(
                    MetricRow.trial_id == trial_id, MetricRow.fidelity == fidelity
                )
            )
        if metrics:
            session.execute(
                insert(MetricRow),
                [
                    {
                        "trial_id": trial_id,
                        "fidelity": fidelity,
                        "rank": rank,
                        "name": name,
                        "value": float(value),
                    }
                    for name, value in metrics.items()
                ],
            )

    @_retried
    def add_metrics(
        self,
        study: str,
        number: int,
        metrics: Mapping[str, float],
        limit: int | float | None,
        split: str = "search",
        documents: bytes | None = None,
    ) -> None:
        """Metrics (and per-document results) of a re-score at another fidelity (a promotion,
        or the held-out documents)."""
        fidelity, rank = fidelity_name(limit, split)
        with self.session() as session:
            trial = self._trial(session, study, number)
            self._insert_metrics(session, trial.id, fidelity, rank, metrics, replace=True)
            self._insert_documents(session, trial.id, fidelity, documents)

    def _trial(self, session: Session, study: str, number: int) -> TrialRow:
        row = self._study(session, study)
        trial = session.scalar(
            select(TrialRow).where(TrialRow.study_id == row.id, TrialRow.number == number)
        )
        if trial is None:
            raise ConfigError(f"study '{study}' has no trial {number}")
        return trial

    @_retried
    def recipe(self, study: str, number: int) -> dict[str, Any]:
        """One trial's recipe (what a promotion re-scores)."""
        with self.session() as session:
            recipe = self._trial(session, study, number).recipe
            if recipe is None:
                raise ConfigError(f"trial {number} of study '{study}' has no recipe")
            return json.loads(recipe)

    @_retried
    def requeue_running(self, study: str) -> list[int]:
        """Trials left RUNNING by a driver that died, set back to QUEUED; their numbers."""
        with self.session() as session:
            row = self._study(session, study)
            trials = session.scalars(
                select(TrialRow).where(TrialRow.study_id == row.id, TrialRow.state == "RUNNING")
            ).all()
            for trial in trials:
                trial.state = "QUEUED"
            return sorted(t.number for t in trials)

    @_retried
    def set_elapsed(self, study: str, seconds: float) -> None:
        with self.session() as session:
            self._study(session, study).elapsed_seconds = seconds

    @_retried
    def set_state(self, study: str, number: int, state: str) -> None:
        with self.session() as session:
            study_id = self._study_id(session, study)
            self._update_trial(session, study, study_id, number, {"state": state})

    @_retried
    def trials(self, study: str, states: Sequence[str] | None = None) -> list[TrialView]:
        """Trials by number, each with its metrics at the highest fidelity it reached."""
        with self.session() as session:
            row = self._study(session, study)
            query = select(TrialRow).where(TrialRow.study_id == row.id)
            if states:
                query = query.where(TrialRow.state.in_(list(states)))
            trials = session.scalars(query.order_by(TrialRow.number)).all()
            ids = [t.id for t in trials]
            best_rank: dict[int, float] = {}
            scores: dict[int, dict[str, dict[str, float]]] = {}
            fidelity: dict[int, str] = {}
            if ids:
                rows = session.scalars(select(MetricRow).where(MetricRow.trial_id.in_(ids))).all()
                for m in rows:
                    scores.setdefault(m.trial_id, {}).setdefault(m.fidelity, {})[m.name] = m.value
                    if m.fidelity != HOLDOUT and m.rank > best_rank.get(m.trial_id, -math.inf):
                        best_rank[m.trial_id] = m.rank
                        fidelity[m.trial_id] = m.fidelity
            return [
                TrialView(
                    number=t.number,
                    role=t.role,
                    label=t.label,
                    state=t.state,
                    genome=None if t.genome is None else json.loads(t.genome),
                    recipe=None if t.recipe is None else json.loads(t.recipe),
                    proposal_id=t.proposal_id,
                    worker=t.worker,
                    attempts=t.attempts,
                    error=t.error,
                    fidelity=fidelity.get(t.id),
                    metrics=scores.get(t.id, {}).get(FULL, {}),
                    scores=scores.get(t.id, {}),
                    scored_with=t.scored_with,
                    timings={} if t.timings is None else json.loads(t.timings),
                    merge_seconds=t.merge_seconds,
                    eval_seconds=t.eval_seconds,
                    load_seconds=t.load_seconds,
                    created_at=_aware(t.created_at),
                    finished_at=_aware(t.finished_at),
                    told=None
                    if t.tell_seq is None
                    else Told(
                        t.tell_seq,
                        t.asks_before_tell or 0,
                        None if t.told_values is None else json.loads(t.told_values),
                    ),
                )
                for t in trials
            ]

    def pareto(self, study: str, objectives: Sequence[Objective]) -> list[TrialView]:
        """Complete trials no other complete trial dominates at full fidelity (computed now,
        from the metrics); trials scored only cheaply are not compared."""
        pool = [t for t in self.trials(study, ["COMPLETE"]) if t.values(objectives) is not None]
        front = pareto_front([t.values(objectives) or [] for t in pool], objectives)
        return sorted(
            (pool[i] for i in front),
            key=lambda t: -scalarize(objectives, t.values(objectives) or []),
        )

    # -- proposer snapshots and exports ------------------------------------------------------------

    @_retried
    def save_snapshot(self, study: str, state: bytes, told: int) -> None:
        """Store a proposer state; only the newest two are kept (states can be large)."""
        with self.session() as session:
            self._add_snapshot(session, self._study(session, study).id, state, told)

    @staticmethod
    def _add_snapshot(
        session: Session, study_id: int, state: bytes, told: int, keep: int = 2
    ) -> None:
        session.execute(
            insert(SnapshotRow).values(
                study_id=study_id, told=told, state=state, created_at=utcnow()
            )
        )
        newest = (
            select(SnapshotRow.id)
            .where(SnapshotRow.study_id == study_id)
            .order_by(SnapshotRow.id.desc())
            .limit(keep)
            .scalar_subquery()
        )
        session.execute(
            delete(SnapshotRow).where(
                SnapshotRow.study_id == study_id, SnapshotRow.id.not_in(newest)
            )
        )

    @_retried
    def latest_snapshot(self, study: str) -> tuple[bytes, int] | None:
        with self.session() as session:
            row = self._study(session, study)
            snap = session.scalar(
                select(SnapshotRow)
                .where(SnapshotRow.study_id == row.id)
                .order_by(SnapshotRow.id.desc())
                .limit(1)
            )
            return None if snap is None else (snap.state, snap.told)

    @_retried
    def record_export(self, study: str, number: int, path: str, verified: bool) -> None:
        with self.session() as session:
            row = self._study(session, study)
            session.add(
                ExportRow(study_id=row.id, trial_number=number, path=path, verified=verified)
            )


def _study_fields(row: StudyRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "budget": row.budget,
        "elapsed_seconds": row.elapsed_seconds,
        "created_at": row.created_at.isoformat(),
        "owner": row.owner,
        "heartbeat_at": _aware(row.heartbeat_at),
    }


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def _first_line(exc: BaseException) -> str:
    """The first line of the database driver's own error (SQLAlchemy wraps it as ``orig``)."""
    return first_line(getattr(exc, "orig", None) or exc)


_SCHEMA_RACE_ATTEMPTS = 8


def _lost_creation_race(exc: DBAPIError) -> bool:
    """Whether creating the schema failed because another process created it first."""
    if isinstance(exc, IntegrityError):
        return True  # the version row, or PostgreSQL's catalog entry for a new table
    message = str(exc.orig)
    return "already exists" in message or "database is locked" in message  # SQLite's WAL switch
