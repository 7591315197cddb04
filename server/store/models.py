"""Table models. The schema changes only through the Alembic migrations in ``migrations/``."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType

# BIGINT autoincrement ids on PostgreSQL; SQLite only auto-increments INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class SqliteFloat64(UserDefinedType):
    """An SQLite column for metric values, declared ``BLOB`` so that it has no type affinity.

    A column of REAL affinity writes an integral float as an integer, and -0.0 came back as
    0.0. Without affinity a bound float is kept as its 8 IEEE bytes, sign of zero included;
    it is read, compared and ordered as a number all the same. (Migration 0004.)
    """

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "BLOB"


#: Metric values: DOUBLE PRECISION on PostgreSQL, a float without affinity on SQLite.
Value = Double().with_variant(SqliteFloat64(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """A stored time as UTC-aware: SQLite hands back naive datetimes, PostgreSQL aware ones."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    # Chosen by the client, so a restarted job resumes the same run.
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="running")
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Wall time (server clock) of the last ingest, for the stalled-run detector.
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    __table_args__ = (Index("ix_runs_project_created", "project_id", "created_at"),)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_series_run_name"),)


def is_partition(table_name: str) -> bool:
    """Partitions of ``points`` (PostgreSQL, migration 0003) are not models of their own."""
    return table_name.startswith("points_p") and table_name[len("points_p") :].isdigit()


class Point(Base):
    """One value of one series at one step: (series_id, step) is the key and the read order.

    ``value`` is NULL for NaN: SQLite turns a bound NaN into NULL anyway, so both databases
    store it the same way; +-inf are stored as themselves.
    """

    __tablename__ = "points"
    series_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float | None] = mapped_column(Value, nullable=True)
    wall: Mapped[float] = mapped_column(Double)
    # No foreign key: it would cost an index probe per inserted point; series rows are never
    # deleted (nor are runs: no route or command deletes one; whatever comes to delete them
    # must remove their points explicitly).
    __table_args__ = {"sqlite_with_rowid": False}


class Rollup(Base):
    """Per-bucket extremes of a series (bucket = step >> level), kept at ingest.

    min/max and the first NaN are idempotent to re-apply, so a resent batch changes nothing.
    They let a read of a long series touch one row per bucket instead of every point.
    """

    __tablename__ = "rollups"
    series_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    min_value: Mapped[float | None] = mapped_column(Value, nullable=True)
    min_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_value: Mapped[float | None] = mapped_column(Value, nullable=True)
    max_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    nan_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = {"sqlite_with_rowid": False}


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    #: Client-chosen key that makes resending an event harmless.
    key: Mapped[str] = mapped_column(String(200))
    step: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text, default="")
    info: Mapped[dict] = mapped_column(JSON, default=dict)
    wall: Mapped[float | None] = mapped_column(Double, nullable=True)
    __table_args__ = (
        UniqueConstraint("run_id", "key", name="uq_events_run_key"),
        Index("ix_events_run_step", "run_id", "step"),
    )


class Alert(Base):
    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    detector: Mapped[str] = mapped_column(String(64))
    #: The episode key inside the detector (a series name, a task): one open alert per key.
    key: Mapped[str] = mapped_column(String(200), default="")
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="open")
    start_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    peak_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    end_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict] = mapped_column(JSON, default=dict)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: How many changes webhooks hear of the alert has had: 1 when opened, +1 at each
    #: escalation, reopening and resolution (migration 0005). Deliveries carry it as "sequence".
    change_seq: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    #: The episode's first detection, kept beside its peak: ``{"step", "severity", "message",
    #: "evidence"}`` (migration 0006; NULL for alerts stored before it).
    first_detection: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    #: The root alert of this alert's incident, NULL for a root: a consequence is shown under
    #: its root and never paged on its own (migration 0006).
    cause_alert_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("alerts.id", ondelete="SET NULL"), nullable=True, index=True
    )
    __table_args__ = (
        Index("ix_alerts_run_status", "run_id", "status"),
        Index("ix_alerts_project_opened", "project_id", "opened_at"),
        # One open alert per episode, enforced by the database too (migration 0002).
        Index(
            "uq_alerts_open_episode",
            "run_id",
            "detector",
            "key",
            unique=True,
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
    )


class DetectorState(Base):
    """A detector's small incremental state for one run and key, saved with the points."""

    __tablename__ = "detector_states"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    detector: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[dict] = mapped_column(JSON, default=dict)


class DetectorSetting(Base):
    __tablename__ = "detector_settings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    detector: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    __table_args__ = (UniqueConstraint("project_id", "detector", name="uq_detector_settings"),)


class Webhook(Base):
    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(200))
    severities: Mapped[list] = mapped_column(JSON, default=list)
    format: Mapped[str] = mapped_column(String(16), default="json")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """The durable outbox: a row per (webhook, alert transition), retried until delivered."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), nullable=True)
    payload: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        Index("ix_deliveries_due", "status", "next_attempt_at"),
        # The delivery log of one webhook, newest first (migration 0002).
        Index("ix_deliveries_webhook", "webhook_id", "id"),
        # Earlier deliveries of one (alert, webhook), which a later one waits for (migration 0005).
        Index("ix_deliveries_alert", "alert_id", "webhook_id", "id"),
    )


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    #: SHA-256 of the token; the token itself is shown once, at creation.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
