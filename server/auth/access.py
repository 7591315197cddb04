"""Who may call what: the access rule of every route, and how a request's project is found.

Every route of the app has a rule here or is public; with authentication on, a route that has
neither is refused (``tests/server/test_auth_routes.py`` walks the app's routes to keep this
table complete). A rule names the scope a token needs and where the request's project comes
from: a run id, a project name, an alert, a webhook, a token, the query or the body.

    ingest  create/resume runs (PUT, PATCH), post points and events, in its project
    read    every GET of its project: runs, series, events, alerts, detector settings, pages
    admin   everything: detector settings, webhooks, tokens, acknowledging alerts
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from starlette.routing import compile_path

from ..parsing import ALERT_ID_MAX, TOKEN_ID_MAX, WEBHOOK_ID_MAX

API = "/api/v1"

#: Where the project of a request comes from.
NONE = "none"  # no project: any valid token with the scope (e.g. /metrics)
RUN = "run"  # the {run_id} in the path
PROJECT = "project"  # the {project} in the path
ALERT = "alert"
WEBHOOK = "webhook"
TOKEN = "token"
QUERY = "query"  # ?project= when given; without it the route shows only what the token may see
COMPARE = "compare"  # ?project= and every ?run=
RUN_BODY = "run_body"  # PUT /runs/{run_id}: the body's project, and the run's if it exists
TOKEN_BODY = "token_body"  # POST /tokens: the body's project (none: a token for every project)

#: A project only a token for every project may act on (a global token).
GLOBAL = object()

#: Targets named by a numeric id in the path, and the largest id of each (as the routes take it).
ID_MAX = {ALERT: ALERT_ID_MAX, WEBHOOK: WEBHOOK_ID_MAX, TOKEN: TOKEN_ID_MAX}

#: Public routes that take an HTML form (with authentication off they change nothing).
FORMS = frozenset({("POST", "/login"), ("POST", "/logout")})


@dataclass(frozen=True, slots=True)
class Rule:
    scope: str | None  # None: public
    target: str = NONE
    #: An HTML page: without a token the browser is sent to the login page, not given a 401.
    page: bool = False

    @property
    def needs_body(self) -> bool:
        return self.target in (RUN_BODY, TOKEN_BODY)


PUBLIC = Rule(None)

#: (method, route path) -> rule. HEAD follows GET. Mounts (static files) are listed by path.
RULES: dict[tuple[str, str], Rule] = {
    # public: liveness, readiness, the schema and its viewers, the login page (and /static/...)
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/login"): PUBLIC,
    ("POST", "/login"): PUBLIC,
    ("POST", "/logout"): PUBLIC,
    # the server's own counters: no project's data, but not for anyone on the network
    ("GET", "/metrics"): Rule("read"),
    # runs
    ("GET", f"{API}/projects"): Rule("read", QUERY),
    ("GET", f"{API}/runs"): Rule("read", QUERY),
    ("PUT", f"{API}/runs/{{run_id}}"): Rule("ingest", RUN_BODY),
    ("PATCH", f"{API}/runs/{{run_id}}"): Rule("ingest", RUN),
    ("GET", f"{API}/runs/{{run_id}}"): Rule("read", RUN),
    ("POST", f"{API}/runs/{{run_id}}/points"): Rule("ingest", RUN),
    ("GET", f"{API}/runs/{{run_id}}/series"): Rule("read", RUN),
    ("GET", f"{API}/runs/{{run_id}}/series/{{name:path}}"): Rule("read", RUN),
    ("POST", f"{API}/runs/{{run_id}}/events"): Rule("ingest", RUN),
    ("GET", f"{API}/runs/{{run_id}}/events"): Rule("read", RUN),
    ("GET", f"{API}/runs/{{run_id}}/continual"): Rule("read", RUN),
    # alerts and detector settings
    ("GET", f"{API}/runs/{{run_id}}/alerts"): Rule("read", RUN),
    ("GET", f"{API}/runs/{{run_id}}/incidents"): Rule("read", RUN),
    ("GET", f"{API}/projects/{{project}}/alerts"): Rule("read", PROJECT),
    ("POST", f"{API}/alerts/{{alert_id}}/ack"): Rule("admin", ALERT),
    ("GET", f"{API}/projects/{{project}}/detectors"): Rule("read", PROJECT),
    ("PUT", f"{API}/projects/{{project}}/detectors"): Rule("admin", PROJECT),
    # webhooks: their URLs are secrets too (a Slack URL is its own credential)
    ("GET", f"{API}/projects/{{project}}/webhooks"): Rule("admin", PROJECT),
    ("POST", f"{API}/projects/{{project}}/webhooks"): Rule("admin", PROJECT),
    ("DELETE", f"{API}/webhooks/{{webhook_id}}"): Rule("admin", WEBHOOK),
    ("PATCH", f"{API}/webhooks/{{webhook_id}}"): Rule("admin", WEBHOOK),
    ("POST", f"{API}/webhooks/{{webhook_id}}/test"): Rule("admin", WEBHOOK),
    ("GET", f"{API}/webhooks/{{webhook_id}}/deliveries"): Rule("admin", WEBHOOK),
    # tokens
    ("POST", f"{API}/tokens"): Rule("admin", TOKEN_BODY),
    ("GET", f"{API}/tokens"): Rule("admin", QUERY),
    ("DELETE", f"{API}/tokens/{{token_id}}"): Rule("admin", TOKEN),
    # the dashboard: pages and the JSON their charts load
    ("GET", "/"): Rule("read", QUERY, page=True),
    ("GET", "/runs/{run_id}"): Rule("read", RUN, page=True),
    ("GET", "/alerts"): Rule("read", QUERY, page=True),
    ("GET", "/compare"): Rule("read", COMPARE, page=True),
    ("GET", "/projects/{project}/settings"): Rule("read", PROJECT, page=True),
    ("GET", "/ui/api/runs/{run_id}/panels"): Rule("read", RUN),
    ("GET", "/ui/api/runs/{run_id}/state"): Rule("read", RUN),
    ("GET", "/ui/api/compare"): Rule("read", COMPARE),
    ("GET", "/settings"): Rule("read", QUERY, page=True),
    # the one poll of each page: its tables and lists, and a run's chart state
    ("GET", "/ui/api/live/runs/{run_id}"): Rule("read", RUN),
    ("GET", "/ui/api/live/overview"): Rule("read", QUERY),
    ("GET", "/ui/api/live/alerts"): Rule("read", QUERY),
}


def not_found(kind: str, name, method: str, route_path: str) -> str:
    """What the route says of a ``kind`` with this id that does not exist: the gate says the same
    of one of another project (``tests/server/test_auth_leaks.py`` compares the two)."""
    if kind != RUN:
        return f"{kind} {name} does not exist"
    if (method, route_path) == ("POST", f"{API}/runs/{{run_id}}/points"):
        return f"run {name!r} does not exist: create it first with PUT /api/v1/runs/{name}"
    return f"run {name!r} does not exist"


#: Static files (the dashboard's scripts and styles, plotly.js) hold no data: public.
STATIC_PREFIX = "/static/"


def _compile() -> list[tuple[str, re.Pattern, str, Rule]]:
    # Starlette's own path syntax and compiler, so a rule's path means what the route's does.
    return [(method, compile_path(path)[0], path, rule) for (method, path), rule in RULES.items()]


_COMPILED = _compile()


def match(method: str, path: str) -> tuple[str | None, Rule | None, dict[str, str]]:
    """(route path, its rule, path parameters) for a request; (None, None, {}) when no rule
    matches: with authentication on, such a request is refused (a route nobody gave a rule)."""
    if path.startswith(STATIC_PREFIX):
        return path, PUBLIC, {}
    method = "GET" if method == "HEAD" else method
    for m, regex, template, rule in _COMPILED:
        if m == method:
            found = regex.match(path)
            if found:
                return template, rule, found.groupdict()
    return None, None, {}


#: Runs whose project a worker remembers; a run never changes project.
RUN_CACHE_SIZE = 100_000


class ProjectResolver:
    """Finds the project a path parameter belongs to (None when the thing does not exist:
    the route answers 404 then), through ``store.access``. Runs are remembered, so ingest
    costs no extra query."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def cached_run(self, run_id: str) -> str | None:
        with self._lock:
            return self._runs.get(run_id)

    def runs(self, store, run_ids: list[str]) -> dict[str, str | None]:
        """The project of each run (None: no such run), from memory or one look-up."""
        out: dict[str, str | None] = {r: self.cached_run(r) for r in run_ids}
        missing = [r for r, p in out.items() if p is None]
        if missing:
            found = store.access.run_projects(missing)
            with self._lock:
                for run_id, project in found.items():
                    self._runs[run_id] = project
                while len(self._runs) > RUN_CACHE_SIZE:
                    self._runs.popitem(last=False)
            out.update((r, found.get(r)) for r in missing)
        return out

    def run(self, store, run_id: str) -> str | None:
        return self.runs(store, [run_id])[run_id]

    @staticmethod
    def alert(store, alert_id: int) -> str | None:
        return store.access.alert_project(alert_id)

    @staticmethod
    def webhook(store, webhook_id: int) -> str | None:
        return store.access.webhook_project(webhook_id)

    @staticmethod
    def token(store, token_id: int):
        exists, project = store.access.token_project(token_id)
        if not exists:
            return None
        return GLOBAL if project is None else project
