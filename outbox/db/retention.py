"""Retention's statements: the cutoff of a round, the pruners' lock, and the two kinds of
batch. The caller runs each batch in a transaction of its own, after the lock."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from outbox.db.core import query

__all__ = [
    "DeliveriesPruned",
    "EventsPruned",
    "cutoff",
    "forget_expired_secrets",
    "prune_deliveries",
    "prune_events",
    "prune_notifications",
    "try_lock",
]

Conn = psycopg.AsyncConnection[Any]


async def cutoff(conn: Conn, older_than: float) -> datetime:
    """``older_than`` seconds before now, by the database's clock."""
    cur = await conn.execute(query("prune_cutoff"), {"older_than": older_than})
    row = await cur.fetchone()
    assert row is not None
    found: datetime = row[0]
    return found


async def try_lock(conn: Conn) -> bool:
    """Take the pruners' lock for this transaction; False when another pruner has it."""
    cur = await conn.execute(query("prune_lock"))
    row = await cur.fetchone()
    return row is not None and bool(row[0])


async def forget_expired_secrets(conn: Conn) -> int:
    """Clear every rotated-out secret whose overlap has ended; how many."""
    cur = await conn.execute(query("forget_expired_secrets"))
    return cur.rowcount


class DeliveriesPruned(NamedTuple):
    deliveries: int
    attempts: int


async def prune_deliveries(conn: Conn, *, cutoff: datetime, rows: int) -> DeliveriesPruned:
    """Delete finished deliveries older than ``cutoff``, oldest first, with their
    attempts: at most ``rows`` rows in all."""
    cur = await conn.execute(query("prune_deliveries"), {"cutoff": cutoff, "rows": rows})
    row = await cur.fetchone()
    assert row is not None
    return DeliveriesPruned(*row)


class EventsPruned(NamedTuple):
    events: int  # deleted
    last_id: int | None  # the last id read; None when there was none after ``after``
    old: int  # how many of those read were older than the cutoff


async def prune_events(conn: Conn, *, cutoff: datetime, rows: int, after: int) -> EventsPruned:
    """Delete events older than ``cutoff`` with no delivery left, among the next
    ``rows`` events by id after ``after``."""
    params = {"cutoff": cutoff, "rows": rows, "after": after}
    cur = await conn.execute(query("prune_events"), params)
    row = await cur.fetchone()
    assert row is not None
    return EventsPruned(*row)


async def prune_notifications(conn: Conn, *, cutoff: datetime, rows: int) -> int:
    """Delete operational events created before ``cutoff``, oldest first, at most
    ``rows``; how many."""
    cur = await conn.execute(query("prune_notifications"), {"cutoff": cutoff, "rows": rows})
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])
