"""Retention: finished deliveries, their attempts, and events with no delivery left are
deleted once older than OUTBOX_RETENTION, in small batches, by one process at a time.

Each batch is one short statement in a transaction of its own (at most BATCH_ROWS rows,
found through an index), and the pruner rests after each batch for REST_FACTOR times as
long as the batch took: a backlog of millions is worked off in the background without
ever holding locks, the disk or a core long enough for producers to notice.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import structlog

from outbox import db
from outbox.config import Settings
from outbox.supervisor import Supervisor

__all__ = ["BATCH_ROWS", "Pruned", "prune", "run"]

log = structlog.get_logger("outbox.retention")

_T = TypeVar("_T")

# Rows deleted by one statement at most. Small batches commit small amounts of WAL, so
# producers' commits never queue long behind one (`make bench` section 6: larger
# batches raised producers' p99; figures in bench/README.md).
BATCH_ROWS = 1_000
# The rest after a batch, as a multiple of the time it took (so pruning takes a tenth
# of the database's time at most), and at least REST_MIN.
REST_FACTOR = 9.0
REST_MIN = 0.01
# How often a running sidecar prunes, at most; more often for a retention shorter.
EVERY_MAX = 30.0


@dataclass
class Pruned:
    """What one round deleted, and what it took."""

    deliveries: int = 0
    attempts: int = 0
    events: int = 0
    statements: int = 0
    longest_seconds: float = 0.0
    # Another process was pruning, so this one left the round to it.
    yielded: bool = False


async def _batch(
    conn: psycopg.AsyncConnection[Any],
    step: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]],
    pruned: Pruned,
    *,
    wait: bool,
) -> _T | None:
    """Run one batch under the pruners' lock; None when another pruner holds it."""
    async with conn.transaction():
        if wait:
            await db.retention.lock(conn)
        elif not await db.retention.try_lock(conn):
            pruned.yielded = True
            return None
        start = time.monotonic()
        row = await step(conn)
        took = time.monotonic() - start
    pruned.statements += 1
    pruned.longest_seconds = max(pruned.longest_seconds, took)
    await asyncio.sleep(max(REST_MIN, REST_FACTOR * took))
    return row


async def prune(
    conn: psycopg.AsyncConnection[Any],
    older_than: float,
    *,
    wait: bool = False,
    rows: int = BATCH_ROWS,
) -> Pruned:
    """Delete what is older than ``older_than`` seconds, batch after batch, until none is left.

    ``conn`` is in autocommit mode. With ``wait`` the round waits its turn when another
    process is pruning; without, it leaves the rest to that one (``yielded``).
    """
    pruned = Pruned()
    cutoff = await db.retention.cutoff(conn, older_than)
    deliveries = functools.partial(db.retention.prune_deliveries, cutoff=cutoff, rows=rows)
    while True:
        got = await _batch(conn, deliveries, pruned, wait=wait)
        if got is None:
            return pruned
        pruned.deliveries += got.deliveries
        pruned.attempts += got.attempts
        if not got.deliveries:
            break
    after = 0
    while True:
        events = functools.partial(db.retention.prune_events, cutoff=cutoff, rows=rows, after=after)
        found = await _batch(conn, events, pruned, wait=wait)
        if found is None:
            return pruned
        pruned.events += found.events
        # Past the old events: the rest is younger (see the query).
        if found.last_id is None or not found.old:
            return pruned
        after = found.last_id


async def run(settings: Settings, parts: Supervisor) -> None:
    """Prune in the background for as long as the sidecar runs: a part of the sidecar,
    so the supervisor starts it again after a failure (a lost database included)."""
    assert settings.retention is not None
    every = max(1.0, min(EVERY_MAX, settings.retention))
    async with await db.connect(settings.database_url, **settings.connect_options) as conn:
        while True:
            pruned = await prune(conn, settings.retention)
            if pruned.deliveries or pruned.events:
                log.info(
                    "pruned",
                    deliveries=pruned.deliveries,
                    attempts=pruned.attempts,
                    events=pruned.events,
                    statements=pruned.statements,
                    longest_ms=round(pruned.longest_seconds * 1000),
                )
            parts.beat("retention")
            await asyncio.sleep(every)
