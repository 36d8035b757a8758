"""Managing webhooks and replaying deliveries, shared by the CLI and the admin API.

The database enforces every rule; these functions turn its refusals into ``Invalid`` (a
rule broken) or ``LimitReached`` with the database's own words, and raise ``NotFound``
or ``Conflict`` for a webhook or delivery that is not there or not in a state to act on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg

from outbox import db, errors

__all__ = [
    "MASKED",
    "add",
    "delete",
    "emit",
    "get",
    "masked",
    "parse_since",
    "recover",
    "retry",
    "status",
    "update",
]

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


# Shown for the value of each of the webhook's own headers, which may be credentials.
MASKED = "***"


def masked(names: Iterable[str]) -> dict[str, str]:
    """A webhook's own headers as anyone but the receiver sees them: names only."""
    return dict.fromkeys(names, MASKED)


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
