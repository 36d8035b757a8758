"""Who may use the admin server: API tokens, the key that signs portal links, the links
used, and the settings page's sessions. Tokens and cookies are stored and looked up
only as their SHA-256 digests, which the callers compute.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import dict_row

from outbox.db.core import query

__all__ = [
    "LinkUse",
    "PortalKey",
    "SessionRow",
    "TokenHolder",
    "create_session",
    "create_token",
    "end_session",
    "end_sessions",
    "portal_key",
    "revoke_token",
    "session",
    "token_account",
    "token_digests",
    "tokens",
    "use_link",
]

Conn = psycopg.AsyncConnection[Any]


async def create_token(conn: Conn, account_id: str | None, token_sha256: bytes) -> int:
    """Store a new token's digest for the account (None: an operator token); its id."""
    cur = await conn.execute(
        query("token_create"), {"account_id": account_id, "token_sha256": token_sha256}
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def tokens(conn: Conn, account_id: str | None) -> list[dict[str, Any]]:
    """The account's tokens (None: the operator tokens): id, account_id, operator,
    created_at, last_used_at."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("token_list"), {"account_id": account_id})
        return await cur.fetchall()


async def revoke_token(conn: Conn, token_id: int) -> bool:
    """Delete the token; False when there was none with that id."""
    cur = await conn.execute(query("token_revoke"), {"id": token_id})
    return await cur.fetchone() is not None


class TokenHolder(NamedTuple):
    account_id: str | None  # None for an operator token
    operator: bool


async def token_digests(conn: Conn) -> set[bytes]:
    """The digest of every token there is."""
    cur = await conn.execute(query("token_digests"))
    return {bytes(row[0]) for row in await cur.fetchall()}


async def token_account(conn: Conn, token_sha256: bytes) -> TokenHolder | None:
    """Whom the token with this digest acts for (noting that it was used), or None."""
    cur = await conn.execute(query("token_account"), {"token_sha256": token_sha256})
    row = await cur.fetchone()
    return None if row is None else TokenHolder(row[0], bool(row[1]))


class PortalKey(NamedTuple):
    secret: bytes
    now: float  # Unix seconds by the database's clock


async def portal_key(conn: Conn) -> PortalKey | None:
    """The key that signs portal links, and the database's time; None when the table
    is empty."""
    cur = await conn.execute(query("portal_secret"))
    row = await cur.fetchone()
    return None if row is None else PortalKey(bytes(row[0]), float(row[1]))


class LinkUse(NamedTuple):
    fresh: bool  # not expired
    first_use: bool  # and so recorded as used now


async def use_link(conn: Conn, *, nonce: str, account_id: str, expires_at: datetime) -> LinkUse:
    """Record the use of a link whose signature was checked."""
    params = {"nonce": nonce, "account_id": account_id, "expires_at": expires_at}
    cur = await conn.execute(query("portal_link_use"), params)
    row = await cur.fetchone()
    assert row is not None
    return LinkUse(*row)


async def create_session(
    conn: Conn,
    *,
    account_id: str,
    session_sha256: bytes,
    csrf_token: str,
    seconds: int,
    display_name: str | None,
) -> datetime:
    """Store a new page session for ``seconds``; when it expires."""
    params = {
        "account_id": account_id,
        "display_name": display_name,
        "session_sha256": session_sha256,
        "csrf_token": csrf_token,
        "seconds": seconds,
    }
    cur = await conn.execute(query("portal_session_create"), params)
    row = await cur.fetchone()
    assert row is not None
    expires_at: datetime = row[0]
    return expires_at


class SessionRow(NamedTuple):
    account_id: str
    csrf_token: str
    expires_at: datetime
    display_name: str | None


async def session(conn: Conn, session_sha256: bytes) -> SessionRow | None:
    """The unexpired session with this cookie digest, or None."""
    cur = await conn.execute(query("portal_session"), {"session_sha256": session_sha256})
    row = await cur.fetchone()
    return None if row is None else SessionRow(*row)


async def end_session(conn: Conn, session_sha256: bytes) -> None:
    await conn.execute(query("portal_session_end"), {"session_sha256": session_sha256})


async def end_sessions(conn: Conn, account_id: str) -> int:
    """End every session of the account; how many had not expired."""
    cur = await conn.execute(query("portal_sessions_end"), {"account_id": account_id})
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])
