"""API token rows: created, listed, revoked and looked up; only a token's SHA-256 is stored.

    token, row = store.tokens.create("ci", project="vision", scopes=["ingest", "read"])
    row = store.tokens.find(token)        # None for an unknown token (revoked ones too: see revoked_at)

A token is 256 random bits; a hash of such a value cannot be reversed or guessed, so a plain
SHA-256 (no salt, no slow KDF) is enough, and it lets a request find its token with one
indexed look-up. The plaintext is shown once, at creation, and stored nowhere. What a token
may do (``Principal``) is the gate's business: ``server/auth/tokens.py``.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import Connection, insert, select, text, update

from .errors import NotFound
from .models import Project, Token, aware, utcnow
from .runs import ensure_project

T = Token.__table__
P = Project.__table__

#: The three scopes. ingest: create/resume runs, post points and events; read: GET; admin: all.
SCOPES = ("ingest", "read", "admin")
#: Prefix of every token: a secret scanner (or a person) can tell what leaked.
PREFIX = "stt_"
#: Bytes of randomness in a token (256 bits).
TOKEN_BYTES = 32
#: Key of the PostgreSQL advisory lock that lets one of several starting workers bootstrap.
_PG_BOOTSTRAP_LOCK = 0x5737E8
BOOTSTRAP_NAME = "admin (first start)"
ENV_ADMIN_NAME = "admin (STETHOSCOPE_ADMIN_TOKEN)"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def check_scopes(scopes) -> list[str]:
    out = sorted(set(scopes), key=SCOPES.index) if set(scopes) <= set(SCOPES) else None
    if not out:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}, not {list(scopes)!r}")
    return out


def _row_dict(r) -> dict:
    return {
        "id": r.id,
        "name": r.name,
        "project": r.project,
        "scopes": list(r.scopes or []),
        "created_at": aware(r.created_at),
        "revoked_at": aware(r.revoked_at),
    }


def _select():
    return select(T.c.id, T.c.name, T.c.scopes, T.c.created_at, T.c.revoked_at, P.c.name.label("project")).select_from(
        T.outerjoin(P, P.c.id == T.c.project_id)
    )


def create(conn: Connection, name: str, project: str | None, scopes, token: str | None = None) -> tuple[str, dict]:
    """Store a new token (the project is created if needed); returns (plaintext, its row)."""
    scopes = check_scopes(scopes)
    token = token or new_token()
    pid = ensure_project(conn, project) if project is not None else None
    tid = conn.execute(
        insert(T)
        .values(project_id=pid, name=name, token_hash=hash_token(token), scopes=scopes, created_at=utcnow())
        .returning(T.c.id)
    ).scalar_one()
    return token, get(conn, tid)


def get(conn: Connection, token_id: int) -> dict:
    row = conn.execute(_select().where(T.c.id == token_id)).first()
    if row is None:
        raise NotFound(f"token {token_id} does not exist")
    return _row_dict(row)


def list_tokens(conn: Connection, project: str | None = None, include_revoked: bool = True) -> list[dict]:
    stmt = _select().order_by(T.c.id)
    if project is not None:
        stmt = stmt.where(P.c.name == project)
    if not include_revoked:
        stmt = stmt.where(T.c.revoked_at.is_(None))
    return [_row_dict(r) for r in conn.execute(stmt)]


def revoke(conn: Connection, token_id: int) -> dict:
    """Mark the token revoked (the row stays, for the record). Safe to repeat."""
    row = get(conn, token_id)
    if row["revoked_at"] is None:
        conn.execute(update(T).where(T.c.id == token_id).values(revoked_at=utcnow()))
        row = get(conn, token_id)
    return row


def find(conn: Connection, token: str) -> dict | None:
    """The row of a token (revoked or not), by its hash; None for an unknown one."""
    row = conn.execute(_select().where(T.c.token_hash == hash_token(token))).first()
    return None if row is None else _row_dict(row)


def bootstrap_admin(conn: Connection, admin_token: str | None) -> str | None:
    """Make sure an admin can get in, once. With ``admin_token`` (``STETHOSCOPE_ADMIN_TOKEN``):
    store its hash if it is not stored yet (revoking it later sticks). Without: if no global
    admin token was ever made, make one and return its plaintext (to print once); else None.
    Run inside a write transaction: concurrent starting workers make one token, not several."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_BOOTSTRAP_LOCK})
    if admin_token is not None:
        if conn.execute(select(T.c.id).where(T.c.token_hash == hash_token(admin_token))).first() is None:
            create(conn, ENV_ADMIN_NAME, None, ["admin"], token=admin_token)
        return None
    global_scopes = conn.execute(select(T.c.scopes).where(T.c.project_id.is_(None))).scalars()
    if any("admin" in (s or []) for s in global_scopes):
        return None
    token, _ = create(conn, BOOTSTRAP_NAME, None, ["admin"])
    return token


class TokenStore:
    """``store.tokens``: each method one transaction."""

    def __init__(self, store) -> None:
        self._store = store

    def create(self, name: str, project: str | None, scopes, token: str | None = None) -> tuple[str, dict]:
        with self._store.writing() as conn:
            return create(conn, name, project, scopes, token)

    def list(self, project: str | None = None, include_revoked: bool = True) -> list[dict]:
        with self._store.reading() as conn:
            return list_tokens(conn, project, include_revoked)

    def revoke(self, token_id: int) -> dict:
        with self._store.writing() as conn:
            return revoke(conn, token_id)

    def find(self, token: str) -> dict | None:
        with self._store.reading() as conn:
            return find(conn, token)

    def bootstrap_admin(self, admin_token: str | None) -> str | None:
        with self._store.writing() as conn:
            return bootstrap_admin(conn, admin_token)
