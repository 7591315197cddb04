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
    s.add_argument(
        "--port", type=int, default=None, help="port (default 8765, or STETHOSCOPE_PORT; 0 picks a free one)"
    )
    s.add_argument(
        "--db", default=None, help="database URL (default sqlite:///stethoscope.db, or STETHOSCOPE_DATABASE_URL)"
    )
    s.add_argument("--workers", type=int, default=1, help="worker processes")
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log every request (costs ~10%% of ingest throughput)")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow serving without authentication on a non-loopback address (a trusted network only)",
    )
    t = sub.add_parser("token", help="API tokens: create, list, revoke (works on the database directly)")
    tsub = t.add_subparsers(dest="token_cmd", required=True)
    tc = tsub.add_parser("create", help="make a token and print it (shown this once)")
    tc.add_argument("--project", default=None, help="the token's project (default: every project)")
    tc.add_argument("--scopes", required=True, help="comma-separated: ingest, read, admin")
    tc.add_argument("--name", default=None, help="what the token is for (default: project and scopes)")
    tc.add_argument("--db", default=None)
    tl = tsub.add_parser("list", help="list tokens (never the tokens themselves)")
    tl.add_argument("--project", default=None)
    tl.add_argument("--db", default=None)
    tr = tsub.add_parser("revoke", help="revoke a token by id")
    tr.add_argument("id", type=int)
    tr.add_argument("--db", default=None)
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
        if args.cmd == "token":
            return _token(settings, args)
    except ValueError as e:  # pydantic's ValidationError is a ValueError: a bad setting
        print(f"stethoscope: {e}", file=sys.stderr)
        return 2
    from .store import migrate

    if args.db_cmd == "upgrade":
        migrate.upgrade(settings.database_url, args.revision)
    elif args.db_cmd == "downgrade":
        migrate.downgrade(settings.database_url, args.revision)
    print(f"{migrate.current(settings.database_url) or 'base (empty)'} (head: {migrate.head()})")
    return 0


def _serve(settings, args) -> int:
    import uvicorn

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.insecure:
        updates["insecure"] = True
    settings = settings.model_copy(update=updates)
    settings.check_exposure()  # a ValueError: exit 2 with the reason, before anything binds
    if settings.insecure:
        os.environ["STETHOSCOPE_INSECURE"] = "1"
    # Workers are separate processes: they read the settings from the environment.
    os.environ["STETHOSCOPE_DATABASE_URL"] = settings.database_url
    os.environ["STETHOSCOPE_HOST"] = settings.host
    os.environ["STETHOSCOPE_PORT"] = str(settings.port)
    auth = "on" if settings.auth_enabled else "off"
    print(
        f"stethoscope: serving on http://{settings.host}:{settings.port}  (database {settings.database_url}; "
        f"authentication {auth})",
        flush=True,
    )
    if args.workers > 1:
        uvicorn.run(
            "stethoscope_server.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=args.workers,
            log_level=args.log_level,
            access_log=args.access_log,
        )
    else:
        from .app import create_app

        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            access_log=args.access_log,
        )
    return 0


def _token(settings, args) -> int:
    from .store import NotFound, Store, migrate
    from .store.db import make_null_engine

    migrate.upgrade(settings.database_url)  # a first command on a fresh database works too
    engine = make_null_engine(settings.database_url)
    tokens = Store(engine).tokens
    try:
        if args.token_cmd == "create":
            scopes = [x.strip() for x in args.scopes.split(",") if x.strip()]
            name = args.name or f"{args.project or 'all projects'}: {','.join(scopes)}"
            token, row = tokens.create(name, args.project, scopes)
            print(
                f"token {row['id']} ({row['name']}; project {row['project'] or '*'}; "
                f"scopes {','.join(row['scopes'])}). Shown this once, stored only as a hash:",
                file=sys.stderr,
            )
            print(token)
        elif args.token_cmd == "list":
            print(f"{'id':>4}  {'project':<20} {'scopes':<18} {'created':<20} {'revoked':<20} name")
            for r in tokens.list(args.project):
                revoked = r["revoked_at"].strftime("%Y-%m-%d %H:%M:%S") if r["revoked_at"] else "-"
                print(
                    f"{r['id']:>4}  {r['project'] or '*':<20} {','.join(r['scopes']):<18} "
                    f"{r['created_at'].strftime('%Y-%m-%d %H:%M:%S'):<20} {revoked:<20} {r['name']}"
                )
        elif args.token_cmd == "revoke":
            try:
                row = tokens.revoke(args.id)
            except NotFound as e:
                print(f"stethoscope: {e}", file=sys.stderr)
                return 1
            print(
                f"token {row['id']} ({row['name']}) revoked; running servers stop accepting it within "
                f"STETHOSCOPE_TOKEN_CACHE_S ({settings.token_cache_s:g} s)",
                file=sys.stderr,
            )
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
