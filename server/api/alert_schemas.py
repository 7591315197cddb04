"""Wire schemas of alerts, detector settings and webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

from stethoscope.core.detectors import SEVERITIES

from ..alerting.outbox import FORMATS
from ..store.alerts import ALERT_STATUSES
from ..store.webhooks import DELIVERY_STATUSES
from .schemas import NO_NUL, Strict

Severity = Literal[SEVERITIES]  # type: ignore[valid-type]
AlertStatus = Literal[ALERT_STATUSES]  # type: ignore[valid-type]
DeliveryStatus = Literal[DELIVERY_STATUSES]  # type: ignore[valid-type]

#: What a new webhook hears about unless told otherwise: ``info`` (e.g. sharpness nearing the
#: edge of stability) is for the dashboard, not for a pager.
DEFAULT_WEBHOOK_SEVERITIES = ["warning", "critical"]


class FirstDetection(BaseModel):
    step: int = Field(description="the step at which the alert was raised")
    severity: Severity
    message: str
    evidence: dict[str, Any] = Field(description="as in the alert's evidence")


class AlertOut(BaseModel):
    id: int
    run_id: str
    project: str
    detector: str
    key: str = Field(description="the episode inside the detector (a series name, ...): one open alert per key")
    severity: Severity
    status: AlertStatus
    start_step: int | None = Field(description="first step at which the condition held")
    peak_step: int | None = Field(description="step at which it was worst")
    end_step: int | None = Field(description="last step it held (open) or the step it cleared (resolved)")
    message: str
    evidence: dict[str, Any] = Field(
        description="values and thresholds; non-finite numbers as NaN, Infinity, -Infinity"
    )
    opened_at: datetime
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    first_detection: FirstDetection | None = Field(
        description="what the alert said when it was raised, kept beside its peak (null for alerts stored before "
        "first detections were kept)"
    )
    cause_alert_id: int | None = Field(
        description="the root alert of this alert's incident: a consequence is shown under it and not paged on "
        "its own; null for a root"
    )


class IncidentOut(AlertOut):
    """A root alert and the alerts its cause explains."""

    consequences: list[AlertOut] = Field(
        description="alerts whose chain of causes leads to this one, oldest first (each names its direct cause)"
    )


class WebhookCreate(Strict):
    url: str = Field(max_length=2000, pattern=NO_NUL, description="http(s) URL the alerts are POSTed to")
    secret: str | None = Field(
        default=None,
        min_length=8,
        max_length=200,
        pattern=NO_NUL,
        description="HMAC key for X-Stethoscope-Signature; generated when absent; shown only in this reply",
    )
    severities: list[Severity] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_SEVERITIES), min_length=1)
    format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
        default="json", description="json: the alert as an object; slack: {text, blocks} for a Slack incoming webhook"
    )
    enabled: bool = True

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        try:
            u.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("url has an invalid port") from None
        return v

    @field_validator("severities")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return [s for s in SEVERITIES if s in v]


class WebhookUpdate(Strict):
    enabled: bool = Field(description="false pauses the webhook: it is kept but gets no new deliveries")


class WebhookOut(BaseModel):
    id: int
    project: str
    url: str
    severities: list[Severity]
    format: str
    enabled: bool
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="shown once: store it now to verify signatures")


class DeliveryOut(BaseModel):
    id: int
    webhook_id: int
    alert_id: int | None
    event: str | None = Field(
        description="alert.opened, alert.escalated, alert.reopened, alert.resolved or test (a consequence of another "
        "alert is never paged: its root's deliveries list it)"
    )
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = Field(description="when the next attempt is due (pending only)")
    last_status_code: int | None
    last_error: str | None = Field(
        description="what went wrong, as a class only: HTTP 4xx, HTTP 5xx, connection failed, "
        "timed out, TLS failed, name not resolved, target refused: <kind> address"
    )
    created_at: datetime
    delivered_at: datetime | None
    body: dict[str, Any] | None = Field(description="the JSON object sent")
