"""Templates, the page security headers, and the static files (plotly.js included)."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import jinja2
import plotly
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
#: plotly.js's "cartesian" partial bundle (npm ``plotly.js-cartesian-dist-min``, MIT, kept in
#: vendor/ with its licence): every trace type the dashboard draws (scatter, heatmap) in
#: 1.5 MB instead of the 4.8 MB of the full plotly.min.js that the plotly package ships; the
#: browser parses and compiles a third of the code before the first chart. Its version is
#: the one the installed plotly package was built against (``plotly.js v4.1.1`` in its
#: plotly.min.js header), so the figures plotly.py builds mean the same to it.
PLOTLY_BUNDLE_VERSION = "4.1.1"
PLOTLY_JS = HERE / "vendor" / f"plotly-cartesian-{PLOTLY_BUNDLE_VERSION}.min.js"
if not PLOTLY_JS.exists():  # a tree without the vendored file: the full bundle still serves
    PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
#: The URL carries the bundle and its version, so browsers may keep the file for good.
PLOTLY_URL = f"/static/{PLOTLY_JS.name}"
STATIC_URL = "/static/dashboard"

#: No inline script and nothing from elsewhere: an injected <script> could not run even if
#: escaping failed. plotly.js adds <style> elements, hence 'unsafe-inline' for styles only.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

# Autoescape everything: every run name, config value and message is user text.
env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)
env.filters["tojson_pretty"] = lambda v: json.dumps(v, ensure_ascii=False, default=str)
env.globals.update(plotly_url=PLOTLY_URL, static_url=STATIC_URL)


def refuse_nul(request: Request) -> None:
    """Every dashboard route's dependency: a NUL character in a path or query parameter is a
    422. PostgreSQL's text cannot hold NUL (SQLite's can), so a run id, project or filter
    holding one made PostgreSQL fail the query with a 500; both databases now answer alike."""
    params = [("path", k, v) for k, v in request.path_params.items()]
    params += [("query", k, v) for k, v in request.query_params.multi_items()]
    for where, key, value in params:
        if isinstance(value, str) and "\x00" in value:
            raise HTTPException(422, detail=f"{where} parameter {key!r} must not contain a NUL character")


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    html = env.get_template(template).render(request=request, **context)
    return HTMLResponse(
        html,
        status_code=status_code,
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


class _PlotlyFile:
    """The plotly.js bundle, read and gzipped once (off the request path, at mount)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: bytes | None = None
        self._gz: bytes | None = None

    def get(self, gz: bool) -> bytes:
        with self._lock:
            if self._raw is None:
                self._raw = PLOTLY_JS.read_bytes()
                self._gz = gzip.compress(self._raw, compresslevel=6)
            return self._gz if gz else self._raw


_plotly = _PlotlyFile()


def mount_static(app: FastAPI) -> None:
    # Compress plotly.js now, off the request path: the first page view should not wait for it.
    threading.Thread(target=_plotly.get, args=(True,), name="stethoscope-plotly-gzip", daemon=True).start()
    app.mount(STATIC_URL, StaticFiles(directory=HERE / "static"), name="dashboard-static")

    @app.get(PLOTLY_URL, include_in_schema=False)
    def plotly_js(request: Request) -> Response:
        gz = "gzip" in request.headers.get("accept-encoding", "")
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "Vary": "Accept-Encoding"}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return Response(_plotly.get(gz), media_type="text/javascript", headers=headers)
