"""The study database's own tables (SQLAlchemy). All names start with ``evomerge_`` so they
never collide with Optuna's tables (``studies``, ``trials``, ...) in a shared database."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 4
"""4: trials record where their time went (``timings``: seconds per phase, batch sizes).
3: trials record how they were scored (``scored_with``: working dtype and device kind).
2: trials record what the proposer was told and load seconds, studies their wall time
and the driver that holds them (a lease with a heartbeat). A schema-2 or -3 database is
upgraded in place (nullable columns added); schema 1 was only ever written by development
builds and is refused, not migrated."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself (``schema_version``)."""

    __tablename__ = "evomerge_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class StudyRow(Base):
    __tablename__ = "evomerge_studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    config: Mapped[str] = mapped_column(Text)
    """The study config as JSON, so ``resume`` needs only the storage URL and the name."""
    budget: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="created")
    owner: Mapped[str | None] = mapped_column(String(256), nullable=True)
    """The driver running the study now (``host:pid:token``), None when none is."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """When the owner last said it is alive; a lease older than the timeout is free."""
    elapsed_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    """Wall time the driver has spent on the study, over all runs (the ``hours`` budget)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    trials: Mapped[list[TrialRow]] = relationship(back_populates="study")


class TrialRow(Base):
    __tablename__ = "evomerge_trials"
    __table_args__ = (UniqueConstraint("study_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("evomerge_studies.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), index=True)
    genome: Mapped[str | None] = mapped_column(Text, nullable=True)
    recipe: Mapped[str | None] = mapped_column(Text, nullable=True)
    proposal_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    tell_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """For a proposal: how many results the proposer had been told before this one."""
    asks_before_tell: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """For a proposal: how many proposals had been asked when this one was told."""
    told_values: Mapped[str | None] = mapped_column(Text, nullable=True)
    """For a proposal: the objective values told (JSON), null if it was told as failed."""
    load_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    """How long the worker that ran the trial took to load its models (once, at its start)."""
    merge_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    scored_with: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """How the worker scored the trial: its working dtype and device kind (``float32 on cuda``);
    an export's verification re-scores the same way."""
    timings: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Where the trial's time went (JSON): ``merge_math``, ``transfer``, ``copy`` and
    ``evaluation`` seconds, the evaluators' ``batch_sizes`` and ``oom_retries``."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    study: Mapped[StudyRow] = relationship(back_populates="trials")
    metrics: Mapped[list[MetricRow]] = relationship(back_populates="trial")


class InspectionRow(Base):
    """An ``evomerge inspect`` of a study's models: where it was written and its summary (an
    export's model card links the latest). A table added beside schema 4, created on open."""

    __tablename__ = "evomerge_inspections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("evomerge_studies.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    summary: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MetricRow(Base):
    """One metric of one trial at one fidelity (``rank``: documents per task; None = all)."""

    __tablename__ = "evomerge_metrics"
    __table_args__ = (UniqueConstraint("trial_id", "fidelity", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("evomerge_trials.id"), index=True)
    fidelity: Mapped[str] = mapped_column(String(32))
    rank: Mapped[float] = mapped_column(Float)
    name: Mapped[str] = mapped_column(String(256))
    value: Mapped[float] = mapped_column(Float)
    trial: Mapped[TrialRow] = relationship(back_populates="metrics")


class DocumentsRow(Base):
    """A trial's per-document results at one fidelity (``evomerge.evaluate.documents`` bytes:
    per task, the scored documents, each one's metric values and log-likelihood margin), what
    an estimated fidelity learns from. A table added beside schema 4, created on open."""

    __tablename__ = "evomerge_documents"
    __table_args__ = (UniqueConstraint("trial_id", "fidelity"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("evomerge_trials.id"), index=True)
    fidelity: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class SnapshotRow(Base):
    """A proposer state after ``told`` results (successes and failures), written by the
    driver now and then; results told later are replayed from the trials on resume."""

    __tablename__ = "evomerge_snapshots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("evomerge_studies.id"), index=True)
    told: Mapped[int] = mapped_column(Integer)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExportRow(Base):
    __tablename__ = "evomerge_exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("evomerge_studies.id"), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
