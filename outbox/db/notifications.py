"""The notification sender's statements: claim due operational events, and record what
one attempt to POST one came to. The events themselves are written by the record and
auto-disable functions of the schema (see sql/migrations/0014_notifications.sql)."""

from __future__ import annotations

from typing import Any, NamedTuple

import psycopg

from outbox.db.core import query

__all__ = ["Notification", "claim", "sent"]

Conn = psycopg.AsyncConnection[Any]


class Notification(NamedTuple):
    """A claimed operational event: what its POST needs."""

    id: int
    kind: str
    created_at: str  # ISO 8601, UTC, milliseconds
    data: str  # the JSON object, as stored
    attempt: int


async def claim(conn: Conn, *, limit: int, lease_seconds: float) -> list[Notification]:
    """Hold up to ``limit`` due unsent notifications for ``lease_seconds``, oldest first."""
    params = {"limit": limit, "lease_seconds": lease_seconds}
    cur = await conn.execute(query("notifications_claim"), params)
    return [Notification(*row) for row in await cur.fetchall()]


async def sent(
    conn: Conn, notification: Notification, *, error: str | None, retry_in: float
) -> bool:
    """Record one attempt: sent when ``error`` is None, else due again in ``retry_in``
    seconds. False when a later attempt has taken the notification over (a lost lease)."""
    params = {
        "id": notification.id,
        "attempt": notification.attempt,
        "error": error,
        "retry_in": retry_in,
    }
    cur = await conn.execute(query("notification_sent"), params)
    row = await cur.fetchone()
    return row is not None and bool(row[0])
