"""Helpers shared by the database tests: raising checks, claim/record wrappers, catalogs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox import db
from outbox.db.deliveries import AttemptResult
from outbox.events import EVENTS as CATALOGUE

# The catalogue the database enforces is outbox.event_names(); test_events.py pins
# that it is this one.
EVENTS = tuple(CATALOGUE)

HTTPS = "https://hooks.example.com/in"


@contextmanager
def raises(
    error: type[psycopg.Error], message: str | None = None, sqlstate: str | None = None
) -> Iterator[pytest.ExceptionInfo[psycopg.Error]]:
    """Expect a Postgres error of this class, with this exact primary message."""
    with pytest.raises(error) as info:
        yield info
    if message is not None:
        actual = info.value.diag.message_primary
        assert actual == message, f"{actual!r} != {message!r}"
    if sqlstate is not None:
        assert info.value.sqlstate == sqlstate, info.value.sqlstate


def claim(
    conn: psycopg.Connection[Any],
    *,
    limit: int = 10,
    per_webhook: int = 1000,
    full: Sequence[int] = (),
    busy: dict[int, int] | None = None,
    per_account: int = 1000,
    full_accounts: Sequence[str] = (),
    busy_accounts: dict[str, int] | None = None,
    lease_seconds: float = 60,
    lease: uuid.UUID | None = None,
    pace_ahead: float = db.deliveries.PACE_AHEAD,
) -> list[dict[str, Any]]:
    """Run the dispatcher's claim query with the parameters its claim builds, on a
    test's own (blocking) connection, every row as a dict.

    ``full`` webhooks are given a full share in flight; ``busy`` ones their count;
    rate-limited webhooks get the attempts that may start within ``pace_ahead``."""
    webhooks = {w: per_webhook for w in full} | (busy or {})
    accounts = {a: per_account for a in full_accounts} | (busy_accounts or {})
    params = db.deliveries.claim_params(
        limit=limit,
        lease=str(lease or uuid.uuid4()),
        lease_seconds=lease_seconds,
        per_webhook=per_webhook,
        webhooks_in_flight=webhooks,
        per_account=per_account,
        accounts_in_flight=accounts,
        pace_ahead=pace_ahead,
    )
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(db.query("claim"), params)
        return cur.fetchall()


def record(
    conn: psycopg.Connection[Any],
    results: Sequence[dict[str, Any]],
) -> list[int]:
    """Run the record query with its parameters built as the dispatcher's record does.

    Each result: id, lease, attempt, started (datetime), duration_ms, status, error,
    outcome, retry_in, response_body, slowdown. Answers the webhooks whose deliveries
    failed for good.
    """
    rows: list[AttemptResult] = [
        {
            "id": r["id"],
            "lease": str(r["lease"]),
            "attempt": r["attempt"],
            "started_at": (r.get("started") or datetime.now().astimezone()).isoformat(),
            "duration_ms": r.get("duration_ms", 12),
            "response_status": r.get("status"),
            "error": r.get("error"),
            "outcome": r["outcome"],
            "retry_in": r.get("retry_in"),
            "response_body": r.get("response_body"),
            "slowdown": r.get("slowdown", False),
        }
        for r in results
    ]
    params = db.deliveries.record_params(rows)
    return [row[0] for row in conn.execute(db.query("record"), params).fetchall()]
