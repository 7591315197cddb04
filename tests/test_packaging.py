"""The hook installs alone: importing it pulls in none of the server's dependencies."""

from __future__ import annotations

import subprocess
import sys

SERVER_DEPS = ("fastapi", "sqlalchemy", "pydantic", "plotly", "alembic", "uvicorn", "psycopg", "orjson")


def test_import_stethoscope_pulls_in_no_server_dependency():
    code = "import sys, stethoscope, stethoscope.wire; print(','.join(m for m in %r if m in sys.modules))" % (SERVER_DEPS,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import stethoscope imported {out}"


def test_wheel_ships_every_package_and_data_file(tmp_path):
    """A non-editable install must carry what the editable one finds in the tree."""
    from pathlib import Path
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("stethoscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    mapping = {"client": "stethoscope", "server": "stethoscope_server", "dashboard": "stethoscope_dashboard", "migrations": "stethoscope_server/migrations"}
    missing = []
    for folder, target in mapping.items():
        for path in (root / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in {".py", ".mako", ".html", ".js", ".css"}:
                if f"{target}/{path.relative_to(root / folder).as_posix()}" not in names:
                    missing.append(str(path.relative_to(root)))
    assert not missing, f"not in the wheel: {missing}"
