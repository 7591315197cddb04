"""Helpers of the authentication tests: settings with auth on, tokens made through the API."""

from __future__ import annotations

from stethoscope_server.settings import Settings

#: The admin token the test servers accept from their first start (STETHOSCOPE_ADMIN_TOKEN).
ADMIN = "stt_test-admin-token-0123456789abcdef"


def auth_settings(db_url: str, **kw) -> Settings:
    # Webhooks in these tests point at loopback (127.0.0.1:9): private targets allowed.
    return Settings(database_url=db_url, auth="on", admin_token=ADMIN, **{"webhook_allow_private": True, **kw})


def make_token(admin_client, project: str | None, scopes: list[str], name: str | None = None) -> str:
    body = {"name": name or f"{project}:{','.join(scopes)}", "project": project, "scopes": scopes}
    r = admin_client.post("/api/v1/tokens", json=body)
    r.raise_for_status()
    return r.json()["token"]
