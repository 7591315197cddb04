"""Engine construction: the two databases we support and their connection settings."""

from __future__ import annotations

import select
import sqlite3

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from ..settings import Settings

#: Execution option that marks a connection as about to write (see ``_sqlite_begin``).
WRITE_OPTION = "stethoscope_write"


#: SQLite: WAL pages past which a commit checkpoints by itself (the background checkpoint
#: runs every ``CHECKPOINT_INTERVAL_S`` long before that), and the size the WAL file is cut
#: back to once checkpointed.
WAL_AUTOCHECKPOINT_PAGES = 16_384
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
CHECKPOINT_INTERVAL_S = 1.0


#: SQLite errors that say the file cannot be used now, as opposed to a bad statement (which
#: SQLite also reports as an OperationalError).
SQLITE_UNAVAILABLE = (
    "unable to open database file",
    "database is locked",
    "disk i/o error",
    "database or disk is full",
    "attempt to write a readonly database",
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or used right now (an outage, a
    restart, a full disk, a pool with no connection to give), not that a statement is wrong."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection within the pool's timeout
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        return str(orig).lower().startswith(SQLITE_UNAVAILABLE)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg ships with the server extra
        return False
    # psycopg's OperationalError: the connection failed or was lost (server down, restarting,
    # refusing connections, "terminating connection due to administrator command").
    return isinstance(orig, psycopg.OperationalError)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            # One file, many threads: a small pool of long-lived connections.
            pool_size=4,
            max_overflow=4,
            # The connection returned last is handed out next. SQLite drops a connection's
            # whole page cache when it begins a transaction after another connection wrote, so
            # writers (one at a time, ``Store.writing``) taking the pool's connections in turn
            # re-read every page they touch from the file at each batch; taking the last one
            # keeps its cache. benchmarks/ingest.py, 4 senders, against first-in-first-out in
            # the same run, two runs: 1.11x and 1.07x less server CPU per point (issue 18).
            pool_use_lifo=True,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every sqlite test
            # WAL lets readers run beside the writer; NORMAL sync in WAL keeps committed
            # transactions across an application crash (only an OS crash may lose the last ones).
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, see below
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA cache_size=-65536")
            # Checkpoints (copying the WAL into the database file) run in a background thread
            # of the worker (``checkpoint_wal``), not in whichever ingest commit crosses
            # SQLite's default 1,000-page mark: that commit would wait for the copy. This
            # mark is only the backstop should that thread fall behind.
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover
            # pysqlite's own transaction handling is off (isolation_level=None), so we say
            # BEGIN ourselves. A writing transaction asks for IMMEDIATE: it takes the write lock
            # up front, so two writers (threads or worker processes) queue on busy_timeout
            # instead of one failing with "database is locked" when it upgrades a read lock.
            if conn.get_execution_options().get(WRITE_OPTION):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("BEGIN")

        return engine
    engine = create_engine(url, pool_size=settings.pool_size, max_overflow=settings.pool_size, pool_pre_ping=True)
    _ping_when_spoken_to(engine.dialect)
    return engine


def make_null_engine(url: str) -> Engine:
    """An engine that holds no connection open (migrations, CLI)."""
    return create_engine(url, poolclass=NullPool)


def checkpoint_wal(engine: Engine) -> tuple[int, int, int]:
    """Copy committed WAL pages into an SQLite database file without blocking its writers
    (a PASSIVE checkpoint). Returns SQLite's (busy, WAL pages, pages checkpointed)."""
    raw = engine.raw_connection()
    try:
        # Outside any transaction (the pool's connections are in autocommit, see above):
        # a checkpoint cannot move past a snapshot its own connection holds.
        row = raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return tuple(row)
    finally:
        raw.close()


def _ping_when_spoken_to(dialect) -> None:
    """The pool's pre-ping, asked of the database only when an idle connection has heard from
    it. A backend that ends (``pg_terminate_backend``, a restart, ``idle_session_timeout``)
    first writes its FATAL error and closes the socket, so the socket of a connection that
    died while pooled reads ready; one that did not has nothing to say. A readable socket, a
    connection that is not idle or not OK, gets the real ``SELECT 1`` and SQLAlchemy's
    reconnect as before; the others skip its round trip (~30 us of the server's CPU a
    transaction measured bare, ~0.1 ms on an ingest request). A backend that dies after the
    check fails the statement as it did after a ping (``Store.ingest`` tries a batch once more
    on another connection when that happens before its commit)."""
    ping = dialect.do_ping

    def do_ping(dbapi_connection) -> bool:
        return True if _quiet(dbapi_connection) else ping(dbapi_connection)

    dialect.do_ping = do_ping


def _quiet(dbapi_connection) -> bool:
    """Whether a pooled psycopg connection is open, idle and has nothing waiting on its socket."""
    try:
        pgconn = dbapi_connection.pgconn
        # libpq's CONNECTION_OK and PQTRANS_IDLE (psycopg.pq.ConnStatus.OK, TransactionStatus.IDLE)
        if pgconn.status != 0 or pgconn.transaction_status != 0 or dbapi_connection.closed:
            return False
        poll = select.poll()
        poll.register(pgconn.socket, select.POLLIN | select.POLLPRI)
        return not poll.poll(0)  # readable, hung up or in error: something to read or nothing left
    except Exception:  # not a psycopg connection, or one that cannot say: ask the database
        return False
