"""Operational events (contract 17) POSTed to the operator's own endpoint,
OUTBOX_NOTIFY_URL: a part of the sidecar beside the dispatcher, never in its way.

The events are rows of outbox.notifications, written by the database where a webhook's
state changes (sql/migrations/0014_notifications.sql). This part claims the due unsent
ones (FOR UPDATE SKIP LOCKED, under a lease, so several sidecars share them), POSTs
each as a delivery is POSTed (body and headers of section 5, signed with
OUTBOX_NOTIFY_SECRET), and records the outcome: sent, or due again after the next of
OUTBOX_RETRY_DELAYS, and then the largest of them for as long as it takes. It has its
own connection and its own Sender (private addresses and plain http allowed: the
endpoint is the operator's), so an endpoint that is down delays no delivery and loses
nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime

import structlog

from outbox import db, wire
from outbox.config import Settings
from outbox.db.notifications import Notification
from outbox.delivery import Attempt, Sender
from outbox.retry import next_delay
from outbox.supervisor import Supervisor

__all__ = ["BATCH", "retry_in", "run", "sender"]

log = structlog.get_logger("outbox.notify")

# Notifications claimed, and POSTed at once, per round. They are few (one per change
# of a webhook's state, one per delivery that fails for good).
BATCH = 16
# Seconds between retries once OUTBOX_RETRY_DELAYS is used up, when it is empty.
KEEP_TRYING = 60.0


def sender(settings: Settings) -> Sender:
    """A Sender of its own, without the SSRF guard, a connection per notification of a
    round (an attempt's timeout counts the wait for a connection too)."""
    return Sender(dataclasses.replace(settings, allow_private_targets=True), limit=BATCH)


def retry_in(attempt: int, delays: tuple[float, ...], retry_after: float | None = None) -> float:
    """Seconds before trying failed attempt ``attempt`` (1-based) again: as a delivery
    would be retried, then at the largest delay, for good."""
    if not delays:
        return KEEP_TRYING if retry_after is None else max(KEEP_TRYING, retry_after)
    delay = next_delay(min(attempt, len(delays)), delays, retry_after=retry_after)
    assert delay is not None
    return delay


async def _post(settings: Settings, post: Sender, note: Notification) -> Attempt:
    body = wire.body(note.kind, note.created_at, note.data)
    now = int(time.time())
    headers = wire.headers(
        message_id=str(note.id),
        event=note.kind,
        attempt=note.attempt,
        payload=body,
        secret=settings.notify_secret,
        now=now,
    )
    return await post.post(
        settings.notify_url, body, headers, started_at=datetime.fromtimestamp(now, UTC)
    )


async def run(settings: Settings, post: Sender, parts: Supervisor) -> None:
    """Send notifications for as long as the sidecar runs (a part of it)."""
    async with await db.connect(settings.database_url, **settings.connect_options) as conn:
        while True:
            due = await db.notifications.claim(
                conn, limit=BATCH, lease_seconds=settings.lease_seconds
            )
            attempts = await asyncio.gather(*(_post(settings, post, n) for n in due))
            for note, attempt in zip(due, attempts, strict=True):
                wait = retry_in(note.attempt, settings.retry_delays, attempt.retry_after)
                await db.notifications.sent(conn, note, error=attempt.error, retry_in=wait)
                if attempt.error is not None:
                    log.warning(
                        "operational event not delivered; trying again",
                        notification_id=note.id,
                        kind=note.kind,
                        attempt=note.attempt,
                        error=attempt.error,
                        retry_in=round(wait, 1),
                    )
            parts.beat("notify")
            if len(due) < BATCH:
                await asyncio.sleep(settings.poll_interval)
