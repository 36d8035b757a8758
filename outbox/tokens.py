"""Admin API tokens: random, shown once, kept only as a SHA-256 digest.

An account token acts for its one account. An operator token (``tokens create
--operator``) belongs to no account: the SaaS's backend names the account each request
is for in the ``Outbox-Account`` header (outbox.web.auth), so it needs one credential, not
one per customer.

A token is ``obx_`` and 43 URL-safe characters (256 random bits). The prefix lets
secret scanners recognise a leaked token. Since the token is random rather than chosen
by a person, a plain SHA-256 is enough to keep the table useless to whoever reads it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

import psycopg

from outbox import db
from outbox.db.access import TokenHolder as Holder
from outbox.errors import Invalid

__all__ = [
    "PREFIX",
    "Holder",
    "account",
    "create",
    "digest",
    "for_account",
    "generate",
    "revoke",
    "well_formed",
]

PREFIX = "obx_"
# What generate() makes: the prefix and 32 random bytes in unpadded URL-safe base64.
_FORM = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_-]{43}")


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def well_formed(token: str) -> bool:
    """Whether ``token`` could be one we issued: anything else is refused without
    asking the database."""
    return _FORM.fullmatch(token) is not None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create(conn: psycopg.AsyncConnection[Any], account_id: str | None) -> tuple[int, str]:
    """A new token for ``account_id``, or an operator token for None: its id, and the
    token itself (shown once)."""
    token = generate()
    try:
        token_id = await db.access.create_token(conn, account_id, digest(token))
    except psycopg.errors.CheckViolation as exc:
        raise Invalid(exc.diag.message_primary or str(exc)) from None
    return token_id, token


async def for_account(
    conn: psycopg.AsyncConnection[Any], account_id: str | None
) -> list[dict[str, Any]]:
    """The account's tokens, or for None the operator tokens: id, account_id, operator,
    created_at, last_used_at; never the token."""
    return await db.access.tokens(conn, account_id)


async def revoke(conn: psycopg.AsyncConnection[Any], token_id: int) -> bool:
    """Delete the token; False if there was none with that id."""
    return await db.access.revoke_token(conn, token_id)


async def account(conn: psycopg.AsyncConnection[Any], token: str) -> Holder | None:
    """Whom ``token`` acts for (an account, or any as an operator), or None for a
    token we did not issue."""
    if not well_formed(token):
        return None
    return await db.access.token_account(conn, digest(token))
