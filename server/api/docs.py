"""``/docs`` (Swagger UI) and ``/redoc`` served whole by the server: their scripts, styles and
icon come from the ``fastapi-offline`` package under ``/static/docs``, not from a CDN, so the
API's pages work on a machine with no network beyond the server (FastAPI's defaults load
them from jsdelivr and Google Fonts)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: Where the viewers' files are served; under /static/, which the gate leaves public.
DOCS_STATIC_URL = "/static/docs"


def _assets() -> Path:
    import fastapi_offline  # only for where its files lie

    return Path(fastapi_offline.__file__).parent / "static"


def mount_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect page, /redoc and their files (build the app with
    ``docs_url=None, redoc_url=None`` so that FastAPI's CDN-backed pages are not added)."""
    app.mount(DOCS_STATIC_URL, StaticFiles(directory=_assets()), name="docs-static")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{title} - API",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{DOCS_STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC_URL}/favicon.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title=f"{title} - API",
            redoc_js_url=f"{DOCS_STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )
