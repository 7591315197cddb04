"""The login page: a token typed once, kept in an HttpOnly, SameSite=Strict cookie.

The cookie holds the token itself (no server-side session to share between workers). The
browser sends it only on requests from the dashboard's own pages (SameSite=Strict), page
scripts cannot read it (HttpOnly), and the gate also checks the Origin of every request that
changes something (``stethoscope_server.auth``). Logging out clears it; revoking the token
ends every login made with it.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from stethoscope_server.auth import COOKIE, Denied, same_origin

from ._web import render

router = APIRouter(include_in_schema=False)

#: How long a login lasts, in seconds (a week); the token's revocation ends it sooner.
LOGIN_MAX_AGE_S = 7 * 24 * 3600


def safe_next(target: str | None) -> str:
    """Only a path on this server: never ``//elsewhere`` or ``https://elsewhere``."""
    if not target or not target.startswith("/") or target.startswith("//") or target.startswith("/\\"):
        return "/"
    return target


@router.get("/login")
def login_page(request: Request, next: str = "/"):  # noqa: A002 - the query parameter's name
    if not request.app.state.settings.auth_enabled:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", next=safe_next(next), error=None, page="login")


def _refused(request: Request, target: str, status: int, error: str):
    """The login page again, with why the login was refused."""
    return render(request, "login.html", status_code=status, next=target, page="login", error=error)


@router.post("/login")
async def login(request: Request):
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    target = safe_next(form.get("next", ["/"])[0])
    if not request.app.state.settings.auth_enabled:
        return RedirectResponse(target, status_code=303)
    if not same_origin(request.headers) and request.headers.get("origin") is not None:
        # Login CSRF: another site must not log a visitor in with a token of its choosing.
        return _refused(request, target, 403, "This login form was sent from another site; log in from this page.")
    token = form.get("token", [""])[0].strip()
    gate = request.state.gate
    address = request.client.host if request.client else None
    try:  # throttled per address like every other token check (STETHOSCOPE_AUTH_FAILURES_PER_S)
        principal = await run_in_threadpool(gate.attempt, request.app.state.store, token, address) if token else None
    except Denied as d:
        resp = _refused(
            request,
            target,
            d.status,
            f"Too many failed logins from this address: try again in {d.headers['Retry-After']} s.",
        )
        resp.headers.update(d.headers)
        return resp
    if principal is None:
        return _refused(request, target, 401, "That token is not valid: it is unknown or revoked.")
    if not principal.has_scope("read"):
        return _refused(
            request,
            target,
            403,
            f"Token {principal.name!r} cannot read (scopes: {', '.join(sorted(principal.scopes))}); "
            f"the dashboard needs a token with the read or admin scope.",
        )
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(
        COOKIE,
        token,
        max_age=LOGIN_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return resp


@router.post("/logout")
def logout(request: Request):
    resp = RedirectResponse("/login" if request.app.state.settings.auth_enabled else "/", status_code=303)
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp
