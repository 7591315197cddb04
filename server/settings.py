"""One settings class for the service, read from ``STETHOSCOPE_*`` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The embedded default: an SQLite file in the working directory.
DEFAULT_DATABASE_URL = "sqlite:///stethoscope.db"


class Settings(BaseSettings):
    """Service settings; bad values fail at start, not at the first request.

    >>> Settings(database_url="sqlite:///tmp/x.db").database_url
    'sqlite:///tmp/x.db'
    """

    model_config = SettingsConfigDict(env_prefix="STETHOSCOPE_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    #: Apply migrations when the server starts (``stethoscope db upgrade`` does it by hand).
    migrate_on_start: bool = True
    #: Largest request body the ingest endpoint reads, in bytes.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    #: Points per ingest request (summed over series).
    max_points_per_batch: int = Field(default=50_000, gt=0)
    #: Pool size for PostgreSQL connections.
    pool_size: int = Field(default=8, gt=0)
    #: URL people use to reach the dashboard (for links in messages); default: host and port.
    public_url: str | None = None

    # -- alerts and webhooks (see stethoscope_server.outbox and .detector_runner) -------------
    #: Run the detectors on ingest and the stalled-run check (off: points are only stored).
    detectors_enabled: bool = True
    #: Seconds a project's detector settings are cached by each worker; a change made through
    #: another worker takes effect within this time (the worker that took it: at once).
    detector_settings_ttl_s: float = Field(default=5.0, ge=0)
    #: How often each worker looks for stalled runs, in seconds.
    stall_check_s: float = Field(default=15.0, gt=0)
    #: How often the webhook outbox looks for due deliveries when nothing woke it, in seconds.
    outbox_poll_s: float = Field(default=1.0, gt=0)
    #: Timeout of one webhook request, in seconds.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    #: Attempts before a delivery is marked failed. With the backoff below (2 s doubling to a
    #: 30 min cap, each delay jittered to 50-100%) the last attempt comes 1.3 to 2.6 hours
    #: after the first: long enough to ride out a receiver's restart or a short outage.
    webhook_max_attempts: int = Field(default=15, ge=1)
    #: First retry delay; each retry doubles it (with jitter), up to ``webhook_backoff_max_s``.
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    webhook_backoff_max_s: float = Field(default=1800.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: str) -> str:
        if not v.startswith(("sqlite", "postgresql")):
            raise ValueError("STETHOSCOPE_DATABASE_URL must be an sqlite:/// or postgresql:// URL")
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            # psycopg 3 is the driver we ship.
            v = "postgresql+psycopg://" + v.split("://", 1)[1]
        if v.startswith("sqlite:///") and not v.startswith("sqlite:///:memory:"):
            Path(v[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return v

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"
