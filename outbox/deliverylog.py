"""The delivery log: each delivery with the requests its attempts sent, as the API and
the settings page show it.

Requests are not stored: each is rebuilt from the event and the webhook as they are
now (the body in the webhook's format, the headers signed again), by the same code
(outbox.wire) that built them for the receiver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from outbox import db, errors, webhooks, wire

__all__ = [
    "ATTEMPTS_SHOWN",
    "BODY_SHOWN",
    "SIGNATURE_UNKNOWN",
    "Log",
    "deliveries",
    "delivery",
    "full_request_body",
    "render",
    "request_body",
    "sent_request",
]

# The delivery log shows at most this much of each request body; the whole body is one
# request away (``request_body``), so a page of events at the size limit stays small.
BODY_SHOWN = 8 * 1024

# The delivery log shows each delivery's newest attempts, this many at most: replays
# add attempts without end, and each shown one is signed again.
ATTEMPTS_SHOWN = 20


# Shown for a signature the delivery log cannot rebuild: the webhook (maybe its secret)
# changed after the attempt, and what it was signed with is not kept.
SIGNATURE_UNKNOWN = "(not shown: the webhook was changed after this attempt)"
_SIGNATURES = ("X-Webhook-Signature", "webhook-signature")


def sent_request(
    delivery: Mapping[str, Any], attempt: Mapping[str, Any], body: bytes | None = None
) -> dict[str, Any]:
    """The request of one attempt, rebuilt from the event as it was sent (the body is
    not stored twice; ``body`` is it when already rendered): method, url and headers.
    Signatures are computed again with the webhook's secret while the webhook is
    unchanged since the attempt; the secret itself is never part of it, and the
    webhook's own headers (as they are now) show their names with webhooks.MASKED for each
    value."""
    started_at: datetime = attempt["started_at"]
    # A secret being rotated out signed beside the current one until it expired.
    expires = delivery["wire_previous_secret_expires_at"]
    previous = delivery["wire_previous_secret"] if expires and expires > started_at else None
    headers = wire.headers(
        message_id=str(delivery["id"]),
        event=delivery["event"],
        attempt=attempt["attempt"],
        payload=request_body(delivery) if body is None else body,
        secret=delivery["wire_secret"],
        now=int(started_at.timestamp()),
        previous_secret=previous,
        extra=webhooks.masked(delivery["wire_header_names"]),
    )
    if delivery["wire_updated_at"] > started_at:
        for name in _SIGNATURES:
            if name in headers:
                headers[name] = SIGNATURE_UNKNOWN
    return {"method": "POST", "url": delivery["wire_url"], "headers": headers}


def request_body(delivery: Mapping[str, Any]) -> bytes:
    """The body every attempt of the delivery sent (in the webhook's format now)."""
    return wire.payload(
        delivery["wire_format"],
        delivery["event"],
        delivery["wire_timestamp"],
        delivery["wire_data"],
    )


@dataclass(frozen=True)
class Log:
    """Deliveries as read for the delivery log, not yet rendered (see ``render``)."""

    rows: list[dict[str, Any]]
    attempts: list[dict[str, Any]]


async def _log(conn: psycopg.AsyncConnection[Any], rows: list[dict[str, Any]]) -> Log:
    attempts = await db.webhooks.attempts(conn, [r["id"] for r in rows], ATTEMPTS_SHOWN)
    return Log(rows, attempts)


async def deliveries(
    conn: psycopg.AsyncConnection[Any],
    webhook_id: int,
    *,
    before: int | None,
    limit: int,
    status: str | None = None,
    since: datetime | None = None,
) -> Log:
    """Up to ``limit`` deliveries of the webhook, newest first, older than id ``before``;
    only those of ``status``, and created at or after ``since``, when given."""
    rows = await db.webhooks.delivery_page(
        conn, webhook_id, before=before, limit=limit, status=status, since=since
    )
    return await _log(conn, rows)


async def delivery(
    conn: psycopg.AsyncConnection[Any], delivery_id: int, account_id: str | None = None
) -> Log:
    """One delivery with its attempts; with ``account_id``, only if that account owns it."""
    row = await db.webhooks.delivery(conn, delivery_id, account_id)
    if row is None:
        raise errors.NotFound(f"delivery {delivery_id} not found")
    return await _log(conn, [row])


async def render(log: Log) -> list[dict[str, Any]]:
    """Each delivery with its ``request_body`` (at most BODY_SHOWN bytes of it) and
    ``attempt_log``: its newest ATTEMPTS_SHOWN attempts, oldest first, each with the
    ``request`` it sent and the answer it got.

    Rendering and signing a page of large events is tens of milliseconds of CPU, so
    this needs no database connection (the caller gives its back first) and lets the
    event loop go between deliveries: other tenants and deliveries never wait on it.
    (Not a thread: a busy thread makes the loop wait for the interpreter lock at every
    turn.) Each body is rendered once, however many attempts sent it.
    """
    by_delivery: dict[int, list[dict[str, Any]]] = {r["id"]: [] for r in log.rows}
    for attempt in log.attempts:
        # Attempts of rows left out of the page (the one that says there is more).
        shown_with = by_delivery.get(attempt.pop("delivery_id"))
        if shown_with is not None:
            shown_with.append(attempt)
    shown = []
    for row in log.rows:
        await asyncio.sleep(0)
        body = request_body(row)
        for attempt in by_delivery[row["id"]]:
            attempt["request"] = sent_request(row, attempt, body)
        visible = {k: v for k, v in row.items() if not k.startswith("wire_")}
        shown.append(
            visible
            | {
                # A cut may fall inside a character: its bytes are left out.
                "request_body": body[:BODY_SHOWN].decode("utf-8", "ignore"),
                "request_body_size": len(body),
                "request_body_truncated": len(body) > BODY_SHOWN,
                "attempt_log": by_delivery[row["id"]],
            }
        )
    return shown


async def full_request_body(
    conn: psycopg.AsyncConnection[Any], delivery_id: int, account_id: str | None = None
) -> bytes:
    """The whole body every attempt of the delivery sent, however large; with
    ``account_id``, only if that account owns the delivery."""
    row = await db.webhooks.delivery(conn, delivery_id, account_id)
    if row is None:
        raise errors.NotFound(f"delivery {delivery_id} not found")
    return request_body(row)
