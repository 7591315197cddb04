"""Points: bulk idempotent ingest, one statement per ~64 rows, the insert itself the check.

A batch's points go in as multi-row ``INSERT ... ON CONFLICT DO NOTHING`` statements, and what
the database says it stored decides what is new (for the reply, the rollups and the
detectors): no read of the points comes before the write, whatever the table's size. A
resend or an overlap is the rare case and takes a slower, exact path:

- PostgreSQL: one statement for the whole batch (arrays through ``unnest``); it counts the
  rows it stored and, when they are fewer than the rows sent, names them (``RETURNING``), so
  a point another worker stored first is not new.
- SQLite: one writer at a time (BEGIN IMMEDIATE), so nothing changes between a read and the
  insert after it. One statement asks whether any series of the batch holds a point in the
  batch's step range (an index probe per series, ~13 us for 20 series); in the common case
  none does and the batch goes in whole. Otherwise the steps already stored are read for
  the batch's range and only the others are inserted. (The batch used to go in inside a
  savepoint, undone on a resend: a savepoint makes SQLite copy every page the batch touches
  into its sub-journal first, ~0.3 us a point, twenty times the probe.)

The hot path talks to the DB-API connection itself: building an ORM object or a parameter
dict per point, or going through SQLAlchemy's execution layer per statement, would cost more
than the database's own insert.

    new = PointWriter("sqlite").write(conn, [(series_id, SeriesBatch("loss", steps, values, walls))])
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

from sqlalchemy import Connection

from . import rollups as _rollups
from .pg_arrays import float8_array, int8_array, int8_runs
from .runs import touch_step_sql
from .sql import placeholder

#: Rows one SQLite statement inserts. Per-row ``executemany`` paid ~2.1 us a point, a 64-row
#: statement ~1.5 us (benchmarks/ingest.py, issue 18); larger statements were no faster.
#: Remainders go in as powers of two, so a connection prepares at most 7 distinct statements
#: and reuses them (sqlite3's statement cache).
SQLITE_ROWS_PER_STATEMENT = 64
#: The same for rollup rows (10 columns: 320 parameters, inside SQLite's old 999 limit).
SQLITE_ROLLUPS_PER_STATEMENT = 32

#: Series one SQLite probe statement covers; fewer are padded up to a power of two (by
#: repeating a range), so a connection prepares at most 7 probe statements.
SQLITE_SERIES_PER_PROBE = 64

#: How each rollup column travels to PostgreSQL (binary arrays, ``pg_arrays``), in
#: ``rollups.COLUMNS`` order. A bucket's min and max are never NaN (NaN is its ``nan_step``).
_PG_ROLLUP_PACKERS = tuple(float8_array if t == "float8" else int8_array for t in _rollups.PG_TYPES)


@dataclass(frozen=True, slots=True)
class SeriesBatch:
    """Validated points of one series: steps unique within the batch, values as floats."""

    name: str
    steps: list[int]
    values: list[float]
    walls: list[float]


def _point_params(items: list[tuple[int, SeriesBatch]]) -> list:
    """The batch as one flat parameter list, four per point, filled column by column by
    slice assignment (C loops, no tuple per point). sqlite3 binds a NaN as NULL, how both
    databases store NaN."""
    total = sum(len(sb.steps) for _, sb in items)
    flat: list = [None] * (4 * total)
    at = 0
    for series_id, sb in items:
        end = at + 4 * len(sb.steps)
        flat[at:end:4] = [series_id] * len(sb.steps)
        flat[at + 1 : end : 4] = sb.steps
        flat[at + 2 : end : 4] = sb.values
        flat[at + 3 : end : 4] = sb.walls
        at = end
    return flat


def _keep(sb: SeriesBatch, keep: list[int]) -> SeriesBatch:
    return SeriesBatch(sb.name, [sb.steps[i] for i in keep], [sb.values[i] for i in keep], [sb.walls[i] for i in keep])


def _only(items: list[tuple[int, SeriesBatch]], stored: set[tuple[int, int]]) -> list[tuple[int, SeriesBatch]]:
    """The points of ``items`` whose (series id, step) is in ``stored``."""
    out = []
    for series_id, sb in items:
        keep = [i for i, s in enumerate(sb.steps) if (series_id, s) in stored]
        if keep:
            out.append((series_id, _keep(sb, keep)))
    return out


def _driver_row(conn: Connection, statement: str, params: tuple) -> tuple:
    """The one row of ``conn.exec_driver_sql(statement, params).one()``, from the driver's own
    cursor: SQLAlchemy's execution context and result object (its metadata built anew for a
    text statement each time) cost ~0.07 ms a batch. A driver error goes through SQLAlchemy's
    own handling all the same: wrapped as its ``DBAPIError`` (an outage is still a 503), and a
    lost connection invalidated (``connection_invalidated``, the pool's reconnect)."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(statement, params)
        row = cursor.fetchone()
    except conn.dialect.loaded_dbapi.Error as e:
        conn._handle_dbapi_exception(e, statement, params, cursor, None)
    finally:
        cursor.close()
    if row is None:  # as ``.one()``
        raise RuntimeError(f"no row from {statement[:60]!r}")
    return row


class _MultiRow:
    """``INSERT ... VALUES (...), (...) ...`` over a flat parameter list on a sqlite3
    connection: ``per`` rows a statement, the remainder in powers of two."""

    def __init__(self, head: str, width: int, tail: str, per: int) -> None:
        self.head, self.width, self.tail, self.per = head, width, tail, per
        self.row = "(" + ", ".join(["?"] * width) + ")"
        self._sql: dict[int, str] = {}

    def _statement(self, rows: int) -> str:
        sql = self._sql.get(rows)
        if sql is None:
            sql = self._sql[rows] = f"{self.head} VALUES {', '.join([self.row] * rows)} {self.tail}"
        return sql

    def run(self, raw, flat: list) -> int:
        """Execute; returns the rows the database reports changed (inserted, for DO NOTHING)."""
        w = self.width
        n = len(flat) // w
        changed = i = 0
        while i < n:
            m = self.per if n - i >= self.per else 1 << ((n - i).bit_length() - 1)
            changed += raw.execute(self._statement(m), flat[i * w : (i + m) * w]).rowcount
            i += m
        return changed


class PointWriter:
    """Writes validated batches inside the caller's transaction, on SQLite or PostgreSQL."""

    def __init__(self, dialect: str) -> None:
        self.postgres = dialect == "postgresql"
        ph = placeholder(dialect)
        self._existing_sql = f"SELECT step FROM points WHERE series_id = {ph} AND step >= {ph} AND step <= {ph}"
        if self.postgres:
            # One statement for the whole batch, points and rollups: arrays travel as a few
            # parameters (psycopg prepares a statement it has run a few times on a connection).
            # The rollup rows are computed before it, for every point sent, and merged only
            # when every point was new (``counted.n`` = the points sent); otherwise the
            # points stored are named (``RETURNING``) and the rollups of the new ones follow
            # in a second statement. In the common case one row comes back, the count.
            casts = ", ".join(f"%s::{t}[]" for t in _rollups.PG_TYPES)
            self._rollup_sql = (
                f"INSERT INTO rollups AS r ({_rollups.COLUMNS}) SELECT * FROM unnest({casts}) {_rollups.MERGE}"
            )
            body = (
                "stored AS (INSERT INTO points (series_id, step, value, wall) "
                "SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::float8[], %s::float8[]){only_if} "
                "{on_conflict}RETURNING series_id, step), "
                "counted AS (SELECT count(*) AS n FROM stored), "
                f"merged AS (INSERT INTO rollups AS r ({_rollups.COLUMNS}) SELECT * FROM unnest({casts}) "
                f"WHERE (SELECT n FROM counted) = %s {_rollups.MERGE}) "
                "SELECT {project}n, CASE WHEN n < %s THEN (SELECT array_agg(series_id) FROM stored) END, "
                "CASE WHEN n < %s THEN (SELECT array_agg(step) FROM stored) END FROM counted"
            )
            self._insert_sql = "WITH " + body.format(only_if="", project="", on_conflict="ON CONFLICT DO NOTHING ")
            # The same, marking the run as seen first (``runs.touch_step_sql``, which the store
            # also runs alone): a batch of known series is then one statement. A missing run
            # stores nothing (its project id comes back NULL and the caller raises).
            touched = f"WITH touched AS ({touch_step_sql('%s')}), "
            only_if, project = " WHERE EXISTS (SELECT 1 FROM touched)", "(SELECT project_id FROM touched), "
            self._touch_insert_sql = touched + body.format(
                only_if=only_if, project=project, on_conflict="ON CONFLICT DO NOTHING "
            )
            # And without the conflict clause, for ``write_all_new``: a point stored already
            # fails the statement (unique_violation) and with it everything it did.
            self._touch_insert_all_sql = touched + body.format(only_if=only_if, project=project, on_conflict="")
        else:
            self._points = _MultiRow(
                "INSERT INTO points (series_id, step, value, wall)",
                4,
                "ON CONFLICT DO NOTHING",
                SQLITE_ROWS_PER_STATEMENT,
            )
            self._rollups = _MultiRow(
                f"INSERT INTO rollups AS r ({_rollups.COLUMNS})", 10, _rollups.MERGE, SQLITE_ROLLUPS_PER_STATEMENT
            )
            self._probe_sqls: dict[int, str] = {}

    def write(self, conn: Connection, items: list[tuple[int, SeriesBatch]]) -> list[tuple[int, SeriesBatch]]:
        """Store the points not stored yet (the first value sent for a step wins) and merge
        their rollups. Returns, per series, the points that were new."""
        items = [(sid, sb) for sid, sb in items if sb.steps]
        if not items:
            return []
        if self.postgres:
            return self._write_pg(conn, items, None)[1]
        raw = conn.connection.driver_connection  # the transaction SQLAlchemy began (BEGIN IMMEDIATE)
        new = self._write_sqlite(raw, items)
        rows = _rollups.batch_rows([(series_id, sb.steps, sb.values) for series_id, sb in new])
        if rows:
            self._rollups.run(raw, list(chain.from_iterable(rows)))
        return new

    def write_touching(
        self, conn: Connection, items: list[tuple[int, SeriesBatch]], touch: tuple
    ) -> tuple[int | None, list[tuple[int, SeriesBatch]]]:
        """PostgreSQL: ``write``, in the statement that marks the run as seen. ``touch`` is
        (last seen, last step, run id), ``items`` non-empty series; returns (the run's project
        id, the new points), or (None, []) when there is no such run (nothing stored)."""
        return self._write_pg(conn, [(sid, sb) for sid, sb in items if sb.steps], touch)

    def write_all_new(self, conn: Connection, items: list[tuple[int, SeriesBatch]], touch: tuple) -> int | None:
        """PostgreSQL, on a connection in autocommit: ``write_touching`` as one statement that
        is its own transaction, for a batch that must be new point for point. The run's project
        id (None: no such run, nothing stored); a point stored already fails the statement
        with a unique violation (``IntegrityError``, sqlstate 23505), which stored nothing.
        ``items``: non-empty series."""
        seen, last_step, run_id = touch
        params = self._params(items)
        project_id, count, _, _ = _driver_row(
            conn, self._touch_insert_all_sql, (seen, last_step, last_step, run_id, *params)
        )
        if project_id is not None and count != params[-1]:  # cannot happen
            raise RuntimeError(f"points stored ({count}) differ from the points sent, without a conflict")
        return project_id

    def _rollup_params(self, items: list[tuple[int, SeriesBatch]]) -> tuple:
        rows = _rollups.batch_rows([(series_id, sb.steps, sb.values) for series_id, sb in items])
        return tuple(pack(list(col)) for pack, col in zip(_PG_ROLLUP_PACKERS, zip(*rows)))

    def _params(self, items: list[tuple[int, SeriesBatch]]) -> tuple:
        """The points and rollups statement's parameters, after the run's (if any)."""
        steps: list[int] = []
        values: list[float] = []
        walls: list[float] = []
        for _, sb in items:
            steps.extend(sb.steps)
            values.extend(sb.values)
            walls.extend(sb.walls)
        n = len(steps)
        return (
            int8_runs([(series_id, len(sb.steps)) for series_id, sb in items]),
            int8_array(steps),
            float8_array(values, nan_is_null=True),
            float8_array(walls),
            *self._rollup_params(items),
            n,
            n,
            n,
        )

    def _write_pg(
        self, conn: Connection, items: list[tuple[int, SeriesBatch]], touch: tuple | None
    ) -> tuple[int | None, list[tuple[int, SeriesBatch]]]:
        params = self._params(items)
        n = params[-1]
        if touch is None:
            project_id = None
            count, stored_sids, stored_steps = _driver_row(conn, self._insert_sql, params)
        else:
            seen, last_step, run_id = touch
            project_id, count, stored_sids, stored_steps = _driver_row(
                conn, self._touch_insert_sql, (seen, last_step, last_step, run_id, *params)
            )
            if project_id is None:
                return None, []
        if count == n:
            return project_id, items  # all new: their rollups went in with them
        # Some were stored already (a resend, an overlap, another worker first): not new,
        # and the rollups of the points that were go in now.
        new = _only(items, set(zip(stored_sids or (), stored_steps or ())))
        if new:
            conn.exec_driver_sql(self._rollup_sql, self._rollup_params(new))
        return project_id, new

    def _write_sqlite(self, raw, items: list[tuple[int, SeriesBatch]]) -> list[tuple[int, SeriesBatch]]:
        if self._any_stored(raw, items):
            # A resend or an overlap: only the steps not stored yet go in (the first value
            # sent for a step wins), and only they are new.
            items = self._without_stored(raw, items)
        if items:
            flat = _point_params(items)
            stored = self._points.run(raw, flat)
            if stored != len(flat) // 4:  # cannot happen under BEGIN IMMEDIATE: say so, store nothing
                raise RuntimeError(
                    f"points stored ({stored}) differ from the points found new ({len(flat) // 4}): "
                    f"is the ingest transaction not BEGIN IMMEDIATE?"
                )
        return items

    def _probe_sql(self, series: int) -> str:
        sql = self._probe_sqls.get(series)
        if sql is None:
            sql = self._probe_sqls[series] = (
                f"SELECT 1 FROM (VALUES {', '.join(['(?, ?, ?)'] * series)}) AS r "
                "JOIN points p ON p.series_id = r.column1 AND p.step BETWEEN r.column2 AND r.column3 LIMIT 1"
            )
        return sql

    def _any_stored(self, raw, items: list[tuple[int, SeriesBatch]]) -> bool:
        """Whether any series of ``items`` holds a point in its batch's step range (steps
        already stored, for a resend or an overlap). One statement per 64 series."""
        per = SQLITE_SERIES_PER_PROBE
        for k in range(0, len(items), per):
            chunk = items[k : k + per]
            m = len(chunk) if len(chunk) == per else 1 << (len(chunk) - 1).bit_length()
            params: list[int] = []
            for series_id, sb in chunk:
                params += (series_id, min(sb.steps), max(sb.steps))
            params += params[-3:] * (m - len(chunk))  # padding: the last range again
            if raw.execute(self._probe_sql(m), params).fetchall():
                return True
        return False

    def _without_stored(self, raw, items: list[tuple[int, SeriesBatch]]) -> list[tuple[int, SeriesBatch]]:
        out = []
        for series_id, sb in items:
            have = {r[0] for r in raw.execute(self._existing_sql, (series_id, min(sb.steps), max(sb.steps)))}
            if not have:
                out.append((series_id, sb))
                continue
            keep = [i for i, s in enumerate(sb.steps) if s not in have]
            if keep:
                out.append((series_id, _keep(sb, keep)))
        return out
