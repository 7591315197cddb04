"""The service's gate, one ASGI middleware in front of every route: request size, then (with
authentication on) the token, cross-site checks for the dashboard's cookie, the rate limit per
token, and the route's scope and project (``access.RULES``). It runs before a route reads its
body, so a request without a valid token costs neither a parse nor a database write.

    app.add_middleware(SecurityMiddleware, settings=settings)

A token comes in ``Authorization: Bearer <token>`` (the hook, scripts) or in the HttpOnly,
SameSite=Strict cookie the dashboard's login page sets. 401: no token, or one that is unknown
or revoked; 403: the token lacks the scope or the project, or a cookie-borne request that
changes something came from another site; 404: the run, alert, webhook or token named by its
id belongs to another project (as if it did not exist: ids are global); 408: the body did not
arrive in time; 413: the body is too large; 415/422: a body or id the routes would not read
either (``parsing``: the gate reads both exactly as the routes do); 429: the token is over its
rate, or the client address has failed to authenticate too often (``Retry-After`` says when).
The body is read only once the token has passed. With authentication off: the Host must be
this machine's and a state change must be JSON (``gate_io``).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from urllib.parse import parse_qs, quote, urlsplit

import anyio.to_thread
import orjson
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.requests import Request

from .. import parsing
from ..settings import Settings
from . import access, tokens
from .gate_io import Denied, allowed_hosts, check_host, has_body, read_body, replay, require_json
from .tokens import Principal

log = logging.getLogger("stethoscope.server")

#: The dashboard's login cookie (the token itself; HttpOnly, SameSite=Strict).
COOKIE = "stethoscope_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class TokenBuckets:
    """A token bucket per key: ``rate`` requests a second, up to ``burst`` at once.

    >>> b = TokenBuckets(rate=1.0, burst=2)
    >>> b.take(7, now=0.0), b.take(7, now=0.0), b.take(7, now=0.0) > 0
    (0.0, 0.0, True)
    """

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[object, tuple[float, float]] = {}
        self._lock = threading.Lock()
        #: Requests refused so far (for tests and logs).
        self.refused = 0

    def take(self, key, now: float | None = None) -> float:
        """0.0 when the request may go; else the seconds until it may."""
        now = self.clock() if now is None else now
        with self._lock:
            level, last = self._buckets.get(key, (float(self.burst), now))
            level = min(float(self.burst), level + (now - last) * self.rate)
            if level >= 1.0:
                self._buckets[key] = (level - 1.0, now)
                return 0.0
            self._buckets[key] = (level, now)
            self.refused += 1
            return (1.0 - level) / self.rate

    def wait(self, key, now: float | None = None) -> float:
        """Like ``take``, without taking: 0.0 when one more may go."""
        now = self.clock() if now is None else now
        with self._lock:
            level, last = self._buckets.get(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - last) * self.rate)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate


class Gate:
    """Authentication, rate limit and authorization; one per app (and so per worker)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.resolver = access.ProjectResolver()
        self.buckets = (
            TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
            if settings.rate_limit_per_s > 0
            else None
        )
        #: Failed authentications per client address (see ``attempt``).
        self.failures = (
            TokenBuckets(settings.auth_failures_per_s, settings.auth_failure_burst)
            if settings.auth_failures_per_s > 0
            else None
        )
        self.hosts = allowed_hosts(settings)
        self._principals: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    # -- tokens ------------------------------------------------------------------------
    def authenticate(self, store, token: str) -> Principal | None:
        """The token's principal (cached for ``token_cache_s``), or None if it is not valid."""
        key = tokens.hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._principals.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        principal = tokens.lookup(store, token)
        if principal is not None and self.settings.token_cache_s > 0:
            with self._lock:
                if len(self._principals) > 10_000:  # only valid tokens are cached, so this is rare
                    self._principals.clear()
                self._principals[key] = (now + self.settings.token_cache_s, principal)
        return principal

    def attempt(self, store, token: str, address: str | None) -> Principal | None:
        """``authenticate``, throttled per client address: past ``auth_failure_burst`` failed
        tries, 429 until the bucket refills, without looking at the token (a guess that would
        have been right must not show as anything but the refusal). A token this worker has
        seen valid lately passes: a busy client behind the same address is not locked out."""
        principal = self.cached(token)
        if principal is not None or self.failures is None:
            return principal or self.authenticate(store, token)
        wait = self.failures.wait(address)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise Denied(
                429,
                f"too many failed authentications from {address}: retry after {retry} s "
                f"(STETHOSCOPE_AUTH_FAILURES_PER_S)",
                {"Retry-After": str(retry)},
            )
        principal = self.authenticate(store, token)
        if principal is None:
            self.failures.take(address)
        return principal

    def cached(self, token: str) -> Principal | None:
        hit = self._principals.get(tokens.hash_token(token))
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def forget(self, token_id: int) -> None:
        """A token was revoked through this worker: stop trusting it here at once."""
        with self._lock:
            self._principals = {k: v for k, v in self._principals.items() if v[1].token_id != token_id}

    # -- projects ----------------------------------------------------------------------
    def targets(
        self, store, rule: access.Rule, params: dict, query: dict[str, list[str]], body: bytes | None
    ) -> list[tuple[str, object, object]]:
        """(kind, name, project) of each thing the request names; a None project: no such
        thing (the route answers 404, or creates it). Ids are read by ``parsing.parse_id``,
        the routes' own reader: an id the gate cannot read is refused, never waved through."""
        t = rule.target
        out: list[tuple[str, object, object]] = []
        if t in (access.QUERY, access.COMPARE) and query.get("project"):
            out.append((access.PROJECT, query["project"][0], query["project"][0]))
        if t == access.PROJECT:
            out.append((access.PROJECT, params["project"], params["project"]))
        elif t == access.TOKEN_BODY:
            project = body_project(body, default=None)
            out.append((access.TOKEN_BODY, project, access.GLOBAL if project is None else project))
        elif t == access.RUN_BODY:
            project = body_project(body, default="default")  # RunCreate's default
            out.append((access.PROJECT, project, project))
        runs = (
            [params["run_id"]]
            if t in (access.RUN, access.RUN_BODY)
            else [r for r in query.get("run", []) if r]
            if t == access.COMPARE
            else []
        )
        for run_id in runs:
            if "\x00" in run_id:  # PostgreSQL cannot even compare it: a 500 there, not a 404
                raise Denied(422, f"run id {run_id!r} holds a NUL character, which no run id may contain")
        kind = access.RUN if t == access.RUN_BODY else t
        missing = []
        for run_id in runs:
            project = self.resolver.cached_run(run_id)
            if project is None:
                missing.append(run_id)
            else:
                out.append((kind, run_id, project))
        thing = None
        if t in access.ID_MAX:
            name = f"{t}_id"
            raw = params.get(name)
            try:
                thing = parsing.parse_id(raw, access.ID_MAX[t])
            except ValueError as e:
                raise Denied(422, parsing.id_invalid("path", name, raw, e)) from None
        if missing:
            projects = self.resolver.runs(store, missing)
            out += [(kind, run_id, projects[run_id]) for run_id in missing]
        if thing is not None:
            out.append((t, thing, getattr(self.resolver, t)(store, thing)))
        return out


def body_project(body: bytes | None, default: str | None) -> str | None:
    """The body's ``project``, read as the route reads it; a body the gate cannot read, or a
    ``project`` that is not a name, is refused here: never taken for the default project."""
    try:
        doc = parsing.strict_json(body or b"")
    except parsing.BadJSON as e:
        raise Denied(422, parsing.json_invalid(e)) from None
    if not isinstance(doc, dict):
        raise Denied(422, "the body must be a JSON object")
    project = doc.get("project", default)
    if project is None and default is None:
        return None
    if not isinstance(project, str):
        raise Denied(422, f"'project' must be a project's name (a string), not {orjson.dumps(project).decode()[:60]}")
    return project


def authorize(principal: Principal, targets, rule: access.Rule, method: str, route_path: str) -> set[str]:
    """Refuse what the token may not touch. A thing of another project named by its id is
    answered as the route answers for one that does not exist (ids are global: a 403 would
    tell that it exists, and where); a project named outright is refused with a 403. Returns
    the runs of other projects a comparison named: the compare routes skip them as they skip
    runs that do not exist (``visible_runs``)."""
    limited = f"token {principal.name!r} is limited to project {principal.project!r}"
    hidden: set[str] = set()
    for kind, name, project in targets:
        if kind == access.COMPARE and project is None and principal.project is not None:
            hidden.add(name)  # a run that does not exist: left out the same way
        if project is None or principal.project is None or project == principal.project:
            continue
        if kind == access.COMPARE:
            hidden.add(name)
            continue
        if kind == access.TOKEN_BODY:
            if project is access.GLOBAL:
                raise Denied(
                    403,
                    f'{limited}, so the tokens it makes are for that project too: send "project": '
                    f"{principal.project!r} (a token for every project needs an admin token for every project)",
                )
            raise Denied(403, f"{limited}, so it makes tokens for that project only, not for project {project!r}")
        if kind == access.PROJECT:
            raise Denied(403, f"{limited}; not project {name!r}")
        if rule.target == access.RUN_BODY:  # PUT creates: the id is taken, whoever asks
            raise Denied(
                409,
                f"run id {name!r} is taken by a run of another project: run ids are shared by every "
                f"project, so choose another",
            )
        if rule.page and kind == access.RUN:
            # A page answers a missing run with its own HTML 404: it answers this one with
            # that very page (``visible_runs``), so the two replies are the same bytes.
            hidden.add(name)
            continue
        raise Denied(404, access.not_found(kind, name, method, route_path))
    return hidden


def principal_of(request: Request) -> Principal | None:
    """The token the request came with (None: authentication is off)."""
    return getattr(request.state, "principal", None)


def visible_project(request: Request, project: str | None) -> str | None:
    """The project filter a listing must use: the token's own project, if it has one (the gate
    has already refused a request naming another)."""
    p = principal_of(request)
    return project if p is None or p.project is None else p.project


def visible_projects(request: Request, projects: list[dict]) -> list[dict]:
    p = principal_of(request)
    return projects if p is None or p.project is None else [x for x in projects if x["name"] == p.project]


def visible_runs(request: Request, runs: list[str]) -> list[str]:
    """The runs a comparison or a page may show: those the gate found in another project are
    left out, exactly as runs that do not exist are (a 403 would tell that the run exists)."""
    hidden = getattr(request.state, "hidden_runs", ())
    return [r for r in runs if r and r not in hidden]


def token_from(headers: Headers) -> tuple[str | None, bool]:
    """(token, came in the cookie). A malformed Authorization header is a 401."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Denied(401, "the Authorization header must be 'Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        return value.strip(), False
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value, True
    return None, False


def same_origin(headers: Headers) -> bool:
    """A browser names the page's origin in every POST/PUT/PATCH/DELETE it sends; it must be
    this server. (The SameSite=Strict cookie already stays home; this is the second lock.)"""
    origin = headers.get("origin")
    if not origin or origin == "null":
        return headers.get("sec-fetch-site") == "same-origin"
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


#: Where in the request's scope state the gate leaves the body it read.
BODY_KEY = "stethoscope.body"


def body_read(scope) -> bytes | None:
    """The body the gate read for this request, or None if it read none."""
    state = scope.get("state")
    return state.get(BODY_KEY) if state is not None else None


class SecurityMiddleware:
    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.gate = Gate(settings)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan
        if scope["type"] == "websocket":  # none are served; refuse rather than pass one ungated
            return await send({"type": "websocket.close", "code": 1008})
        scope.setdefault("state", {})["gate"] = self.gate
        scope["app"].state.gate = self.gate  # for the operator's eyes (and the tests): refusals so far
        read = [False]  # whether the gate has read the body
        try:
            receive = await self._checked(scope, receive, read)
        except Denied as d:
            if not read[0] and has_body(Headers(scope=scope)):
                d.headers.setdefault("Connection", "close")  # its body is not read: do not wait for it
            return await _deny(scope, send, d)
        await self.app(scope, receive, send)

    async def _body(self, scope, receive, read: list) -> bytes:
        read[0] = True
        body = await read_body(receive, self.settings.max_body_bytes, self.settings.body_timeout_s)
        # The very bytes the gate read, for a route that takes them as they are (``body_read``)
        # instead of through the replayed ``receive``.
        scope["state"][BODY_KEY] = body
        return body

    async def _checked(self, scope, receive, read: list):
        """The request's ``receive`` once it may go on (its body read, within the limits, and
        replayed), or Denied. The token is checked before any of the body is read."""
        s = self.settings
        headers = Headers(scope=scope)
        method = scope["method"]
        path = get_route_path(scope)  # the path as the routes see it (root_path taken off alike)
        if "\x00" in path:  # no name or id holds one (PostgreSQL cannot even compare it)
            raise Denied(
                422, "the path holds a NUL character, which no run id, project name or other path parameter may contain"
            )
        limit = s.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise Denied(
                413, f"body of {declared} bytes is larger than the limit of {limit} bytes (STETHOSCOPE_MAX_BODY_BYTES)"
            )
        unsafe = method in UNSAFE_METHODS
        if not s.auth_enabled:
            check_host(headers.get("host"), self.gate.hosts)
            if unsafe and (method, path) not in access.FORMS:
                require_json(method, headers.get("content-type"))
            return replay(await self._body(scope, receive, read), receive) if unsafe else receive
        app = scope["app"]
        route_path, rule, params = access.match(method, path)
        if rule is not None and rule.scope is None:
            return replay(await self._body(scope, receive, read), receive) if unsafe else receive
        if rule is None:  # fail closed: no such route, or a route nobody gave a rule
            raise Denied(
                403, f"{method} {path} has no access rule (no such route?), so it is refused while authentication is on"
            )
        what = f"{method} {route_path}"
        token, via_cookie = token_from(headers)
        if token is None:
            if rule.page:
                raise _login_redirect(scope)
            raise Denied(
                401,
                "authentication required: send 'Authorization: Bearer <token>' (the hook reads "
                "STETHOSCOPE_TOKEN) or log in at /login",
                {"WWW-Authenticate": "Bearer"},
            )
        store = app.state.store
        address = (scope.get("client") or (None,))[0]
        principal = self.gate.cached(token) or await anyio.to_thread.run_sync(self.gate.attempt, store, token, address)
        if principal is None:
            if rule.page:
                raise _login_redirect(scope)
            raise Denied(
                401, "the token is not valid: unknown or revoked", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        if via_cookie and unsafe and not same_origin(headers):
            raise Denied(
                403,
                "cross-site request refused: the dashboard's login cookie only works from the dashboard's own pages",
            )
        if self.gate.buckets is not None:
            wait = self.gate.buckets.take(principal.token_id)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                raise Denied(
                    429,
                    f"rate limit of {s.rate_limit_per_s:g} requests/s (burst {s.rate_limit_burst}) for token "
                    f"{principal.name!r} exceeded: retry after {retry} s",
                    {"Retry-After": str(retry)},
                )
        if not principal.has_scope(rule.scope):
            raise Denied(
                403,
                f"token {principal.name!r} has scope(s) {', '.join(sorted(principal.scopes)) or 'none'}; "
                f"{what} needs {rule.scope!r}",
            )
        if rule.needs_body:
            require_json(method, headers.get("content-type"))  # the route reads no other body
        body = await self._body(scope, receive, read) if unsafe else None
        if rule.target != access.NONE:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            known = self.gate.resolver.cached_run(params["run_id"]) if rule.target == access.RUN else None
            if known is not None:  # the ingest path: no thread hop, no query
                targets = [(access.RUN, params["run_id"], known)]
            else:
                targets = await anyio.to_thread.run_sync(self.gate.targets, store, rule, params, query, body)
            scope["state"]["hidden_runs"] = authorize(principal, targets, rule, method, route_path)
        scope["state"]["principal"] = principal
        return replay(body, receive)


def _login_redirect(scope) -> Denied:
    path = scope.get("path", "/")
    qs = scope.get("query_string", b"").decode("latin-1")
    target = path + ("?" + qs if qs else "")
    return Denied(303, "log in first", {"Location": "/login?next=" + quote(target, safe="")})


async def _deny(scope, send, d: Denied) -> None:
    body = orjson.dumps({"detail": d.detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in d.headers.items()]
    if d.status == 303 and scope.get("method") == "HEAD":
        body = b""
    await send({"type": "http.response.start", "status": d.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def on_start(store, settings: Settings) -> None:
    """At each worker's start, with authentication on: make sure an admin can get in (see
    ``store.tokens.bootstrap_admin``); a generated admin token is printed here, once."""
    store.max_series_per_run = settings.max_series_per_run
    if not settings.auth_enabled:
        log.info("authentication is off (STETHOSCOPE_AUTH=on to require tokens)")
        return
    given = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    token = store.tokens.bootstrap_admin(given)
    if token is not None:
        # Printed, not only logged: whoever starts the server the first time must see it.
        print(
            "stethoscope: authentication is on. Admin token (shown this once, stored only as a hash):"
            f"\n\n    {token}\n\n"
            f"stethoscope: make project tokens with it (POST /api/v1/tokens) or with `stethoscope token create`.",
            file=sys.stderr,
            flush=True,
        )
