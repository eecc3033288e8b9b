"""The study database: studies, trials, metrics per fidelity, proposer snapshots, exports.

SQLite by default (a file; WAL journal so readers never block the one writer, the driver),
PostgreSQL for clusters (``postgresql+psycopg://user@host/db``). Several studies share one
database. Every write is one transaction, so a killed driver leaves whole rows or none. The
Pareto front is computed from the stored metrics on every call, never cached.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from evomerge.errors import ConfigError, EvomergeError
from evomerge.optimize import Objective, pareto_front, scalarize
from evomerge.study.schema import (
    SCHEMA_VERSION,
    Base,
    ExportRow,
    Meta,
    MetricRow,
    SnapshotRow,
    StudyRow,
    TrialRow,
    utcnow,
)

TERMINAL = ("COMPLETE", "FAILED")


class StorageError(EvomergeError):
    """The database cannot be opened, is of another schema version, or lost a write."""


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def storage_url(value: str | Path) -> str:
    """A SQLAlchemy URL; a plain path means an SQLite file."""
    text = str(value)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    return text


def fidelity_name(limit: int | float | None) -> tuple[str, float]:
    """``("full", inf)`` for all documents, ``("limit=10", 10)`` for a subset."""
    if limit is None:
        return "full", math.inf
    return f"limit={limit:g}", float(limit)


@dataclass(frozen=True)
class TrialView:
    """A trial as read back: its row fields and its metrics at its highest fidelity."""

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

    def values(self, objectives: Sequence[Objective]) -> list[float] | None:
        try:
            return [self.metrics[o.metric] for o in objectives]
        except KeyError:
            return None


class StudyStore:
    """One database, opened once per process."""

    def __init__(self, url: str | Path) -> None:
        self.url = storage_url(url)
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
            Base.metadata.create_all(self.engine)
            self._check_version()
        except OperationalError as exc:
            raise StorageError(
                f"cannot open the study database {mask_url(self.url)}: {_first_line(exc)}"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

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
        with Session(self.engine) as session, session.begin():
            row = session.get(Meta, "schema_version")
            if row is None:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            if int(row.value) > SCHEMA_VERSION:
                raise StorageError(
                    f"{mask_url(self.url)} was written by a newer evomerge (schema "
                    f"{row.value}; this one knows {SCHEMA_VERSION}); upgrade evomerge"
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

    # -- studies -------------------------------------------------------------------------------

    def create_study(self, name: str, config: Mapping[str, Any], budget: int) -> None:
        with self.session() as session:
            if session.scalar(select(StudyRow.id).where(StudyRow.name == name)) is not None:
                raise ConfigError(
                    f"study '{name}' already exists in {mask_url(self.url)}; "
                    "resume it (evomerge resume) or choose another name"
                )
            session.add(StudyRow(name=name, config=json.dumps(config), budget=budget))

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

    def study_config(self, name: str) -> dict[str, Any]:
        with self.session() as session:
            return json.loads(self._study(session, name).config)

    def set_status(self, name: str, status: str) -> None:
        with self.session() as session:
            row = self._study(session, name)
            row.status = status
            row.updated_at = utcnow()

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
                {
                    "name": row.name,
                    "status": row.status,
                    "budget": row.budget,
                    "created_at": row.created_at.isoformat(),
                    "trials": counts.get(row.id, {}),
                }
                for row in session.scalars(select(StudyRow).order_by(StudyRow.created_at))
            ]

    # -- trials --------------------------------------------------------------------------------

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
            row = self._study(session, study)
            session.add(
                TrialRow(
                    study_id=row.id,
                    number=number,
                    role=role,
                    label=label,
                    state=state,
                    genome=None if genome is None else json.dumps([float(g) for g in genome]),
                    recipe=None if recipe is None else json.dumps(recipe),
                    proposal_id=proposal_id,
                )
            )

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
    ) -> None:
        """Record a result and its metrics in one transaction."""
        if state not in TERMINAL:
            raise ValueError(f"a finished trial is COMPLETE or FAILED, not {state}")
        fidelity, rank = fidelity_name(limit)
        with self.session() as session:
            trial = self._trial(session, study, number)
            trial.state = state
            trial.worker = worker
            trial.attempts = attempts
            trial.error = error
            trial.merge_seconds = merge_seconds
            trial.eval_seconds = eval_seconds
            trial.finished_at = utcnow()
            for name, value in (metrics or {}).items():
                session.add(_metric(trial.id, fidelity, rank, name, value))

    def add_metrics(
        self, study: str, number: int, metrics: Mapping[str, float], limit: int | float | None
    ) -> None:
        """Metrics of a re-score at another fidelity (promotion)."""
        fidelity, rank = fidelity_name(limit)
        with self.session() as session:
            trial = self._trial(session, study, number)
            for name, value in metrics.items():
                session.add(_metric(trial.id, fidelity, rank, name, value))

    def _trial(self, session: Session, study: str, number: int) -> TrialRow:
        row = self._study(session, study)
        trial = session.scalar(
            select(TrialRow).where(TrialRow.study_id == row.id, TrialRow.number == number)
        )
        if trial is None:
            raise ConfigError(f"study '{study}' has no trial {number}")
        return trial

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

    def set_state(self, study: str, number: int, state: str) -> None:
        with self.session() as session:
            self._trial(session, study, number).state = state

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
            metrics: dict[int, dict[str, float]] = {}
            fidelity: dict[int, str] = {}
            if ids:
                rows = session.scalars(select(MetricRow).where(MetricRow.trial_id.in_(ids))).all()
                for m in rows:
                    best_rank[m.trial_id] = max(best_rank.get(m.trial_id, -math.inf), m.rank)
                for m in rows:
                    if m.rank == best_rank[m.trial_id]:
                        metrics.setdefault(m.trial_id, {})[m.name] = m.value
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
                    metrics=metrics.get(t.id, {}),
                    merge_seconds=t.merge_seconds,
                    eval_seconds=t.eval_seconds,
                )
                for t in trials
            ]

    def pareto(self, study: str, objectives: Sequence[Objective]) -> list[TrialView]:
        """Complete trials no other complete trial dominates (computed now, from the metrics)."""
        pool = [t for t in self.trials(study, ["COMPLETE"]) if t.values(objectives) is not None]
        front = pareto_front([t.values(objectives) or [] for t in pool], objectives)
        return sorted(
            (pool[i] for i in front),
            key=lambda t: -scalarize(objectives, t.values(objectives) or []),
        )

    # -- proposer snapshots and exports ------------------------------------------------------------

    def save_snapshot(self, study: str, state: bytes, told: int, keep: int = 2) -> None:
        """Store a proposer state; only the newest ``keep`` are kept (states can be large)."""
        with self.session() as session:
            row = self._study(session, study)
            session.add(SnapshotRow(study_id=row.id, told=told, state=state))
            session.flush()
            old = session.scalars(
                select(SnapshotRow.id)
                .where(SnapshotRow.study_id == row.id)
                .order_by(SnapshotRow.id.desc())
                .offset(keep)
            ).all()
            if old:
                session.execute(delete(SnapshotRow).where(SnapshotRow.id.in_(old)))

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

    def record_export(self, study: str, number: int, path: str, verified: bool) -> None:
        with self.session() as session:
            row = self._study(session, study)
            session.add(
                ExportRow(study_id=row.id, trial_number=number, path=path, verified=verified)
            )


def _metric(trial_id: int, fidelity: str, rank: float, name: str, value: float) -> MetricRow:
    return MetricRow(trial_id=trial_id, fidelity=fidelity, rank=rank, name=name, value=float(value))


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
