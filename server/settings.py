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
