"""Wire schemas of the REST API (pydantic), separate from the table models."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from stethoscope.core.wire import MAX_NAME_LENGTH, RUN_STATUSES

#: Text we store: PostgreSQL's text types cannot hold NUL (SQLite can), so both databases
#: refuse it at the door with a 422 instead of one of them failing with a 500.
NO_NUL = r"^[^\x00]*$"
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH, strip_whitespace=False, pattern=NO_NUL)
]


def _strict_json(v: dict) -> dict:
    # Python's JSON reader takes NaN, 1e999 (infinity) and lone surrogates (a "\udc00" escape);
    # PostgreSQL's json type refuses the first two, SQLite turns them into null, and a lone
    # surrogate cannot be written back as UTF-8. Refused here, on both databases alike.
    try:
        json.dumps(v, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as e:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"must be plain JSON (no NaN, infinity or lone surrogates): {e}") from None
    return v


#: A JSON object stored as is (a run's config, an event's info).
JsonObject = Annotated[dict[str, Any], AfterValidator(_strict_json)]

RunStatus = Literal[RUN_STATUSES]  # type: ignore[valid-type]
WireFloat = float | Literal["NaN", "Infinity", "-Infinity"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunCreate(Strict):
    project: Name = "default"
    name: Name | None = None
    config: JsonObject | None = None
    tags: list[Name] | None = Field(default=None, max_length=100)


class RunUpdate(Strict):
    status: RunStatus | None = None
    name: Name | None = None
    tags: list[Name] | None = Field(default=None, max_length=100)


class RunOut(BaseModel):
    id: str
    project: str
    name: str
    status: str
    config: dict[str, Any]
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    last_step: int | None


class ProjectOut(BaseModel):
    name: str
    created_at: datetime
    runs: int


class SeriesPoints(Strict):
    """Points of one series, as columns. Non-finite values are the strings NaN, Infinity, -Infinity."""

    name: Name
    steps: list[int]
    values: list[WireFloat]
    walls: list[float] | None = Field(
        default=None, description="Unix seconds per point; the server's clock when absent."
    )


class IngestBatch(Strict):
    """One request: points of many series of one run (the schema; the route validates it by hand, faster)."""

    series: list[SeriesPoints]


class IngestReply(BaseModel):
    points: int = Field(description="points received")
    inserted: int = Field(description="points stored now; a resend stores none")
    alerts: list[dict[str, Any]] = Field(
        default_factory=list,
        description="alerts opened (or reopened: an episode that came back) for this run by this batch; one whose "
        "cause_alert_id is set is a consequence of that alert, not a separate problem",
    )


class SeriesInfo(BaseModel):
    name: str
    first_step: int | None
    last_step: int | None
    last_value: WireFloat | None


class SeriesData(BaseModel):
    name: str
    steps: list[int]
    values: list[WireFloat]
    downsampled: bool


class EventIn(Strict):
    key: Name = Field(description="client-chosen id: a resent event with the same key is stored once")
    step: int = Field(ge=-(2**63), le=2**63 - 1)
    kind: Name
    message: str = Field(default="", max_length=10_000, pattern=NO_NUL)
    info: JsonObject = Field(default_factory=dict)
    #: Unix seconds; NaN or infinity is no time (Python's JSON reader takes NaN and 1e999).
    wall: float | None = Field(default=None, allow_inf_nan=False)


class EventBatch(Strict):
    events: list[EventIn] = Field(max_length=10_000)


class EventOut(BaseModel):
    key: str
    step: int
    kind: str
    message: str
    info: dict[str, Any]
    wall: float | None


class EventsReply(BaseModel):
    received: int
    inserted: int
