"""The packages' boundaries, read from the source: no loop between the hook, the server and the
dashboard (DESIGN.md, layout).

- The hook (``client/``) imports neither the server nor the dashboard: the server's commands of
  ``stethoscope`` are found through entry points.
- The dashboard imports of the server only the public names of ``stethoscope_server.store`` and
  ``stethoscope_server.auth``: it holds no SQL and reads through ``Store``.
- The server imports the dashboard in one place, its composition root ``app.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import stethoscope_server.auth
import stethoscope_server.store

ROOT = Path(__file__).resolve().parent.parent
#: The server's public names the dashboard may import, by module.
DASHBOARD_MAY_USE = {
    "stethoscope_server.store": set(stethoscope_server.store.__all__),
    "stethoscope_server.auth": set(stethoscope_server.auth.__all__),
}
#: The auth names the dashboard needs, pinned: widening this surface is a decision, not an accident.
AUTH_PUBLIC = {"COOKIE", "Denied", "same_origin", "visible_project", "visible_projects", "visible_runs"}


def _imports(folder: str) -> list[tuple[str, str, str | None]]:
    """``(file, module, name)`` for every absolute import in the folder's Python files, at any
    depth (inside functions too); ``name`` is None for ``import module``."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Import):
                out += [(rel, alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out += [(rel, node.module, alias.name) for alias in node.names]
    return out


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_hook_imports_neither_the_server_nor_the_dashboard():
    bad = [
        (f, m)
        for f, m, _ in _imports("client")
        if _under(m, "stethoscope_server") or _under(m, "stethoscope_dashboard")
    ]
    assert bad == []


def test_the_dashboard_uses_only_the_servers_public_surface():
    bad = []
    for f, m, name in _imports("dashboard"):
        if not _under(m, "stethoscope_server"):
            continue
        if name is None or name not in DASHBOARD_MAY_USE.get(m, set()):
            bad.append((f, m, name))
    assert bad == [], "the dashboard may import only these server names: " + repr(DASHBOARD_MAY_USE)


def test_the_auth_package_exports_exactly_what_the_dashboard_needs():
    assert set(stethoscope_server.auth.__all__) == AUTH_PUBLIC
    assert all(hasattr(stethoscope_server.auth, n) for n in AUTH_PUBLIC)


def test_only_the_composition_root_imports_the_dashboard():
    users = sorted({f for f, m, _ in _imports("server") if _under(m, "stethoscope_dashboard")})
    assert users == ["server/app.py"]


def test_the_cli_finds_the_server_commands_through_entry_points():
    from importlib.metadata import entry_points

    from stethoscope import _cli

    found = {ep.name: ep.value for ep in entry_points(group=_cli.COMMANDS_GROUP)}
    assert found == {c: "stethoscope_server.cli:main" for c in _cli.SERVER_COMMANDS}
