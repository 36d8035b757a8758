"""Operational events (contract 17) as the database writes them: one webhook.failing per
failing streak, one webhook.recovered after it, one delivery.failed per delivery that
fails for good, one webhook.disabled per automatic disable; and recover_v2 sending again
what an automatic disable cancelled."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from outbox import db, retention
from tests.conftest import SQL
from tests.db.helpers import HTTPS, claim, record

T0 = datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def attempts(
    sql: SQL, conn: psycopg.Connection[Any], outcome: str, *, count: int = 1, at: datetime = T0
) -> list[int]:
    """Emit ``count`` events, claim their deliveries and record one attempt of each,
    in one batch; ``outcome`` succeeded, pending (to be retried) or failed (for good)."""
    for _ in range(count):
        sql.emit()
    lease = uuid.uuid4()
    jobs = claim(conn, lease=lease, limit=count)
    assert len(jobs) == count
    failed = outcome != "succeeded"
    return record(
        conn,
        [
            {
                "id": job["id"],
                "lease": lease,
                "attempt": job["attempt"],
                "started": at + timedelta(milliseconds=i),
                "outcome": outcome,
                "status": 503 if failed else 200,
                "error": "HTTP 503" if failed else None,
                "retry_in": 60 if outcome == "pending" else None,
            }
            for i, job in enumerate(jobs)
        ],
    )


def kinds(sql: SQL) -> list[str]:
    return [kind for (kind,) in sql("SELECT kind FROM outbox.notifications ORDER BY id")]


class TestStreaks:
    def test_one_failing_per_streak_and_one_recovered_after_it(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Many failed attempts in several batches make one webhook.failing; the success
        that ends the streak one webhook.recovered; the next failure a new streak."""
        sql.webhook(HTTPS)
        attempts(sql, conn, "pending", count=3, at=T0)
        attempts(sql, conn, "pending", count=2, at=T0 + timedelta(seconds=1))
        assert kinds(sql) == ["webhook.failing"]
        attempts(sql, conn, "succeeded", count=2, at=T0 + timedelta(seconds=2))
        attempts(sql, conn, "succeeded", at=T0 + timedelta(seconds=3))
        assert kinds(sql) == ["webhook.failing", "webhook.recovered"]
        attempts(sql, conn, "pending", at=T0 + timedelta(seconds=4))
        assert kinds(sql) == ["webhook.failing", "webhook.recovered", "webhook.failing"]

    def test_a_webhook_that_starts_well_says_nothing(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Successes alone, first or later, make no notification at all."""
        sql.webhook(HTTPS)
        attempts(sql, conn, "succeeded", count=3)
        attempts(sql, conn, "succeeded", at=T0 + timedelta(seconds=1))
        assert kinds(sql) == []

    def test_a_late_older_result_changes_no_state(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A failure recorded after a newer success (an attempt that took long) is not a
        new streak."""
        sql.webhook(HTTPS)
        attempts(sql, conn, "succeeded", at=T0 + timedelta(seconds=10))
        attempts(sql, conn, "pending", at=T0)
        assert kinds(sql) == []

    def test_the_data_says_which_webhook_and_why(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """webhook.failing carries the webhook's account, id, name, URL, event and the
        reason; webhook.recovered the same with a NULL reason."""
        hook = sql.webhook(HTTPS, name="CRM sync")
        attempts(sql, conn, "pending", at=T0)
        attempts(sql, conn, "succeeded", at=T0 + timedelta(seconds=1))
        (failing, failing_data), (recovered, recovered_data) = sql(
            "SELECT account_id, data FROM outbox.notifications ORDER BY id"
        )
        assert failing == recovered == "acct_1"
        same = {
            "account_id": "acct_1",
            "webhook_id": hook,
            "webhook_name": "CRM sync",
            "url": HTTPS,
            "webhook_event": "lead.scored",
        }
        assert failing_data.items() >= (same | {"reason": "HTTP 503"}).items()
        assert recovered_data.items() >= (same | {"reason": None}).items()

    def test_two_sidecars_recording_at_once_write_one_failing(
        self, sql: SQL, conn: psycopg.Connection[Any], database_url: str
    ) -> None:
        """Two records of failures of the same webhook, in concurrent transactions: the
        second waits for the first's health row, sees its state, and writes nothing."""
        sql.webhook(HTTPS)
        sql.emit()
        sql.emit()
        lease = uuid.uuid4()
        first, second = claim(conn, lease=lease, limit=2)

        def result(job: dict[str, Any]) -> dict[str, Any]:
            return {"id": job["id"], "lease": lease, "attempt": 1, "started": T0,
                    "outcome": "pending", "error": "HTTP 503", "retry_in": 60}  # fmt: skip

        with psycopg.connect(database_url) as a, psycopg.connect(database_url) as b:
            record(a, [result(first)])  # a's transaction stays open, holding the row
            done = threading.Event()

            def other() -> None:
                record(b, [result(second)])
                b.commit()
                done.set()

            thread = threading.Thread(target=other)
            thread.start()
            assert not done.wait(0.5), "the second record did not wait for the first"
            a.commit()
            thread.join(30)
        assert done.is_set()
        assert kinds(sql) == ["webhook.failing"]


class TestDeliveryFailed:
    def test_one_per_delivery_that_fails_for_good(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A retry to come makes none; each delivery whose last retry failed makes one,
        naming the delivery and the reason."""
        hook = sql.webhook(HTTPS)
        attempts(sql, conn, "pending", count=2)
        assert kinds(sql) == ["webhook.failing"]
        sql("UPDATE outbox.deliveries SET next_attempt_at = now()")
        lease = uuid.uuid4()
        jobs = claim(conn, lease=lease)
        record(conn, [{"id": j["id"], "lease": lease, "attempt": j["attempt"],
                       "started": T0 + timedelta(seconds=1), "outcome": "failed",
                       "status": 500, "error": "HTTP 500"} for j in jobs])  # fmt: skip
        rows = sql(
            "SELECT data FROM outbox.notifications WHERE kind = 'delivery.failed' ORDER BY id"
        )
        assert sorted(data["delivery_id"] for (data,) in rows) == sorted(j["id"] for j in jobs)
        assert {(data["reason"], data["webhook_id"]) for (data,) in rows} == {("HTTP 500", hook)}
        assert kinds(sql).count("webhook.failing") == 1


class TestDisabled:
    def disable(self, sql: SQL, conn: psycopg.Connection[Any]) -> int:
        hook = sql.webhook(HTTPS)
        sql("UPDATE outbox.webhooks SET created_at = now() - interval '6 days'")
        failed = attempts(sql, conn, "failed")
        sql.emit()  # pending when the webhook is disabled
        params = {"webhook_ids": failed, "after_seconds": 5 * 86400, "after_text": "5 days"}
        (disabled,) = conn.execute(db.query("auto_disable"), params).fetchall()
        assert disabled[0] == hook
        return hook

    def test_an_automatic_disable_is_told_with_its_reason(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """webhook.disabled carries disabled_reason and the last failure's reason."""
        hook = self.disable(sql, conn)
        assert kinds(sql) == ["webhook.failing", "delivery.failed", "webhook.disabled"]
        data = sql.one("SELECT data FROM outbox.notifications WHERE kind = 'webhook.disabled'")
        reason = sql.one("SELECT disabled_reason FROM outbox.webhooks WHERE id = %s", (hook,))
        assert data["disabled_reason"] == reason and reason.startswith("disabled automatically")
        assert data["reason"] == "HTTP 503" and data["webhook_id"] == hook

    def test_a_disable_by_a_person_is_not_an_operational_event(self, sql: SQL) -> None:
        """Only the product's own disable is told: a person knows what they did."""
        hook = sql.webhook(HTTPS)
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        assert kinds(sql) == []

    def test_recover_sends_again_what_the_automatic_disable_cancelled(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """After enabling the webhook again, recover re-queues the failed delivery and the
        one the automatic disable cancelled, not one a person's disable cancelled."""
        hook = self.disable(sql, conn)
        assert sql("SELECT status, last_error FROM outbox.deliveries ORDER BY id") == [
            ("failed", "HTTP 503"),
            ("cancelled", "webhook disabled automatically"),
        ]
        sql("UPDATE outbox.webhooks SET enabled = true WHERE id = %s", (hook,))
        sql.emit()
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        sql("UPDATE outbox.webhooks SET enabled = true WHERE id = %s", (hook,))
        since = T0 - timedelta(days=1)
        requeued = conn.execute(
            db.query("webhook_recover"), {"webhook_id": hook, "since": since}
        ).fetchall()
        assert len(requeued) == 2
        assert sql("SELECT status, last_error FROM outbox.deliveries ORDER BY id") == [
            ("pending", "HTTP 503"),
            ("pending", "webhook disabled automatically"),
            ("cancelled", "webhook disabled"),
        ]


class TestSending:
    def test_claimed_once_then_sent_or_due_again(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A claimed notification is not claimed again under its lease; a failed attempt
        makes it due again; a result of an attempt taken over counts for nothing."""
        sql.webhook(HTTPS)
        attempts(sql, conn, "pending")
        (row,) = conn.execute(db.query("notifications_claim"), {"limit": 5, "lease_seconds": 60})
        note = db.notifications.Notification(*row)
        assert note.kind == "webhook.failing" and note.attempt == 1
        assert note.created_at.endswith("Z")
        assert (
            conn.execute(
                db.query("notifications_claim"), {"limit": 5, "lease_seconds": 60}
            ).fetchall()
            == []
        )

        def sent(attempt: int, error: str | None, retry_in: float) -> Any:
            params = {"id": note.id, "attempt": attempt, "error": error, "retry_in": retry_in}
            return conn.execute(db.query("notification_sent"), params).fetchone()

        assert sent(1, "connection refused", 0) == (True,)
        (again,) = conn.execute(db.query("notifications_claim"), {"limit": 5, "lease_seconds": 60})
        assert again[0] == note.id and again[4] == 2
        assert sent(1, None, 0) == (None,)  # the first attempt's late answer
        assert sent(2, None, 0) == (True,)
        assert sql.one("SELECT sent_at IS NOT NULL FROM outbox.notifications") is True
        assert (
            conn.execute(
                db.query("notifications_claim"), {"limit": 5, "lease_seconds": 0}
            ).fetchall()
            == []
        )


class TestRetention:
    def test_old_notifications_go_in_bounded_batches(
        self, sql: SQL, conn: psycopg.Connection[Any], database_url: str
    ) -> None:
        """Notifications older than the retention are deleted, sent or not, a batch of at
        most ``rows`` at a time; younger ones stay."""
        sql.webhook(HTTPS)
        for second in range(5):
            attempts(sql, conn, "pending", at=T0 + timedelta(seconds=2 * second))
            attempts(sql, conn, "succeeded", at=T0 + timedelta(seconds=2 * second + 1))
        assert len(kinds(sql)) == 10
        sql("UPDATE outbox.notifications SET created_at = now() - interval '2 days' WHERE id <= 7")

        async def prune() -> retention.Pruned:
            async with await db.connect(database_url) as c:
                return await retention.prune(c, 86400, rows=3)

        pruned = asyncio.run(prune())
        assert pruned.notifications == 7
        assert sql.one("SELECT min(id) FROM outbox.notifications") == 8
