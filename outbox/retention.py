"""Retention: finished deliveries, their attempts, events with no delivery left, and
operational events (outbox.notifications) are deleted once older than OUTBOX_RETENTION,
in small batches, by one process at a time.

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

__all__ = ["BATCH_ROWS", "LOCK", "Pruned", "prune", "run"]

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
# How long `outbox prune` tries for the pruners' lock before it gives up and says so.
WAIT = 30.0
WAIT_STEP = 0.1
# A sidecar that has found the pruners' lock taken for this long says so in its log
# (and again as often): another pruner's round never holds it nearly that long.
HELD_WARNING = 600.0
# The pruners' lock: a row that a pruner's batch holds FOR UPDATE.
LOCK = "outbox.locks 'prune'"


@dataclass
class Pruned:
    """What one round deleted, and what it took."""

    deliveries: int = 0
    attempts: int = 0
    events: int = 0
    statements: int = 0
    longest_seconds: float = 0.0
    # Another process was pruning (or held the pruners' lock), so this one left the
    # round to it.
    yielded: bool = False
    # Rotated-out secrets cleared, their overlap over.
    secrets: int = 0
    notifications: int = 0


async def _batch(
    conn: psycopg.AsyncConnection[Any],
    step: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]],
    pruned: Pruned,
    *,
    wait: float,
) -> _T | None:
    """Run one batch under the pruners' lock; None when another session holds it, also
    after trying for ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        async with conn.transaction():
            if await db.retention.try_lock(conn):
                start = time.monotonic()
                row = await step(conn)
                took = time.monotonic() - start
                break
        if time.monotonic() >= deadline:
            pruned.yielded = True
            return None
        await asyncio.sleep(WAIT_STEP)
    pruned.statements += 1
    pruned.longest_seconds = max(pruned.longest_seconds, took)
    await asyncio.sleep(max(REST_MIN, REST_FACTOR * took))
    return row


async def prune(
    conn: psycopg.AsyncConnection[Any],
    older_than: float,
    *,
    wait: float = 0.0,
    rows: int = BATCH_ROWS,
) -> Pruned:
    """Delete what is older than ``older_than`` seconds, batch after batch, until none is left.

    ``conn`` is in autocommit mode. When another session holds the pruners' lock, a
    batch tries again for up to ``wait`` seconds, then leaves the rest of the round to
    it (``yielded``): the lock is never waited for, so that no session holding it can
    stop the pruner for good.
    """
    pruned = Pruned(secrets=await db.retention.forget_expired_secrets(conn))
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
    notifications = functools.partial(db.retention.prune_notifications, cutoff=cutoff, rows=rows)
    while True:
        count = await _batch(conn, notifications, pruned, wait=wait)
        if count is None:
            return pruned
        pruned.notifications += count
        if count < rows:
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
    held_since: float | None = None
    async with await db.connect(settings.database_url, **settings.connect_options) as conn:
        while True:
            pruned = await prune(conn, settings.retention)
            now = time.monotonic()
            if not pruned.yielded or pruned.statements:
                held_since = None
            elif held_since is None:
                held_since = now
            elif now - held_since >= HELD_WARNING:
                log.warning(
                    "retention has not run: another session has held the pruners' lock"
                    " all along (an outbox pruner never holds it this long); trying again",
                    lock=LOCK,
                    held_for_s=round(now - held_since),
                )
                held_since = now
            if pruned.deliveries or pruned.events or pruned.notifications:
                log.info(
                    "pruned",
                    deliveries=pruned.deliveries,
                    attempts=pruned.attempts,
                    events=pruned.events,
                    notifications=pruned.notifications,
                    statements=pruned.statements,
                    longest_ms=round(pruned.longest_seconds * 1000),
                )
            parts.beat("retention")
            await asyncio.sleep(every)
