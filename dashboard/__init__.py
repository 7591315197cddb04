"""The web dashboard: runs overview, run pages, alerts, compare, project settings.

Mount it on the service's app::

    from stethoscope_dashboard import mount
    mount(app)   # pages at /, JSON for the charts at /ui/api, static files at /static

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
