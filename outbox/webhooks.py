"""Managing webhooks, shared by the CLI and the admin API.

The database enforces every rule; these functions turn its refusals into
``Invalid`` (a rule broken) or ``LimitReached`` with the database's own words.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from outbox import db, errors, wire

__all__ = [
    "MASKED",
    "Log",
    "add",
    "delete",
    "deliveries",
    "delivery",
    "emit",
    "full_request_body",
    "get",
    "masked",
    "parse_since",
    "recover",
    "render",
    "request_body",
    "retry",
    "sent_request",
    "status",
    "update",
]

# The delivery log shows at most this much of each request body; the whole body is one
# request away (``request_body``), so a page of events at the size limit stays small.
BODY_SHOWN = 8 * 1024

# The delivery log shows each delivery's newest attempts, this many at most: replays
# add attempts without end, and each shown one is signed again.
ATTEMPTS_SHOWN = 20

# Raised by outbox.webhooks_guard() when an account already has 10 webhooks.
LIMIT_SQLSTATE = "OB409"


@asynccontextmanager
async def _rules() -> AsyncIterator[None]:
    try:
        yield
    except psycopg.errors.CheckViolation as exc:
        raise errors.Invalid(exc.diag.message_primary or str(exc)) from None
    except psycopg.errors.NotNullViolation as exc:
        raise errors.Invalid(f"{exc.diag.column_name} is required") from None
    except psycopg.errors.InvalidTextRepresentation as exc:
        raise errors.Invalid(exc.diag.message_primary or str(exc)) from None
    except psycopg.Error as exc:
        if exc.sqlstate == LIMIT_SQLSTATE:
            raise errors.LimitReached(exc.diag.message_primary or str(exc)) from None
        raise


async def emit(conn: psycopg.AsyncConnection[Any], account_id: str, event: str, data: str) -> int:
    async with _rules():
        return await db.webhooks.emit(conn, account_id, event, data)


async def add(conn: psycopg.AsyncConnection[Any], **fields: Any) -> int:
    """A new webhook from account_id, name, url and event, and optionally secret,
    enabled, format, headers and rate_limit; other fields are ignored."""
    async with _rules():
        return await db.webhooks.add(
            conn,
            account_id=fields["account_id"],
            name=fields["name"],
            url=fields["url"],
            event=fields["event"],
            secret=fields.get("secret"),
            enabled=fields.get("enabled", True),
            format=fields.get("format"),
            headers=fields.get("headers"),
            rate_limit=fields.get("rate_limit"),
        )


async def update(conn: psycopg.AsyncConnection[Any], webhook_id: int, **fields: Any) -> None:
    """Change the given fields; ``secret=None`` removes the secret and
    ``rate_limit=None`` the rate limit, absent leaves them.

    ``end_secret_overlap=True`` stops a rotated-out secret from signing now rather than
    24 hours after the change. ``headers`` sets the headers it names, or removes those
    given None, and leaves the others; ``clear_headers=True`` removes all of them first.
    Other fields are ignored.
    """
    async with _rules():
        found = await db.webhooks.update(
            conn,
            webhook_id,
            name=fields.get("name"),
            url=fields.get("url"),
            event=fields.get("event"),
            enabled=fields.get("enabled"),
            format=fields.get("format"),
            set_secret="secret" in fields,
            secret=fields.get("secret"),
            end_secret_overlap=fields.get("end_secret_overlap", False),
            headers=fields.get("headers"),
            clear_headers=fields.get("clear_headers", False),
            set_rate_limit="rate_limit" in fields,
            rate_limit=fields.get("rate_limit"),
        )
    if not found:
        raise errors.NotFound(f"webhook {webhook_id} not found")


async def delete(conn: psycopg.AsyncConnection[Any], webhook_id: int) -> None:
    if not await db.webhooks.delete(conn, webhook_id):
        raise errors.NotFound(f"webhook {webhook_id} not found")


async def get(conn: psycopg.AsyncConnection[Any], webhook_id: int) -> dict[str, Any]:
    row = await db.webhooks.get(conn, webhook_id)
    if row is None:
        raise errors.NotFound(f"webhook {webhook_id} not found")
    return row


async def status(
    conn: psycopg.AsyncConnection[Any], account_id: str | None = None
) -> list[dict[str, Any]]:
    """Each webhook with its status fields (the outbox.webhook_status view)."""
    return await db.webhooks.status(conn, account_id)


# Shown for a signature the delivery log cannot rebuild: the webhook (maybe its secret)
# changed after the attempt, and what it was signed with is not kept.
SIGNATURE_UNKNOWN = "(not shown: the webhook was changed after this attempt)"
_SIGNATURES = ("X-Webhook-Signature", "webhook-signature")
# Shown for the value of each of the webhook's own headers, which may be credentials.
MASKED = "***"


def masked(names: Iterable[str]) -> dict[str, str]:
    """A webhook's own headers as anyone but the receiver sees them: names only."""
    return dict.fromkeys(names, MASKED)


def sent_request(
    delivery: Mapping[str, Any], attempt: Mapping[str, Any], body: bytes | None = None
) -> dict[str, Any]:
    """The request of one attempt, rebuilt from the event as it was sent (the body is
    not stored twice; ``body`` is it when already rendered): method, url and headers.
    Signatures are computed again with the webhook's secret while the webhook is
    unchanged since the attempt; the secret itself is never part of it, and the
    webhook's own headers (as they are now) show their names with MASKED for each
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
        extra=masked(delivery["wire_header_names"]),
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


async def retry(
    conn: psycopg.AsyncConnection[Any], delivery_id: int, account_id: str | None = None
) -> None:
    """Re-queue a finished delivery (succeeded, failed or cancelled) as a new series of
    attempts with the same id. With ``account_id``, only that account's deliveries."""
    replayed = await db.webhooks.replay(conn, delivery_id, account_id)
    if replayed is None:
        raise errors.NotFound(f"delivery {delivery_id} not found")
    if not replayed.requeued:
        if replayed.status == "pending":
            raise errors.Conflict(
                f"delivery {delivery_id} is still pending; only finished ones replay"
            )
        assert not replayed.enabled
        raise errors.Conflict(
            f"delivery {delivery_id} belongs to a disabled webhook; enable it first"
        )
    await db.webhooks.wake(conn)


async def recover(conn: psycopg.AsyncConnection[Any], webhook_id: int, since: datetime) -> int:
    """Re-queue every delivery of the webhook that failed at or after ``since``; how many."""
    webhook = await get(conn, webhook_id)
    if not webhook["enabled"]:
        raise errors.Conflict(f"webhook {webhook_id} is disabled; enable it first")
    count = await db.webhooks.recover(conn, webhook_id, since)
    if count:
        await db.webhooks.wake(conn)
    return count


def parse_since(value: Any) -> datetime:
    """An ISO 8601 / RFC 3339 time with its offset: ``2026-11-27T10:00:00Z``."""
    if not isinstance(value, str):
        raise errors.Invalid("since is required: an ISO 8601 time, e.g. 2026-11-27T10:00:00Z")
    try:
        since = datetime.fromisoformat(value.strip().upper())
    except ValueError:
        since = None
    if since is None or since.tzinfo is None:
        raise errors.Invalid(
            f"since must be an ISO 8601 time with a UTC offset, e.g. 2026-11-27T10:00:00Z, "
            f"not {value!r}"
        )
    return since
