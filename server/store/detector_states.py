"""Detector states (one row per run and detector) and the reads of the stalled-run check.

The state functions take the connection of a transaction the caller owns: the detector
runner loads and saves states inside each ingest transaction, so they commit with the points.

    state = load_states(conn, run_id)                    # {detector: {...}}
    save_states(conn, run_id, encode_states(state), stored=set(state))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from sqlalchemy import Connection, select

from .detector_settings import stalled_timeouts
from .models import Alert, DetectorState, Run
from .sql import placeholder

DS = DetectorState.__table__
R = Run.__table__
A = Alert.__table__

#: Detector states are one row per (run, detector); the table's ``key`` column stays empty.
STATE_KEY = ""


def load_state_texts(conn: Connection, run_id: str) -> list[tuple[str, str | None]]:
    """A run's detector states as the JSON text stored, ``[(detector, text)]`` (text None for
    a NULL). PostgreSQL's ``json`` keeps the text it was given, so ``state::text`` is what
    ``save_states`` wrote, byte for byte: read as text, it is parsed by ``decode_state``
    (orjson) rather than by psycopg's stdlib ``json.loads``, and can be compared with the
    text a cache of decoded states holds (``DetectorRunner``)."""
    dialect = conn.dialect.name
    ph = placeholder(dialect)
    col = "state::text" if dialect == "postgresql" else "state"
    return conn.exec_driver_sql(
        f"SELECT detector, {col} FROM detector_states WHERE run_id = {ph} AND key = ''", (run_id,)
    ).all()


def load_states(conn: Connection, run_id: str) -> dict[str, dict]:
    """A run's detector states, by detector."""
    return {d: decode_state(text) for d, text in load_state_texts(conn, run_id)}


def decode_state(text: str | bytes | None) -> Any:
    """A state's stored text as ``load_states`` gives it (``{}`` for NULL or JSON null)."""
    if text is None:
        return {}
    return _parse(text) or {}


def _parse(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # what orjson does not take (an integer past 64 bits)
        return json.loads(text)


def load_state(conn: Connection, run_id: str, detector: str) -> dict | None:
    """One detector's state of a run; None when it has no row yet."""
    row = conn.execute(
        select(DS.c.state).where(DS.c.run_id == run_id, DS.c.detector == detector, DS.c.key == STATE_KEY)
    ).first()
    return None if row is None else (row.state or {})


def encode_states(states: dict[str, dict]) -> dict[str, str]:
    """States as strict JSON text. ``ValueError`` for one that is not (an infinity a
    detector kept): on PostgreSQL its statement would fail and take the whole ingest
    transaction with it."""
    return {d: _encode(st) for d, st in states.items()}


#: ``json.dumps(st, allow_nan=False, separators=(",", ":"))`` without building an encoder at
#: each call: the text states are stored as (and a NaN or an infinity refused).
_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
#: orjson, refusing what ``json`` would not write as it is (a type it does not know, a subclass,
#: an integer past 64 bits, a key that is not a string): then ``_ENCODE`` writes it, or raises.
_ORJSON_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
#: Where orjson's text may differ from ``_ENCODE``'s: a float between 1e-10 and 1e-4 (``0.00001``
#: and ``1e-7`` there, ``1e-05`` and ``1e-07`` in ``json``), null (a NaN or an infinity is null
#: there, refused by ``json``; a None in a state is null in both), and DEL or any byte past
#: ASCII (``json`` escapes them). A string in a state that holds these merely takes the slow way.
_SHORT_EXPONENT = re.compile(rb"e-\d(?!\d)")


def _encode(state: Any) -> str:
    """``_ENCODE(state)``, the same text, from orjson (several times faster on a state's
    floats) where its text is known to be the same."""
    try:
        out = orjson.dumps(state, option=_ORJSON_OPTS)
    except TypeError:  # orjson.JSONEncodeError: json writes it (an int past 64 bits) or raises
        return _ENCODE(state)
    if (
        out.isascii()
        and b"\x7f" not in out
        and b"null" not in out
        and b"0.0000" not in out
        and (b"e-" not in out or _SHORT_EXPONENT.search(out) is None)
    ):
        return out.decode("ascii")
    return _ENCODE(state)


def save_states(conn: Connection, run_id: str, states: dict[str, str], stored: set[str]) -> None:
    """Write encoded detector states (``encode_states``): UPDATE the rows that exist, INSERT
    the others (the run's row is locked by the transaction, so no other writer can insert
    them in between). Plain SQL, parameters as tuples: this runs on every ingest."""
    ph = placeholder(conn.dialect.name)
    js = f"CAST({ph} AS json)" if conn.dialect.name == "postgresql" else ph
    ups = [(s, run_id, d) for d, s in states.items() if d in stored]
    new = [(run_id, d, s) for d, s in states.items() if d not in stored]
    if ups:
        conn.exec_driver_sql(
            f"UPDATE detector_states SET state = {js} WHERE run_id = {ph} AND detector = {ph} AND key = ''", ups
        )
    if new:
        conn.exec_driver_sql(
            f"INSERT INTO detector_states (run_id, detector, key, state) VALUES ({ph}, {ph}, '', {js})", new
        )


# -- the stalled-run check ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchedRuns:
    """What the stalled-run check looks at, read in one transaction."""

    #: ``timeout_s`` each project set for the stalled detector (None or junk where unset).
    timeouts: list
    #: Runs that are running and were seen, and runs with an open stalled alert:
    #: rows with ``id, project_id, status, last_seen_at``.
    runs: list
    #: Ids of the runs with an open stalled alert.
    open_ids: set[str]


def watched_runs(conn: Connection, detector: str) -> WatchedRuns:
    cols = (R.c.id, R.c.project_id, R.c.status, R.c.last_seen_at)
    running = conn.execute(select(*cols).where(R.c.status == "running", R.c.last_seen_at.is_not(None))).all()
    open_ids = set(conn.execute(select(A.c.run_id).where(A.c.detector == detector, A.c.status == "open")).scalars())
    others = conn.execute(select(*cols).where(R.c.id.in_(open_ids - {r.id for r in running}))).all() if open_ids else []
    return WatchedRuns(stalled_timeouts(conn, detector), [*running, *others], open_ids)


def lock_run(conn: Connection, run_id: str) -> Any:
    """The run's ``id, project_id, status, last_seen_at, last_step``, its row locked (FOR UPDATE)
    until the transaction ends: an ingest of this run (which updates the row first) waits.
    None when the run is gone."""
    q = select(R.c.id, R.c.project_id, R.c.status, R.c.last_seen_at, R.c.last_step).where(R.c.id == run_id)
    return conn.execute(q.with_for_update()).first()


class DetectorStateStore:
    """``store.detector_states``: what the stalled-run check needs outside an ingest, each
    method one transaction."""

    def __init__(self, store) -> None:
        self._store = store

    def watched_runs(self, detector: str) -> WatchedRuns:
        with self._store.reading() as conn:
            return watched_runs(conn, detector)

    def with_locked_run(self, run_id: str, check: Callable[[Connection, Any], None]) -> None:
        """``check(conn, run)`` in one write transaction, the run's row locked (``lock_run``);
        nothing when the run is gone."""
        with self._store.writing() as conn:
            run = lock_run(conn, run_id)
            if run is not None:
                check(conn, run)
