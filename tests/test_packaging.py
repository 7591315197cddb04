"""The hook installs alone: importing it pulls in none of the server's dependencies."""

from __future__ import annotations

import subprocess
import sys

SERVER_DEPS = ("fastapi", "sqlalchemy", "pydantic", "plotly", "alembic", "uvicorn", "psycopg", "orjson")


def test_import_stethoscope_pulls_in_no_server_dependency():
    code = "import sys, stethoscope, stethoscope.wire; print(','.join(m for m in %r if m in sys.modules))" % (SERVER_DEPS,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import stethoscope imported {out}"
