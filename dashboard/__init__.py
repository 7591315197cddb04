"""The web dashboard: runs overview, run pages, alerts, compare, project settings.

The service's app factory (``stethoscope_server.app.create_app``, the one composition root)
includes it with one call::

    from stethoscope_dashboard import mount
    mount(app)   # pages at /, JSON for the charts at /ui/api, static files at /static

What the dashboard reads is handed to it on the app: ``app.state.store`` (a
``stethoscope_server.store.Store``; every read goes through its public methods and
``Store.overview``), ``app.state.settings.auth_enabled``, and per request the gate
(``request.state.gate``) with the names ``stethoscope_server.auth`` exports (login cookie,
same-origin check, visible projects). It imports nothing else of the server
(``tests/test_boundaries.py``), and the server imports it nowhere but in ``create_app``.

Figures are built in Python with plotly and drawn by plotly.js, which the server itself serves
from the installed plotly package: the dashboard works with no network beyond the server.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

__all__ = ["mount"]


def mount(app: FastAPI) -> None:
    """Add the dashboard's pages, chart data and static files to ``app``."""
    from . import _data, _login, _pages, _web

    _web.mount_static(app)
    checked = [Depends(_web.refuse_nul)]
    app.include_router(_login.router, dependencies=checked)
    app.include_router(_data.router, dependencies=checked)
    app.include_router(_pages.router, dependencies=checked)
