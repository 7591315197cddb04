"""The hook installs alone: importing it pulls in none of the server's dependencies."""

from __future__ import annotations

import subprocess
import sys

SERVER_DEPS = ("fastapi", "sqlalchemy", "pydantic", "plotly", "alembic", "uvicorn", "psycopg", "orjson")


def test_import_stethoscope_pulls_in_no_server_dependency():
    code = "import sys, stethoscope, stethoscope.core.wire; print(','.join(m for m in %r if m in sys.modules))" % (
        SERVER_DEPS,
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import stethoscope imported {out}"


HOOK_INTERNALS = (
    "stethoscope._sender",
    "stethoscope._batch",
    "stethoscope._watch",
    "stethoscope._spool",
    "stethoscope._transport",
    "stethoscope._monitor",
    "torch",
)


def _loaded_after(imports: str, names: tuple[str, ...]) -> list[str]:
    code = f"import sys; {imports}; print(','.join(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_the_shared_core_imports_nothing_heavy():
    """``stethoscope.core`` (wire format, detectors) is what the hook and the server share: it
    loads neither a server dependency nor torch nor the hook's sender, spool and transport."""
    assert _loaded_after("import stethoscope.core.wire, stethoscope.core.detectors", SERVER_DEPS + HOOK_INTERNALS) == []


def test_the_server_does_not_load_the_hook():
    """The server and the dashboard use the shared core only (their version comes from the
    package's metadata, not from the hook)."""
    assert (
        _loaded_after("import stethoscope_server.app, stethoscope_dashboard, stethoscope_server.cli", HOOK_INTERNALS)
        == []
    )


def test_the_hook_loads_on_first_use():
    """``stethoscope.attach`` still works as before; it is imported when first asked for."""
    code = (
        "import sys, stethoscope; assert 'stethoscope._sender' not in sys.modules; "
        "assert callable(stethoscope.attach); print('stethoscope._sender' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"


def test_wheel_ships_every_package_and_data_file(tmp_path):
    """A non-editable install must carry what the editable one finds in the tree."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("stethoscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    mapping = {
        "client": "stethoscope",
        "server": "stethoscope_server",
        "dashboard": "stethoscope_dashboard",
        "migrations": "stethoscope_server/migrations",
    }
    missing = []
    for folder, target in mapping.items():
        for path in (root / folder).rglob("*"):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and path.suffix in {".py", ".mako", ".html", ".js", ".css"}
            ):
                if f"{target}/{path.relative_to(root / folder).as_posix()}" not in names:
                    missing.append(str(path.relative_to(root)))
    assert not missing, f"not in the wheel: {missing}"
