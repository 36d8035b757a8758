"""The dispatcher's statements: claim, record, auto-disable, when the next delivery is
due, the doorbell, LISTEN, and how its own connections are set up; and the backlog that
/metrics shows.

claim and record run thousands of times a second under load: each is one prepared
statement and one round trip, and their rows are read as plain tuples.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict, TypeVar

import psycopg

from outbox.db.core import query

__all__ = [
    "PACE_AHEAD",
    "AttemptResult",
    "Backlog",
    "Claimed",
    "Disabled",
    "Job",
    "arm_doorbell",
    "auto_disable",
    "claim",
    "claim_params",
    "commit_without_waiting",
    "disarm_doorbell",
    "listen",
    "next_due",
    "pending_stats",
    "ping",
    "plan_once",
    "record",
    "record_params",
    "replan",
    "wake_peers",
]

_K = TypeVar("_K", int, str)

Conn = psycopg.AsyncConnection[Any]

# A claim hands a rate-limited webhook the attempts that may start within this many
# seconds, each with its delay (outbox.claim_v3()): a dispatcher that wakes a little late
# still starts them on time, and one claim serves a fast limit for a while.
PACE_AHEAD = 0.05


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed delivery: everything one attempt needs."""

    id: int
    webhook_id: int
    account_id: str
    attempt: int
    event: str
    timestamp: str
    data: str
    url: str
    secret: str | None
    lease: str
    retry_base: int
    previous_secret: str | None
    format: str = "json"
    # The webhook's own headers (CONTRACT section 18), sent besides outbox's.
    headers: dict[str, str] = field(default_factory=dict)
    # Answers of 429 that this delivery has been let off so far (CONTRACT section 19).
    slowdowns: int = 0
    # Seconds to wait before the attempt starts: its place in its webhook's rate limit.
    delay: float = 0.0


class Claimed(NamedTuple):
    """What one claim leased: the jobs to attempt, and how many rows it took in all
    (those of a disabled webhook were cancelled rather than handed out)."""

    jobs: list[Job]
    rows: int


def _split(in_flight: Mapping[_K, int], share: int) -> tuple[list[_K], dict[_K, int]]:
    """Those at their share (the claim skips them), and the others with attempts in
    flight, with how many (the claim gives them only what is left)."""
    full = [k for k, n in in_flight.items() if n >= share]
    busy = {k: n for k, n in in_flight.items() if 0 < n < share}
    return full, busy


def claim_params(
    *,
    limit: int,
    lease: str,
    lease_seconds: float,
    per_webhook: int,
    webhooks_in_flight: Mapping[int, int],
    per_account: int,
    accounts_in_flight: Mapping[str, int],
    pace_ahead: float = PACE_AHEAD,
) -> dict[str, Any]:
    """The parameters of the ``claim`` query for a dispatcher with these attempts in
    flight (by webhook id and by account): the one place they are built."""
    full, busy = _split(webhooks_in_flight, per_webhook)
    full_accounts, busy_accounts = _split(accounts_in_flight, per_account)
    return {
        "limit": limit,
        # Each webhook's and account's share is applied to twice as many due rows as
        # are wanted, so that rows over a share leave room for others'.
        "window": limit * 2,
        "per_webhook": per_webhook,
        "full_webhooks": full,
        "busy_webhooks": list(busy),
        "busy_counts": list(busy.values()),
        "per_account": per_account,
        "full_accounts": full_accounts,
        "busy_accounts": list(busy_accounts),
        "busy_account_counts": list(busy_accounts.values()),
        "lease_seconds": lease_seconds,
        "lease": lease,
        "pace_ahead": pace_ahead,
    }


async def claim(
    conn: Conn,
    *,
    limit: int,
    lease_seconds: float,
    per_webhook: int,
    webhooks_in_flight: Mapping[int, int],
    per_account: int,
    accounts_in_flight: Mapping[str, int],
) -> Claimed:
    """Lease up to ``limit`` due deliveries, for ``lease_seconds``, within each
    webhook's and account's share of the slots given what is in flight."""
    lease = str(uuid.uuid4())
    params = claim_params(
        limit=limit,
        lease=lease,
        lease_seconds=lease_seconds,
        per_webhook=per_webhook,
        webhooks_in_flight=webhooks_in_flight,
        per_account=per_account,
        accounts_in_flight=accounts_in_flight,
    )
    cur = await conn.execute(query("claim"), params, prepare=True)
    rows = await cur.fetchall()
    jobs = []
    for id_, webhook, account, attempt, enabled, *job in rows:
        # The claim cancelled the others: their webhook was disabled.
        if enabled:
            event, stamp, data, url, secret, base, old, fmt, headers, slowdowns, delay = job
            jobs.append(
                Job(
                    id_,
                    webhook,
                    account,
                    attempt,
                    event,
                    stamp,
                    data,
                    url,
                    secret,
                    lease,
                    base,
                    old,
                    fmt,
                    headers,
                    slowdowns,
                    delay,
                )
            )
    return Claimed(jobs, len(rows))


class AttemptResult(TypedDict):
    """One attempt's result as outbox.record_v3() reads it."""

    id: int
    lease: str
    attempt: int
    started_at: str  # ISO 8601
    duration_ms: int
    response_status: int | None
    error: str | None
    outcome: str  # succeeded, failed (for good) or pending (to be retried)
    retry_in: float | None
    response_body: str | None
    # An answer of 429 let off: it does not use up a retry (CONTRACT section 19).
    slowdown: bool


def record_params(results: Sequence[AttemptResult]) -> dict[str, Any]:
    """The parameters of the ``record`` query: the whole batch as one JSON document."""
    return {"results": json.dumps(results)}


async def record(conn: Conn, results: Sequence[AttemptResult]) -> list[int]:
    """Store a batch of results; the webhooks of deliveries that failed for good."""
    cur = await conn.execute(query("record"), record_params(results), prepare=True)
    return [row[0] for row in await cur.fetchall()]


class Disabled(NamedTuple):
    webhook_id: int
    account_id: str
    reason: str


async def auto_disable(
    conn: Conn, webhook_ids: list[int], *, after_seconds: float, after_text: str
) -> list[Disabled]:
    """Disable those of the webhooks with no success for ``after_seconds`` (said as
    ``after_text`` in their reason); the ones disabled."""
    params = {"webhook_ids": webhook_ids, "after_seconds": after_seconds, "after_text": after_text}
    cur = await conn.execute(query("auto_disable"), params, prepare=True)
    return [Disabled(*row) for row in await cur.fetchall()]


async def next_due(conn: Conn) -> float | None:
    """Seconds until the earliest pending delivery is due (negative: overdue), or a
    rate-limited webhook's backlog may go on; None when nothing is pending."""
    cur = await conn.execute(query("next_due"), {"pace_ahead": PACE_AHEAD}, prepare=True)
    row = await cur.fetchone()
    return None if row is None else row[0]


async def wake_peers(conn: Conn) -> None:
    """Wake idle dispatchers: this one has a backlog."""
    await conn.execute(query("help"), prepare=False)


async def plan_once(conn: Conn) -> None:
    """Set up a dispatcher connection to keep one plan per statement (see replan)."""
    await conn.execute(query("dispatcher_session"))


async def commit_without_waiting(conn: Conn) -> None:
    """Set up the claims' connection not to wait for its commits to reach the disk."""
    await conn.execute(query("claim_session"))


async def replan(conn: Conn) -> None:
    """Drop the connection's plans, so the next runs plan for the tables as they are."""
    await conn.execute(query("replan"))


async def arm_doorbell(conn: Conn) -> bool:
    """Try the doorbell's lock; whether this session now holds it."""
    cur = await conn.execute(query("arm_doorbell"))
    row = await cur.fetchone()
    return row is not None and bool(row[0])


async def disarm_doorbell(conn: Conn) -> None:
    await conn.execute(query("disarm_doorbell"))


async def listen(conn: Conn) -> None:
    """Have NOTIFYs that wake dispatchers delivered to this connection."""
    await conn.execute(query("listen"))


async def ping(conn: Conn) -> None:
    await conn.execute(query("ping"))


class Backlog(NamedTuple):
    pending: int
    oldest_seconds: float | None  # since the oldest pending delivery was enqueued
    due: int  # pending and due now: waiting for a dispatcher
    oldest_due_seconds: float | None  # since the delivery due longest fell due


async def pending_stats(conn: Conn) -> Backlog:
    """How many deliveries are pending and due, and the age of the oldest of each."""
    cur = await conn.execute(query("pending_stats"))
    row = await cur.fetchone()
    assert row is not None
    return Backlog(*row)
