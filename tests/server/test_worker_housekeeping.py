"""What a worker does beside requests so that requests stay quick: SQLite's WAL is copied into
the database file by a background thread (not by whichever ingest commit crosses SQLite's
page mark), and the objects built at start-up are kept out of the garbage collector's scans."""

from __future__ import annotations

import gc
import sqlite3

import httpx
import pytest
from live_servers import wait_until

from stethoscope_server.store.db import WAL_AUTOCHECKPOINT_PAGES, checkpoint_wal, make_engine

POINTS = 2_000


def _ingest(base: str, run: str) -> None:
    assert httpx.put(f"{base}/api/v1/runs/{run}", json={"project": "p"}).status_code in (200, 201)
    body = {
        "series": [
            {"name": f"m/{k}", "steps": list(range(200)), "values": [k + i / 7 for i in range(200)]}
            for k in range(POINTS // 200)
        ]
    }
    r = httpx.post(f"{base}/api/v1/runs/{run}/points", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["inserted"] == POINTS, r.text


def _points_in_main_file(path: str) -> int:
    # immutable=1: SQLite reads the database file alone and ignores the WAL beside it, so
    # this counts only what has been checkpointed into the file.
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as conn:
        try:
            return conn.execute("SELECT count(*) FROM points").fetchone()[0]
        except sqlite3.DatabaseError:  # the table itself is still only in the WAL
            return 0


def test_sqlite_wal_is_checkpointed_in_the_background(live_server, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's write-ahead log")
    path = db_url.removeprefix("sqlite:///")
    _ingest(live_server.url, "wal")
    # Far below SQLite's own checkpoint mark (set high, as a backstop): only the worker's
    # checkpoint thread moves these points into the file.
    assert POINTS * 40 // 4096 < WAL_AUTOCHECKPOINT_PAGES
    wait_until(
        lambda: _points_in_main_file(path) == POINTS, timeout=20, what="points checkpointed into the database file"
    )
    metrics = httpx.get(f"{live_server.url}/metrics").text
    assert 'stethoscope_background_errors_total{job="sqlite-checkpoint"} 0' in metrics


def test_checkpoint_wal_copies_every_committed_page(settings, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's write-ahead log")
    from stethoscope_server.store import migrate

    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:  # a write the WAL holds and the file does not yet
            conn.exec_driver_sql("INSERT INTO projects (name, created_at) VALUES ('walled', '2026-01-01 00:00:00')")
        busy, wal_pages, copied = checkpoint_wal(engine)
        assert busy == 0 and wal_pages > 0 and wal_pages == copied
        with sqlite3.connect(f"file:{db_url.removeprefix('sqlite:///')}?immutable=1", uri=True) as raw:
            assert raw.execute("SELECT name FROM projects").fetchall() == [("walled",)]
    finally:
        engine.dispose()


def test_start_up_objects_are_frozen_while_the_worker_serves(settings):
    from live_servers import _ThreadServer, free_port

    from stethoscope_server.app import create_app

    assert gc.get_freeze_count() == 0
    port = free_port()
    with _ThreadServer(create_app(settings.model_copy(update={"port": port})), port):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        # Modules, routes, schemas, the engine: a full collection no longer scans them.
        assert gc.get_freeze_count() > 100_000
    assert gc.get_freeze_count() == 0
