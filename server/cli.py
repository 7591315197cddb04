"""``stethoscope server`` and ``stethoscope db ...`` (the hook's CLI dispatches here)."""

from __future__ import annotations

import argparse
import os
import sys


def _settings(db: str | None):
    from .settings import Settings

    return Settings(database_url=db) if db else Settings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stethoscope", description="Stethoscope server and database commands")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="run the service (applies migrations on start)")
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, or STETHOSCOPE_HOST)")
    s.add_argument("--port", type=int, default=None, help="port (default 8765, or STETHOSCOPE_PORT; 0 picks a free one)")
    s.add_argument("--db", default=None, help="database URL (default sqlite:///stethoscope.db, or STETHOSCOPE_DATABASE_URL)")
    s.add_argument("--workers", type=int, default=1, help="worker processes")
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log every request (costs ~10%% of ingest throughput)")
    d = sub.add_parser("db", help="database migrations")
    dsub = d.add_subparsers(dest="db_cmd", required=True)
    up = dsub.add_parser("upgrade", help="migrate to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    up.add_argument("--db", default=None)
    down = dsub.add_parser("downgrade", help="migrate down to a revision (default: base, i.e. empty)")
    down.add_argument("revision", nargs="?", default="base")
    down.add_argument("--db", default=None)
    cur = dsub.add_parser("current", help="print the applied revision")
    cur.add_argument("--db", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args.db)
        if args.cmd == "server":
            return _serve(settings, args)
    except ValueError as e:  # pydantic's ValidationError is a ValueError: a bad setting
        print(f"stethoscope: {e}", file=sys.stderr)
        return 2
    from . import migrate

    if args.db_cmd == "upgrade":
        migrate.upgrade(settings.database_url, args.revision)
    elif args.db_cmd == "downgrade":
        migrate.downgrade(settings.database_url, args.revision)
    print(f"{migrate.current(settings.database_url) or 'base (empty)'} (head: {migrate.head()})")
    return 0


def _serve(settings, args) -> int:
    import uvicorn

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    # Workers are separate processes: they read the settings from the environment.
    os.environ["STETHOSCOPE_DATABASE_URL"] = settings.database_url
    os.environ["STETHOSCOPE_HOST"] = settings.host
    os.environ["STETHOSCOPE_PORT"] = str(settings.port)
    print(f"stethoscope: serving on http://{settings.host}:{settings.port}  (database {settings.database_url})", flush=True)
    if args.workers > 1:
        uvicorn.run("stethoscope_server.app:create_app", factory=True, host=settings.host, port=settings.port, workers=args.workers, log_level=args.log_level, access_log=args.access_log)
    else:
        from .app import create_app

        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
