"""One settings class for the service, read from ``STETHOSCOPE_*`` variables."""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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

    # -- alerts and webhooks (see stethoscope_server.alerting.outbox and .detector_runner) -------------
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
    #: Let webhooks reach loopback, link-local (169.254.169.254, the cloud metadata service),
    #: private, carrier-grade NAT, multicast and reserved addresses. Off: a project admin
    #: could otherwise make the server POST to services only it can reach (see
    #: stethoscope_server.alerting.webhook_targets). On for a receiver inside a trusted network.
    webhook_allow_private: bool = False

    # -- security (see stethoscope_server.auth.gate and README "Running it for a team") -------
    #: ``on``: every /api/v1 and dashboard route needs a token; ``off``: none does. Unset: on
    #: when bound to a non-loopback address, off on loopback (a single user's machine, the
    #: tests, the demo and the benchmarks run there without tokens).
    auth: Literal["on", "off"] | None = None
    #: Serve without authentication on a non-loopback address, knowingly (``--insecure``).
    insecure: bool = False
    #: An admin token to accept from the first start on (stored hashed). Unset: the first
    #: start with auth on generates one and prints it once.
    admin_token: SecretStr | None = Field(default=None, min_length=16)
    #: Seconds a worker trusts a token it has checked; a revocation made through another
    #: worker takes effect within this time (through the same worker: at once).
    token_cache_s: float = Field(default=5.0, ge=0)
    #: Requests per second per token (token bucket per worker process); 0 turns it off. A
    #: job's hook sends about one request a second; a dashboard page polls once a second.
    rate_limit_per_s: float = Field(default=50.0, ge=0)
    #: Requests a token may send at once above the rate (a page load fetches ~10 things).
    rate_limit_burst: int = Field(default=200, ge=1)
    #: Series one run may have: a job logging a new name every step would otherwise grow the
    #: series table without bound. Per-module metrics of a large model stay well under it.
    max_series_per_run: int = Field(default=10_000, gt=0)
    #: Seconds a request body may take to arrive, whole; slower, it gets 408 and the connection
    #: is closed (a client trickling bytes would otherwise hold a connection and memory for as
    #: long as it likes). 60 s carries the 16 MB body limit over a 2 Mbit/s link.
    body_timeout_s: float = Field(default=60.0, gt=0)
    #: Failed authentications (unknown or revoked tokens) per client address: a burst, then
    #: one per ``1 / auth_failures_per_s`` seconds; beyond that 429 with ``Retry-After``. A
    #: typo costs nothing; guessing tokens from one address goes at 12 a minute. 0: no limit.
    auth_failures_per_s: float = Field(default=0.2, ge=0)
    auth_failure_burst: int = Field(default=10, ge=1)
    #: With authentication off, the only Host names served (besides loopback names and
    #: addresses, the bind address and ``public_url``'s host): a web page elsewhere cannot then
    #: reach this server by pointing a name of its own at 127.0.0.1 (DNS rebinding). Comma-
    #: separated; ``*`` allows any (a server behind a proxy that checks Host itself).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: str) -> str:
        if not v.startswith(("sqlite", "postgresql")):
            raise ValueError("STETHOSCOPE_DATABASE_URL must be an sqlite:/// or postgresql:// URL")
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            # psycopg 3 is the driver we ship.
            v = "postgresql+psycopg://" + v.split("://", 1)[1]
        if v.startswith("sqlite:///") and not v.startswith("sqlite:///:memory:"):
            Path(v[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return v

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, v):
        if isinstance(v, str):
            v = v.split(",")
        return [h.strip().lower() for h in v if h.strip()]

    @property
    def auth_enabled(self) -> bool:
        if self.auth is not None:
            return self.auth == "on"
        return not (is_loopback(self.host) or self.insecure)

    def check_exposure(self) -> None:
        """Refuse to serve without authentication on a non-loopback address unless told ``insecure``."""
        if not self.auth_enabled and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} without authentication (STETHOSCOPE_AUTH=off): anyone who "
                f"can reach it could read and write every run. Turn auth on (the default off loopback) or "
                f"pass --insecure (STETHOSCOPE_INSECURE=1) if the network itself is trusted"
            )

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


@functools.lru_cache(maxsize=1024)  # pure; the gate asks it on every request (auth_enabled, Host)
def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only listens on this machine (``localhost``, 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address
