"""API tokens as the gate sees them: who a token speaks for, and what it may do.

    token, row = store.tokens.create("ci", project="vision", scopes=["ingest", "read"])
    principal = lookup(store, token)      # None for an unknown or revoked token

The rows themselves (created, listed, revoked, looked up by hash) are the store's:
``server/store/tokens.py``; its names are re-exported here for the gate and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..store.tokens import BOOTSTRAP_NAME, ENV_ADMIN_NAME, SCOPES, hash_token

__all__ = ["BOOTSTRAP_NAME", "ENV_ADMIN_NAME", "SCOPES", "Principal", "hash_token", "lookup"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request speaks for: one token, its scopes and its project (None: every project)."""

    token_id: int
    name: str
    project: str | None
    scopes: frozenset[str]

    def has_scope(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def may_see(self, project: str | None) -> bool:
        return self.project is None or self.project == project


def lookup(store, token: str) -> Principal | None:
    """The principal of a valid token; None for an unknown or revoked one."""
    row = store.tokens.find(token)
    if row is None or row["revoked_at"] is not None:
        return None
    return Principal(row["id"], row["name"], row["project"], frozenset(row["scopes"]))
