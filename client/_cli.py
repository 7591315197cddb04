"""The ``stethoscope`` command: ``sync`` here; ``server``, ``db`` and ``token`` belong to the server
extra, found through its ``stethoscope.commands`` entry points."""

from __future__ import annotations

import argparse
import os
import sys

SERVER_COMMANDS = ("server", "db", "token")
INSTALL_HINT = "stethoscope: this command needs the server extra: pip install 'stethoscope[server]'"
#: The entry-point group where the server extra names its commands (pyproject.toml): the hook
#: looks them up by name and never imports the server package itself.
COMMANDS_GROUP = "stethoscope.commands"
#: What a missing server extra looks like when a command's module is imported.
SERVER_EXTRA = ("stethoscope_server", "fastapi", "sqlalchemy", "uvicorn", "pydantic", "pydantic_settings", "alembic")


def _server_command(name: str):
    """The ``main(argv)`` that runs the server command ``name``; None without the server extra."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_GROUP, name=name):
        try:
            return ep.load()
        except ImportError as exc:
            if exc.name and exc.name.split(".")[0] in SERVER_EXTRA:
                return None
            raise
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVER_COMMANDS:
        server_main = _server_command(argv[0])
        if server_main is None:
            print(INSTALL_HINT, file=sys.stderr)
            return 2
        return server_main(argv)
    parser = argparse.ArgumentParser(prog="stethoscope", description="Training-health monitoring.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sync", help="upload runs spooled offline (or while the server was down)")
    p.add_argument(
        "path",
        nargs="?",
        default=None,
        help="a spool directory, a run's directory or the spool root (default: $STETHOSCOPE_DIR/spool)",
    )
    p.add_argument(
        "--server", default=os.environ.get("STETHOSCOPE_SERVER"), help="server URL (default: $STETHOSCOPE_SERVER)"
    )
    sub.add_parser("server", help="run the server (needs the server extra)")
    sub.add_parser("db", help="database migrations (needs the server extra)")
    sub.add_parser("token", help="API tokens: create, list, revoke (needs the server extra)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        from ._spool import default_root
        from ._sync import sync

        if not args.server:
            parser.error("sync needs --server URL (or STETHOSCOPE_SERVER)")
        path = args.path if args.path is not None else default_root()
        if not os.path.exists(path):
            print(f"stethoscope: nothing to sync: {path} does not exist", file=sys.stderr)
            return 0
        try:
            runs, points = sync(path, args.server)
        except (RuntimeError, ValueError) as exc:
            print(f"stethoscope: sync stopped: {exc} (run it again to resume)", file=sys.stderr)
            return 1
        print(f"stethoscope: synced {runs} run(s), {points} points to {args.server}", file=sys.stderr)
        return 0
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
