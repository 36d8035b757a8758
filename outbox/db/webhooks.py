"""Webhooks and their deliveries as the CLI and the API see them: emit, add, change,
delete, read, status, the delivery log, replays and recovery.

The database enforces every rule and raises its own errors; outbox.webhooks turns them
into messages. Rows that are shown as they are (a webhook, its status, a delivery, an
attempt) come back as dicts keyed by column name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox.db.core import query

__all__ = [
    "Replayed",
    "add",
    "attempts",
    "delete",
    "delivery",
    "delivery_page",
    "emit",
    "get",
    "recover",
    "replay",
    "status",
    "update",
    "wake",
]

Conn = psycopg.AsyncConnection[Any]
# A row by column name, as the query returns it.
Row = dict[str, Any]


async def emit(conn: Conn, account_id: str, event: str, data: str) -> int:
    """Enqueue an event (``data`` is JSON text); its id."""
    cur = await conn.execute(
        query("emit"), {"account_id": account_id, "event": event, "data": data}
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def add(
    conn: Conn,
    *,
    account_id: str,
    name: str,
    url: str,
    event: str,
    secret: str | None = None,
    enabled: bool = True,
    format: str | None = None,
    headers: dict[str, Any] | None = None,
    rate_limit: int | None = None,
) -> int:
    """A new webhook's id; a ``format`` of None is the one its URL calls for."""
    params = {
        "headers": None if headers is None else Jsonb(headers),
        "rate_limit": rate_limit,
        "account_id": account_id,
        "name": name,
        "url": url,
        "event": event,
        "secret": secret,
        "enabled": enabled,
        "format": format,
    }
    cur = await conn.execute(query("webhook_add"), params)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def update(
    conn: Conn,
    webhook_id: int,
    *,
    name: str | None = None,
    url: str | None = None,
    event: str | None = None,
    enabled: bool | None = None,
    format: str | None = None,
    set_secret: bool = False,
    secret: str | None = None,
    end_secret_overlap: bool = False,
    headers: dict[str, Any] | None = None,
    clear_headers: bool = False,
    set_rate_limit: bool = False,
    rate_limit: int | None = None,
) -> bool:
    """Change the fields that are not None, the secret if ``set_secret`` (None removes
    it) and the rate limit if ``set_rate_limit`` (None removes it); ``headers`` sets or
    (with a value of None) removes the headers it names, after ``clear_headers`` removed
    them all. False when there is no such webhook."""
    params = {
        "headers": None if headers is None else Jsonb(headers),
        "clear_headers": clear_headers,
        "set_rate_limit": set_rate_limit,
        "rate_limit": rate_limit,
        "id": webhook_id,
        "name": name,
        "url": url,
        "event": event,
        "enabled": enabled,
        "format": format,
        "set_secret": set_secret,
        "secret": secret,
    }
    async with conn.transaction():
        cur = await conn.execute(query("webhook_update"), params)
        found = await cur.fetchone() is not None
        if found and end_secret_overlap:
            await conn.execute(query("webhook_end_overlap"), {"id": webhook_id})
    return found


async def delete(conn: Conn, webhook_id: int) -> bool:
    """Delete the webhook; False when there was none."""
    cur = await conn.execute(query("webhook_delete"), {"id": webhook_id})
    return await cur.fetchone() is not None


async def get(conn: Conn, webhook_id: int) -> Row | None:
    """The webhook with its secrets (the previous one while it still signs) and its
    headers' values."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("webhook_get"), {"id": webhook_id})
        return await cur.fetchone()


async def status(conn: Conn, account_id: str | None) -> list[Row]:
    """Each webhook of the account (of every account for None) with its status fields
    (the outbox.webhook_status view), the number of its next retry, its rate limit and
    the names of its headers (``header_names``), never their values."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("webhook_status"), {"account_id": account_id})
        return await cur.fetchall()


async def delivery_page(
    conn: Conn,
    webhook_id: int,
    *,
    before: int | None,
    limit: int,
    status: str | None = None,
    since: datetime | None = None,
) -> list[Row]:
    """Up to ``limit`` deliveries of the webhook, newest first, older than id ``before``
    (of that ``status``, created at or after ``since``, when given), with the ``wire_``
    columns that rebuild what was sent."""
    params = {
        "webhook_id": webhook_id,
        "before": before,
        "limit": limit,
        "status": status,
        "since": since,
    }
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("delivery_page"), params)
        return await cur.fetchall()


async def delivery(conn: Conn, delivery_id: int, account_id: str | None) -> Row | None:
    """One delivery as delivery_page gives it; with ``account_id``, only that account's."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("delivery_get"), {"id": delivery_id, "account_id": account_id})
        return await cur.fetchone()


async def attempts(conn: Conn, delivery_ids: list[int], per_delivery: int) -> list[Row]:
    """The newest ``per_delivery`` attempts of these deliveries, by delivery and then
    oldest first."""
    params = {"ids": delivery_ids, "per_delivery": per_delivery}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("delivery_attempts"), params)
        return await cur.fetchall()


class Replayed(NamedTuple):
    """A replay's answer: the delivery's status and its webhook's ``enabled`` as found,
    and whether it was queued again."""

    status: str
    enabled: bool
    requeued: bool


async def replay(conn: Conn, delivery_id: int, account_id: str | None) -> Replayed | None:
    """Queue a finished delivery again as a new series of attempts; None when there is
    no such delivery (of that account, with ``account_id``)."""
    cur = await conn.execute(query("delivery_retry"), {"id": delivery_id, "account_id": account_id})
    row = await cur.fetchone()
    return None if row is None else Replayed(*row)


async def recover(conn: Conn, webhook_id: int, since: datetime) -> int:
    """Queue again every delivery of the webhook that failed, or that an automatic
    disable cancelled, at or after ``since``; how many."""
    cur = await conn.execute(query("webhook_recover"), {"webhook_id": webhook_id, "since": since})
    return len(await cur.fetchall())


async def wake(conn: Conn) -> None:
    """Tell the dispatchers that replayed deliveries are due now."""
    await conn.execute(query("wake"))
