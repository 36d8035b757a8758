"""Admin API tokens: random, shown once, kept only as a SHA-256 digest, one account each.

A token is ``obx_`` and 43 URL-safe characters (256 random bits). The prefix lets
secret scanners recognise a leaked token. Since the token is random rather than chosen
by a person, a plain SHA-256 is enough to keep the table useless to whoever reads it.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import psycopg
from psycopg.rows import dict_row

from outbox import db
from outbox.errors import Invalid

__all__ = ["PREFIX", "account", "create", "digest", "for_account", "generate", "revoke"]

PREFIX = "obx_"
# Anything longer is not one of ours, and is not worth hashing.
_MAX_LENGTH = 128


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create(conn: psycopg.AsyncConnection[Any], account_id: str) -> tuple[int, str]:
    """A new token for ``account_id``: its id, and the token itself (shown once)."""
    token = generate()
    try:
        cur = await conn.execute(
            db.query("token_create"), {"account_id": account_id, "token_sha256": digest(token)}
        )
    except psycopg.errors.CheckViolation as exc:
        raise Invalid(exc.diag.message_primary or str(exc)) from None
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), token


async def for_account(conn: psycopg.AsyncConnection[Any], account_id: str) -> list[dict[str, Any]]:
    """The account's tokens: id, account_id, created_at, last_used_at; never the token."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(db.query("token_list"), {"account_id": account_id})
        return await cur.fetchall()


async def revoke(conn: psycopg.AsyncConnection[Any], token_id: int) -> bool:
    """Delete the token; False if there was none with that id."""
    cur = await conn.execute(db.query("token_revoke"), {"id": token_id})
    return await cur.fetchone() is not None


async def account(conn: psycopg.AsyncConnection[Any], token: str) -> str | None:
    """The account ``token`` belongs to, or None for a token we did not issue."""
    if not token.startswith(PREFIX) or len(token) > _MAX_LENGTH or not token.isascii():
        return None
    cur = await conn.execute(db.query("token_account"), {"token_sha256": digest(token)})
    row = await cur.fetchone()
    return None if row is None else str(row[0])
