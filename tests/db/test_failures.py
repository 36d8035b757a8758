"""What a customer sees of a failing endpoint: webhook_health kept by record, the status
view's retrying state, response bodies, and auto-disable (the auto_disable query)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox import db
from tests.conftest import SQL
from tests.db.helpers import HTTPS, claim, record

T0 = datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def attempt_once(
    sql: SQL, conn: psycopg.Connection[Any], outcome: str, *, started: datetime, **fields: Any
) -> list[int]:
    """Emit one event, claim its delivery and record one attempt of it."""
    sql.emit()
    lease = uuid.uuid4()
    (job,) = claim(conn, lease=lease)
    return record(
        conn,
        [
            {
                "id": job["id"],
                "lease": lease,
                "attempt": job["attempt"],
                "started": started,
                "outcome": outcome,
                **fields,
            }
        ],
    )


def health(sql: SQL, webhook: int) -> dict[str, Any]:
    with sql.conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT last_attempt_at, last_attempt_status, last_attempt_error, last_success_at"
            " FROM outbox.webhook_health WHERE webhook_id = %s",
            (webhook,),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def status(sql: SQL, webhook: int) -> dict[str, Any]:
    with sql.conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM outbox.webhook_status WHERE id = %s", (webhook,))
        row = cur.fetchone()
    assert row is not None
    return row


def auto_disable(
    conn: psycopg.Connection[Any], webhooks: list[int], after_seconds: float
) -> list[tuple[Any, ...]]:
    params = {"webhook_ids": webhooks, "after_seconds": after_seconds, "after_text": "5 days"}
    return conn.execute(db.query("auto_disable"), params).fetchall()


class TestHealth:
    def test_first_attempt_creates_the_row(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """A recorded failure gives its webhook a health row with the reason and no success."""
        hook = sql.webhook(HTTPS)
        attempt_once(sql, conn, "pending", started=T0, status=503, error="HTTP 503", retry_in=60)
        assert health(sql, hook) == {
            "last_attempt_at": T0,
            "last_attempt_status": "failed",
            "last_attempt_error": "HTTP 503",
            "last_success_at": None,
        }

    def test_success_clears_the_error_and_sets_last_success(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A newer success replaces a failure as the newest attempt and is the last success."""
        hook = sql.webhook(HTTPS)
        attempt_once(sql, conn, "failed", started=T0, status=503, error="HTTP 503")
        later = T0 + timedelta(minutes=1)
        attempt_once(sql, conn, "succeeded", started=later, status=200)
        assert health(sql, hook) == {
            "last_attempt_at": later,
            "last_attempt_status": "succeeded",
            "last_attempt_error": None,
            "last_success_at": later,
        }

    def test_an_older_result_recorded_late_moves_nothing_back(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A result older than the stored newest attempt changes neither it nor its status;
        an older success still does not replace a newer last success."""
        hook = sql.webhook(HTTPS)
        attempt_once(sql, conn, "succeeded", started=T0, status=200)
        attempt_once(sql, conn, "failed", started=T0 - timedelta(hours=1), error="timeout")
        assert health(sql, hook)["last_attempt_status"] == "succeeded"
        attempt_once(sql, conn, "succeeded", started=T0 - timedelta(hours=2), status=200)
        assert health(sql, hook) == {
            "last_attempt_at": T0,
            "last_attempt_status": "succeeded",
            "last_attempt_error": None,
            "last_success_at": T0,
        }

    def test_one_batch_keeps_its_newest_attempt_and_newest_success(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """In one batch, the newest attempt wins per webhook, and the newest success is kept
        even when a failure came after it."""
        hook = sql.webhook(HTTPS)
        other = sql.webhook(HTTPS, name="other")
        sql.emit()
        lease = uuid.uuid4()
        jobs = claim(conn, lease=lease)
        mine = [j for j in jobs if j["webhook_id"] == hook]
        (theirs,) = [j for j in jobs if j["webhook_id"] == other]
        sql.emit()
        lease2 = uuid.uuid4()
        more = claim(conn, lease=lease2)
        mine2 = next(j for j in more if j["webhook_id"] == hook)
        results = [
            {"id": mine[0]["id"], "lease": lease, "attempt": 1, "started": T0,
             "status": 200, "outcome": "succeeded"},
            {"id": mine2["id"], "lease": lease2, "attempt": 1,
             "started": T0 + timedelta(seconds=5), "status": 500, "error": "HTTP 500",
             "outcome": "pending", "retry_in": 60},
            {"id": theirs["id"], "lease": lease, "attempt": 1, "started": T0,
             "status": 204, "outcome": "succeeded"},
        ]  # fmt: skip
        record(conn, results)
        assert health(sql, hook) == {
            "last_attempt_at": T0 + timedelta(seconds=5),
            "last_attempt_status": "failed",
            "last_attempt_error": "HTTP 500",
            "last_success_at": T0,
        }
        assert health(sql, other)["last_success_at"] == T0

    def test_a_result_whose_lease_was_lost_is_not_counted(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A result that is not recorded (its lease was lost) leaves no health row."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        (job,) = claim(conn)
        record(conn, [{"id": job["id"], "lease": uuid.uuid4(), "attempt": 1, "started": T0,
                       "status": 200, "outcome": "succeeded"}])  # fmt: skip
        assert sql("SELECT * FROM outbox.webhook_health WHERE webhook_id = %s", (hook,)) == []

    def test_record_answers_webhooks_whose_deliveries_failed_for_good(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Only a last failed attempt makes record answer its webhook, not a retry."""
        hook = sql.webhook(HTTPS)
        assert attempt_once(sql, conn, "pending", started=T0, error="x", retry_in=60) == []
        sql("DELETE FROM outbox.deliveries")
        assert attempt_once(sql, conn, "failed", started=T0, error="x") == [hook]

    def test_response_body_is_stored_per_attempt(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """The receiver's answer is kept with its attempt; no answer is NULL."""
        sql.webhook(HTTPS)
        attempt_once(
            sql, conn, "failed", started=T0, status=503, error="HTTP 503",
            response_body='{"error": "maintenance until 11:00"}',
        )  # fmt: skip
        attempt_once(sql, conn, "failed", started=T0, error="connection refused")
        assert sql("SELECT response_body FROM outbox.delivery_attempts ORDER BY delivery_id") == [
            ('{"error": "maintenance until 11:00"}',),
            (None,),
        ]


class TestStatusView:
    def test_a_retrying_delivery_shows_while_the_last_finished_one_succeeded(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """After a success, a failing retry shows as retrying with its reason and when the
        next attempt is due, beside the last finished delivery's green status."""
        hook = sql.webhook(HTTPS)
        attempt_once(sql, conn, "succeeded", started=T0, status=200)
        now = datetime.now(UTC)
        attempt_once(sql, conn, "pending", started=now, status=503, error="HTTP 503",
                     retry_in=600)  # fmt: skip
        row = status(sql, hook)
        assert row["last_delivery_status"] == "succeeded"
        assert row["pending"] == 1 and row["retrying"] == 1
        assert row["last_attempt_status"] == "failed"
        assert row["last_attempt_error"] == "HTTP 503"
        assert row["last_attempt_at"] == now
        assert timedelta(seconds=590) < row["next_retry_at"] - now < timedelta(seconds=610)
        assert row["disabled_reason"] is None

    def test_no_seq_scan_on_deliveries(self, sql: SQL) -> None:
        """With 200,000 finished deliveries, one account's dashboard reads deliveries only
        through indexes."""
        sql(
            "INSERT INTO outbox.webhooks (account_id, name, url, event)"
            " SELECT 'acct_' || (i %% 20), 'hook ' || i, %s, 'lead.scored'"
            " FROM generate_series(1, 200) i",
            (HTTPS,),
        )
        sql(
            "INSERT INTO outbox.events (account_id, event, data)"
            " SELECT 'acct_1', 'lead.scored', '{}' FROM generate_series(1, 1000)"
        )
        sql(
            "INSERT INTO outbox.deliveries"
            " (event_id, webhook_id, status, attempts, created_at, finished_at)"
            " SELECT 1 + i % 1000, 1 + i % 200,"
            "  CASE WHEN i % 7 = 0 THEN 'failed' ELSE 'succeeded' END, 1,"
            "  now() - make_interval(secs => i), now() - make_interval(secs => i)"
            " FROM generate_series(1, 200000) i"
        )
        sql(
            "INSERT INTO outbox.deliveries (event_id, webhook_id, attempts, next_attempt_at)"
            " SELECT 1, 1 + i % 200, i % 2, now() + interval '1 minute'"
            " FROM generate_series(1, 400) i"
        )
        sql(
            "INSERT INTO outbox.webhook_health"
            " (webhook_id, last_attempt_at, last_attempt_status, last_success_at)"
            " SELECT id, now(), 'succeeded', now() FROM outbox.webhooks"
        )
        sql("ANALYZE")
        plan = "\n".join(
            line
            for (line,) in sql(
                "EXPLAIN SELECT * FROM outbox.webhook_status WHERE account_id = 'acct_3'"
            )
        )
        assert "deliveries" in plan
        assert not [
            line for line in plan.splitlines() if "Seq Scan" in line and "deliveries" in line
        ], plan
        # The API's and CLI's query adds the next retry's attempt number: indexes too.
        query = db.query("webhook_status").replace("%(account_id)s", "'acct_3'")
        plan = "\n".join(line for (line,) in sql("EXPLAIN " + query))
        assert not [
            line for line in plan.splitlines() if "Seq Scan" in line and "deliveries" in line
        ], plan


class TestAutoDisable:
    def fail_for_good(self, sql: SQL, conn: psycopg.Connection[Any]) -> list[int]:
        return attempt_once(sql, conn, "failed", started=datetime.now(UTC), status=503,
                            error="HTTP 503")  # fmt: skip

    def test_a_webhook_that_never_succeeded_is_disabled_after_the_time(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Never successful and older than the setting: disabled, with the time and
        "never" in the reason, and its pending deliveries cancelled."""
        hook = sql.webhook(HTTPS)
        sql("UPDATE outbox.webhooks SET created_at = now() - interval '6 days'")
        failed = self.fail_for_good(sql, conn)
        sql.emit()
        (disabled,) = auto_disable(conn, failed, 5 * 86400)
        assert disabled[0] == hook and disabled[1] == "acct_1"
        reason = disabled[2]
        assert reason.startswith("disabled automatically at 20")
        assert reason.endswith(
            "deliveries kept failing and none succeeded for 5 days (last success: never)"
        )
        row = status(sql, hook)
        assert row["enabled"] is False and row["disabled_reason"] == reason
        assert (
            sql.one("SELECT status FROM outbox.deliveries ORDER BY id DESC LIMIT 1") == "cancelled"
        )

    def test_the_last_success_is_named(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """A webhook whose last success is older than the setting is disabled, and the
        reason gives that success's time."""
        hook = sql.webhook(HTTPS)
        attempt_once(sql, conn, "succeeded", started=T0, status=200)
        failed = self.fail_for_good(sql, conn)
        (disabled,) = auto_disable(conn, failed, 3600)
        assert disabled[0] == hook
        assert disabled[2].endswith("(last success: 2026-11-20T10:00:00Z)")

    def test_a_recent_success_or_a_new_webhook_is_left_alone(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A webhook created or last successful within the setting stays enabled."""
        new = sql.webhook(HTTPS)
        failed = self.fail_for_good(sql, conn)
        assert auto_disable(conn, failed, 3600) == []
        attempt_once(sql, conn, "succeeded", started=datetime.now(UTC), status=200)
        sql("UPDATE outbox.webhooks SET created_at = now() - interval '6 days'")
        failed = self.fail_for_good(sql, conn)
        assert auto_disable(conn, failed, 3600) == []
        assert status(sql, new)["enabled"] is True

    def test_enabling_clears_the_reason(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """Enabling a webhook that was disabled for failing clears disabled_reason."""
        hook = sql.webhook(HTTPS)
        sql("UPDATE outbox.webhooks SET created_at = now() - interval '2 hours'")
        assert auto_disable(conn, self.fail_for_good(sql, conn), 3600)
        sql("UPDATE outbox.webhooks SET enabled = true WHERE id = %s", (hook,))
        row = status(sql, hook)
        assert row["enabled"] is True and row["disabled_reason"] is None

    def test_an_already_disabled_webhook_keeps_its_reason(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A webhook a person disabled is not disabled again with a reason."""
        hook = sql.webhook(HTTPS)
        sql("UPDATE outbox.webhooks SET created_at = now() - interval '2 hours'")
        failed = self.fail_for_good(sql, conn)
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        assert auto_disable(conn, failed, 3600) == []
        assert status(sql, hook)["disabled_reason"] is None
