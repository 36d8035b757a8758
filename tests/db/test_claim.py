"""The dispatcher's queries: claim (lease due deliveries), record (store results), next_due."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, LiteralString

import psycopg
import pytest

from outbox import db, dispatcher
from outbox.config import Settings
from outbox.dispatcher import CLAIMS_SETUP, RECORDS_SETUP, Connection
from tests.conftest import SQL
from tests.db.helpers import HTTPS, claim, record

SECRET = "whsec_test_secret_0123"


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The dispatcher's side: an autocommit connection of its own."""
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def emit_many(sql: SQL, n: int, account: str = "acct_1", event: str = "lead.scored") -> None:
    sql(
        "INSERT INTO outbox.events (account_id, event, data)"
        " SELECT %s, %s, jsonb_build_object('n', n) FROM generate_series(1, %s) n",
        (account, event, n),
    )


def seconds_ahead(sql: SQL, delivery: int) -> float:
    """Seconds until the delivery falls due: its next attempt, or the end of its lease."""
    return float(
        sql.one(
            "SELECT extract(epoch FROM greatest(next_attempt_at, leased_until) - now())"
            " FROM outbox.deliveries WHERE id = %s",
            (delivery,),
        )
    )


def row(sql: SQL, delivery: int) -> dict[str, Any]:
    cur = sql.conn.execute(
        "SELECT status, attempts, last_error, last_response_status, finished_at, lease,"
        " next_attempt_at FROM outbox.deliveries WHERE id = %s",
        (delivery,),
    )
    assert cur.description is not None
    names = [c.name for c in cur.description]
    values = cur.fetchone()
    assert values is not None
    return dict(zip(names, values, strict=True))


def attempts(sql: SQL) -> list[tuple[Any, ...]]:
    return sql(
        "SELECT delivery_id, attempt, duration_ms, response_status, error"
        " FROM outbox.delivery_attempts ORDER BY delivery_id, attempt"
    )


def make_due(sql: SQL, delivery: int | None = None) -> None:
    """Let leases run out: as if the holder had crashed."""
    sql(
        "UPDATE outbox.deliveries SET next_attempt_at = now() - interval '1 second',"
        " leased_until = now() - interval '1 second'"
        " WHERE status = 'pending' AND (%s::bigint IS NULL OR id = %s)",
        (delivery, delivery),
    )


# What one attempt needs from a claimed row (the claim may return more).
JOB_KEYS = {"id", "webhook_id", "attempt", "enabled", "event", "timestamp", "data", "url", "secret"}


class TestClaim:
    def test_claim_returns_what_an_attempt_needs(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A claimed row carries id, webhook, attempt number, event, UTC timestamp, data, url
        and secret."""
        hook = sql.webhook(HTTPS, secret=SECRET)
        event_id = sql.one(
            "SELECT outbox.emit('acct_1', 'lead.scored', '{\"lead\": {\"id\": 42}}',"
            " '2026-11-27 13:34:56.789+01')"
        )
        delivery = sql.one("SELECT id FROM outbox.deliveries WHERE event_id = %s", (event_id,))
        conn.execute("SET TimeZone = 'America/New_York'")
        rows = claim(conn)
        assert len(rows) == 1
        assert {k: v for k, v in rows[0].items() if k in JOB_KEYS} == {
            "id": delivery,
            "webhook_id": hook,
            "attempt": 1,
            "enabled": True,
            "event": "lead.scored",
            "timestamp": "2026-11-27T12:34:56.789Z",
            "data": rows[0]["data"],
            "url": HTTPS,
            "secret": SECRET,
        }
        assert json.loads(rows[0]["data"]) == {"lead": {"id": 42}}

    def test_claim_leases_the_rows(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """Claimed rows get the claim's lease and fall due again lease_seconds later."""
        sql.webhook(HTTPS)
        for _ in range(3):
            sql.emit()
        lease = uuid.uuid4()
        rows = claim(conn, lease=lease, lease_seconds=30)
        assert sorted(r["id"] for r in rows) == [1, 2, 3]
        for r in rows:
            state = row(sql, r["id"])
            assert state["lease"] == lease
            assert state["status"] == "pending"
            assert state["attempts"] == 0
            assert 28 < seconds_ahead(sql, r["id"]) <= 30

    def test_a_second_claim_does_not_get_leased_rows(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """While the lease runs, no other claim returns the row."""
        sql.webhook(HTTPS)
        sql.emit()
        sql.emit()
        assert len(claim(conn)) == 2
        assert claim(conn) == []
        sql.emit()
        assert [r["id"] for r in claim(conn)] == [3]

    def test_a_claim_writes_no_index_entries(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """The claim changes only columns no index holds, so each claimed row's new
        version is a HOT update: no new entry in any of the table's indexes."""
        sql.webhook(HTTPS)
        for _ in range(5):
            sql.emit()
        with conn.transaction():
            assert len(claim(conn)) == 5
            hot = conn.execute(
                "SELECT pg_stat_get_xact_tuples_hot_updated('outbox.deliveries'::regclass),"
                " pg_stat_get_xact_tuples_updated('outbox.deliveries'::regclass)"
            ).fetchone()
        assert hot == (5, 5)

    def test_claims_of_both_versions_skip_each_others_rows(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """While a deploy rolls, sidecars of the previous release call claim_v1 beside
        new ones calling claim_v2: neither takes a row the other holds."""
        sql.webhook(HTTPS)
        sql.emit()
        sql.emit()
        old = (
            "SELECT id FROM outbox.claim_v1(%s, %s, gen_random_uuid(), 60, 100, '{}', '{}',"
            " '{}', 100, '{}', '{}', '{}')"
        )
        assert [r["id"] for r in claim(conn, limit=1)] == [1]
        assert conn.execute(old, (10, 20)).fetchall() == [(2,)]
        assert conn.execute(old, (10, 20)).fetchall() == []
        assert claim(conn) == []
        make_due(sql)
        assert sorted(r["id"] for r in claim(conn)) == [1, 2]

    def test_an_expired_lease_is_claimed_again_as_the_same_attempt(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A row whose holder never recorded a result is claimed again, still attempt 1."""
        sql.webhook(HTTPS)
        sql.emit()
        first = claim(conn)
        make_due(sql)
        second = claim(conn)
        assert [r["id"] for r in second] == [r["id"] for r in first]
        assert second[0]["attempt"] == 1

    def test_not_due_and_finished_rows_are_not_claimed(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Only pending rows whose next_attempt_at has come are claimed."""
        sql.webhook(HTTPS)
        for _ in range(5):
            sql.emit()
        sql("UPDATE outbox.deliveries SET next_attempt_at = now() + interval '1 hour' WHERE id = 1")
        sql("UPDATE outbox.deliveries SET status = 'succeeded', finished_at = now() WHERE id = 2")
        sql("UPDATE outbox.deliveries SET status = 'failed', finished_at = now() WHERE id = 3")
        sql("UPDATE outbox.deliveries SET status = 'cancelled', finished_at = now() WHERE id = 4")
        assert [r["id"] for r in claim(conn)] == [5]

    def test_limit_and_oldest_first(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """A claim takes at most `limit` rows, the longest-due first."""
        sql.webhook(HTTPS)
        emit_many(sql, 25)
        sql(
            "UPDATE outbox.deliveries SET next_attempt_at = now() - make_interval(secs => 100 - id)"
        )
        rows = claim(conn, limit=10)
        assert sorted(r["id"] for r in rows) == list(range(1, 11))

    def test_claim_uses_the_current_url_and_secret(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """An edit of url or secret applies to attempts claimed after it."""
        hook = sql.webhook(HTTPS, secret=SECRET)
        sql.emit()
        sql(
            "UPDATE outbox.webhooks SET url = 'https://new.example.com/x', secret = NULL"
            " WHERE id = %s",
            (hook,),
        )
        rows = claim(conn)
        assert [(r["url"], r["secret"]) for r in rows] == [("https://new.example.com/x", None)]

    def test_deleted_webhook_has_nothing_to_claim(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """After a webhook is deleted no attempt of it is claimed."""
        hook = sql.webhook(HTTPS)
        keep = sql.webhook(HTTPS)
        sql.emit()
        sql("DELETE FROM outbox.webhooks WHERE id = %s", (hook,))
        assert [r["webhook_id"] for r in claim(conn)] == [keep]


class TestShare:
    def test_per_webhook_share_caps_one_claim(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """With 20 due rows of one webhook and per_webhook=8, a claim takes 8."""
        sql.webhook(HTTPS)
        emit_many(sql, 20)
        assert len(claim(conn, limit=20, per_webhook=8)) == 8

    def test_busy_webhook_gets_only_what_is_left_of_its_share(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A webhook with 5 attempts in flight and a share of 8 gets 3 more."""
        hook = sql.webhook(HTTPS)
        emit_many(sql, 20)
        rows = claim(conn, limit=20, per_webhook=8, busy={hook: 5})
        assert len(rows) == 3

    def test_share_leaves_room_for_other_webhooks(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Two webhooks with 20 due rows each get 8 each, not 16 for the first."""
        a = sql.webhook(HTTPS)
        b = sql.webhook(HTTPS)
        emit_many(sql, 20)
        rows = claim(conn, limit=20, per_webhook=8, busy={b: 6})
        assert Counter(r["webhook_id"] for r in rows) == {a: 8, b: 2}

    def test_full_webhooks_are_skipped(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """A webhook listed as full gets nothing; the others are still served."""
        a = sql.webhook(HTTPS, event="lead.scored")
        b = sql.webhook(HTTPS, event="lead.created")
        emit_many(sql, 5, event="lead.scored")
        emit_many(sql, 5, event="lead.created")
        rows = claim(conn, limit=20, per_webhook=8, full=[a])
        assert Counter(r["webhook_id"] for r in rows) == {b: 5}
        assert (
            sql.one(
                "SELECT count(*) FROM outbox.deliveries WHERE webhook_id = %s AND lease IS NULL",
                (a,),
            )
            == 5
        )

    def test_one_accounts_webhooks_together_get_only_the_accounts_share(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Ten webhooks of one account, with 80 deliveries due, get 32 of 64 slots
        between them (the account's share at OUTBOX_CONCURRENCY=64); another
        account's deliveries, due later, get the rest."""
        settings = Settings(concurrency=64)
        hooks = [sql.webhook(HTTPS, account="acct_a") for _ in range(10)]
        other = sql.webhook(HTTPS, account="acct_b")
        emit_many(sql, 8, account="acct_a")  # 80 deliveries, 8 per webhook
        emit_many(sql, 5, account="acct_b")
        rows = claim(
            conn,
            limit=64,
            per_webhook=settings.per_webhook_limit,
            per_account=settings.per_account_limit,
        )
        by_account = Counter(r["account_id"] for r in rows)
        assert by_account == {"acct_a": 32, "acct_b": 5}
        by_webhook = Counter(r["webhook_id"] for r in rows)
        assert by_webhook[other] == 5
        assert all(by_webhook[hook] <= settings.per_webhook_limit for hook in hooks)

    def test_busy_account_gets_only_what_is_left_of_its_share(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """An account with 3 attempts in flight and a share of 4 gets 1 more, even on a
        webhook of its that has none in flight."""
        a = sql.webhook(HTTPS, account="acct_a")
        emit_many(sql, 10, account="acct_a")
        rows = claim(conn, limit=20, per_webhook=8, per_account=4, busy_accounts={"acct_a": 3})
        assert [r["webhook_id"] for r in rows] == [a]

    def test_full_accounts_are_skipped(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """An account listed as full gets nothing, and its rows stay unleased; other
        accounts are served."""
        sql.webhook(HTTPS, account="acct_a")
        b = sql.webhook(HTTPS, account="acct_b")
        emit_many(sql, 5, account="acct_a")
        emit_many(sql, 5, account="acct_b")
        rows = claim(conn, limit=20, per_webhook=8, per_account=4, full_accounts=["acct_a"])
        assert Counter(r["webhook_id"] for r in rows) == {b: 4}
        assert sql.one("SELECT count(*) FROM outbox.deliveries WHERE lease IS NULL") == 6

    def test_the_accounts_share_counts_only_rows_within_their_webhooks_share(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A backlog on one webhook beyond its share does not use up the account's share:
        the account's other webhook, due later, still gets its rows."""
        a = sql.webhook(HTTPS, account="acct_a", event="lead.created")
        b = sql.webhook(HTTPS, account="acct_a", event="lead.scored")
        emit_many(sql, 10, account="acct_a", event="lead.created")
        emit_many(sql, 10, account="acct_a", event="lead.scored")
        rows = claim(conn, limit=20, per_webhook=2, per_account=4)
        assert Counter(r["webhook_id"] for r in rows) == {a: 2, b: 2}

    def test_concurrent_claimers_never_share_a_row(self, sql: SQL, database_url: str) -> None:
        """Four claimers looping over 2,000 due deliveries claim each exactly once."""
        for i in range(10):
            sql.webhook(HTTPS, name=f"h{i}")
        emit_many(sql, 200)
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 2000
        barrier = threading.Barrier(4, timeout=30)

        def worker(_: int) -> dict[int, uuid.UUID]:
            got: dict[int, uuid.UUID] = {}
            with psycopg.connect(database_url, autocommit=True) as c:
                barrier.wait()
                while True:
                    lease = uuid.uuid4()
                    rows = claim(c, limit=10, lease=lease)
                    for r in rows:
                        assert r["id"] not in got
                        got[r["id"]] = lease
                    if rows:
                        continue
                    left = c.execute(
                        "SELECT count(*) FROM outbox.deliveries"
                        " WHERE status = 'pending' AND next_attempt_at <= now()"
                        " AND (leased_until IS NULL OR leased_until <= now())"
                    ).fetchone()
                    if left == (0,):
                        return got

        with ThreadPoolExecutor(4) as pool:
            claimed = list(pool.map(worker, range(4)))
        total = sum(len(c) for c in claimed)
        union: dict[int, uuid.UUID] = {}
        for c in claimed:
            union.update(c)
        assert total == 2000
        assert len(union) == 2000
        # Every row holds the lease of the one claimer that got it.
        held = dict(sql("SELECT id, lease FROM outbox.deliveries"))
        assert held == union


def result(job: dict[str, Any], lease: uuid.UUID, **fields: Any) -> dict[str, Any]:
    return {"id": job["id"], "lease": lease, "attempt": job["attempt"], **fields}


class TestRecord:
    def test_failure_with_the_right_lease_is_recorded(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A final failure sets status, attempts, error, response status, finished_at and
        adds an attempt row."""
        sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        (job,) = claim(conn, lease=lease)
        started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        record(
            conn,
            [
                result(
                    job,
                    lease,
                    started=started,
                    duration_ms=321,
                    status=503,
                    error="HTTP 503",
                    outcome="failed",
                )
            ],
        )
        state = row(sql, job["id"])
        assert state["status"] == "failed"
        assert state["attempts"] == 1
        assert state["last_error"] == "HTTP 503"
        assert state["last_response_status"] == 503
        assert state["finished_at"] is not None
        assert state["lease"] is None
        assert sql(
            "SELECT delivery_id, attempt, started_at, duration_ms, response_status, error"
            " FROM outbox.delivery_attempts"
        ) == [(job["id"], 1, started, 321, 503, "HTTP 503")]
        assert sql.one("SELECT finished_at > now() - interval '1 minute' FROM outbox.deliveries")

    def test_success_is_recorded(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """A 2xx result finishes the delivery as succeeded with no error."""
        sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        (job,) = claim(conn, lease=lease)
        record(conn, [result(job, lease, status=204, outcome="succeeded")])
        state = row(sql, job["id"])
        assert (state["status"], state["attempts"], state["last_error"]) == ("succeeded", 1, None)
        assert state["last_response_status"] == 204
        assert state["finished_at"] is not None
        assert attempts(sql) == [(job["id"], 1, 12, 204, None)]

    def test_result_without_response_is_recorded(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A connection error (no HTTP status) stores NULL as the response status."""
        sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        (job,) = claim(conn, lease=lease)
        record(conn, [result(job, lease, error="connection refused", outcome="failed")])
        state = row(sql, job["id"])
        assert (state["status"], state["last_error"], state["last_response_status"]) == (
            "failed",
            "connection refused",
            None,
        )
        assert attempts(sql) == [(job["id"], 1, 12, None, "connection refused")]

    def test_retry_schedules_the_next_attempt(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Outcome 'pending' with retry_in=5 keeps it pending, due about 5 s from now."""
        sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        (job,) = claim(conn, lease=lease, lease_seconds=60)
        record(
            conn,
            [result(job, lease, status=500, error="HTTP 500", outcome="pending", retry_in=5)],
        )
        state = row(sql, job["id"])
        assert (state["status"], state["attempts"], state["finished_at"], state["lease"]) == (
            "pending",
            1,
            None,
            None,
        )
        assert state["last_error"] == "HTTP 500"
        assert 4 < seconds_ahead(sql, job["id"]) <= 5
        # The next claim (once due) is attempt 2.
        make_due(sql)
        assert [r["attempt"] for r in claim(conn)] == [2]

    def test_stale_lease_changes_nothing(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """A result from a claim whose row was claimed again is ignored; the new holder wins."""
        sql.webhook(HTTPS)
        sql.emit()
        old, new = uuid.uuid4(), uuid.uuid4()
        (job,) = claim(conn, lease=old)
        make_due(sql)
        (again,) = claim(conn, lease=new, lease_seconds=60)
        before = row(sql, job["id"])
        record(conn, [result(job, old, status=200, outcome="succeeded")])
        assert row(sql, job["id"]) == before
        assert before["lease"] == new
        assert attempts(sql) == []
        record(conn, [result(again, new, status=503, error="HTTP 503", outcome="failed")])
        assert row(sql, job["id"])["status"] == "failed"
        assert attempts(sql) == [(job["id"], 1, 12, 503, "HTTP 503")]

    def test_a_result_is_recorded_once(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """Writing the same result twice (a retried write) records it only once."""
        sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        (job,) = claim(conn, lease=lease)
        res = result(job, lease, status=500, error="HTTP 500", outcome="pending", retry_in=60)
        record(conn, [res])
        first = row(sql, job["id"])
        record(conn, [res])
        assert row(sql, job["id"]) == first
        assert len(attempts(sql)) == 1

    def test_batch_of_results(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """One write records several results, each to its own row."""
        sql.webhook(HTTPS)
        for _ in range(3):
            sql.emit()
        lease = uuid.uuid4()
        jobs = sorted(claim(conn, lease=lease), key=lambda j: j["id"])
        record(
            conn,
            [
                result(jobs[0], lease, status=200, outcome="succeeded"),
                result(jobs[1], lease, status=410, error="HTTP 410", outcome="failed"),
                result(jobs[2], lease, error="timeout after 10s", outcome="pending", retry_in=9),
            ],
        )
        assert sql("SELECT id, status, attempts FROM outbox.deliveries ORDER BY id") == [
            (1, "succeeded", 1),
            (2, "failed", 1),
            (3, "pending", 1),
        ]
        assert [a[0] for a in attempts(sql)] == [1, 2, 3]

    def test_cancelled_in_flight_stays_cancelled(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A delivery cancelled (webhook disabled) while in flight keeps its status; the
        attempt is still logged."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        (job,) = claim(conn, lease=lease)
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        cancelled = row(sql, job["id"])
        record(conn, [result(job, lease, status=200, outcome="succeeded")])
        state = row(sql, job["id"])
        assert (state["status"], state["last_error"], state["finished_at"]) == (
            "cancelled",
            "webhook disabled",
            cancelled["finished_at"],
        )
        assert attempts(sql) == [(job["id"], 1, 12, 200, None)]


class TestDisabledRace:
    def test_claim_cancels_a_pending_delivery_of_a_disabled_webhook(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A pending delivery whose webhook is disabled is cancelled by the claim and returned
        with enabled=false."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        # Simulate a producer that fanned out concurrently with the disable.
        sql(
            "UPDATE outbox.deliveries SET status = 'pending', finished_at = NULL, last_error = NULL"
        )
        rows = claim(conn)
        assert [(r["id"], r["enabled"]) for r in rows] == [(1, False)]
        state = row(sql, 1)
        assert state["status"] == "cancelled"
        assert state["finished_at"] is not None
        assert state["last_error"] == "webhook disabled"
        assert claim(conn) == []


class TestNextDue:
    def next_due(self, conn: psycopg.Connection[Any]) -> float | None:
        found = conn.execute(
            db.query("next_due"), {"pace_ahead": db.deliveries.PACE_AHEAD}
        ).fetchone()
        assert found is not None
        return None if found[0] is None else float(found[0])

    def test_a_lease_of_the_previous_releases_claim_counts(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A row claimed through claim_v1 (next_attempt_at moved to its lease's end) is
        due again when that lease runs out."""
        sql.webhook(HTTPS)
        sql.emit()
        conn.execute(
            "SELECT * FROM outbox.claim_v1(10, 20, gen_random_uuid(), 30, 100, '{}', '{}',"
            " '{}', 100, '{}', '{}', '{}')"
        ).fetchall()
        due = self.next_due(conn)
        assert due is not None and 28 < due <= 30

    def test_null_when_nothing_is_pending(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """With no pending delivery (none at all, or only finished ones) it is NULL."""
        assert self.next_due(conn) is None
        sql.webhook(HTTPS)
        sql.emit()
        sql("UPDATE outbox.deliveries SET status = 'succeeded', finished_at = now()")
        assert self.next_due(conn) is None

    def test_negative_when_something_is_due(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """A delivery that is already due gives a negative number of seconds."""
        sql.webhook(HTTPS)
        sql.emit()
        make_due(sql)
        due = self.next_due(conn)
        assert due is not None and -2 < due < 0

    def test_seconds_until_the_earliest_lease_or_retry(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """After a claim, it is the time until the earliest lease runs out."""
        sql.webhook(HTTPS)
        sql.emit()
        sql.emit()
        claim(conn, limit=1, lease_seconds=30)
        sql("UPDATE outbox.deliveries SET next_attempt_at = now() + interval '100 s' WHERE id = 2")
        due = self.next_due(conn)
        assert due is not None and 28 < due <= 30


class TestAttemptsGoWithTheirDelivery:
    """delivery_attempts has no foreign key: whatever deletes a delivery deletes its
    attempts too, also when an attempt is being recorded at that moment."""

    def test_a_webhook_deleted_while_a_result_is_recorded(
        self, sql: SQL, conn: psycopg.Connection[Any], database_url: str
    ) -> None:
        hook = sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        [job] = claim(conn, lease=lease)
        deleted = threading.Event()

        def delete() -> None:
            with psycopg.connect(database_url, autocommit=True) as other:
                other.execute("DELETE FROM outbox.webhooks WHERE id = %s", (hook,))
            deleted.set()

        with conn.transaction():
            record(conn, [{"id": job["id"], "lease": lease, "attempt": 1, "outcome": "succeeded"}])
            deleter = threading.Thread(target=delete)
            deleter.start()
            # The delete waits for the recorded delivery's row until this commits.
            assert not deleted.wait(0.5)
        deleter.join(10)
        assert deleted.is_set()
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 0
        assert sql.one("SELECT count(*) FROM outbox.delivery_attempts") == 0

    def test_an_orphaned_delivery_goes_with_its_attempts(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A delivery whose webhook is gone is deleted by the next claim, attempts and all."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        [job] = claim(conn, lease=lease)
        record(
            conn,
            [{"id": job["id"], "lease": lease, "attempt": 1, "outcome": "pending", "retry_in": 0}],
        )
        # As if the webhook's delete had missed this delivery (a concurrent fan-out).
        sql("ALTER TABLE outbox.webhooks DISABLE TRIGGER webhooks_guard")
        sql("DELETE FROM outbox.webhooks WHERE id = %s", (hook,))
        sql("ALTER TABLE outbox.webhooks ENABLE TRIGGER webhooks_guard")
        make_due(sql)
        assert claim(conn) == []
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 0
        assert sql.one("SELECT count(*) FROM outbox.delivery_attempts") == 0


async def nested_plan(
    conn: psycopg.AsyncConnection[Any], statement: LiteralString, params: Any, marker: str
) -> str:
    """The plan of the statement containing ``marker`` that running ``statement`` ran:
    the claim and the record run inside functions, whose plans the session keeps like
    a prepared statement's, and auto_explain shows them."""
    plans: list[str] = []

    def keep(notice: psycopg.errors.Diagnostic) -> None:
        plans.append(notice.message_primary or "")

    conn.add_notice_handler(keep)
    await conn.execute("LOAD 'auto_explain'")
    await conn.execute("SET auto_explain.log_min_duration = 0")
    await conn.execute("SET auto_explain.log_nested_statements = on")
    await conn.execute("SET auto_explain.log_level = notice")
    try:
        await conn.execute(statement, params, prepare=True)
    finally:
        await conn.execute("SET auto_explain.log_min_duration = -1")
        conn.remove_notice_handler(keep)
    [plan] = [text for text in plans if marker in text]
    return plan


class TestDispatcherConnection:
    async def test_a_record_looks_its_deliveries_up_by_key(
        self, database_url: str, sql: SQL
    ) -> None:
        """However many deliveries there are, recording a batch reads only its own rows:
        a plan that read all of deliveries to hash it cost about a millisecond a batch
        on a table of 20,000 rows."""
        hook = sql.webhook(HTTPS)
        sql(
            "INSERT INTO outbox.deliveries (event_id, webhook_id)"
            " SELECT g, %s FROM generate_series(1, 5000) g",
            (hook,),
        )
        sql("VACUUM ANALYZE outbox.deliveries")
        connection = Connection(database_url, *RECORDS_SETUP)
        try:
            conn = await connection.get()
            plan = await nested_plan(
                conn, db.query("record"), {"results": "[]"}, "UPDATE outbox.deliveries"
            )
            assert "Seq Scan on deliveries" not in plan
            assert "Index Scan using deliveries_pkey on deliveries d" in plan
        finally:
            await connection.close()

    async def test_plans_follow_the_table_as_it_grows(
        self, database_url: str, sql: SQL, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A dispatcher connection plans its queries once, for the tables as they are then,
        and plans them again every REPLAN_SECONDS: a plan made while deliveries was empty
        would go on treating it as empty."""
        sql("VACUUM ANALYZE outbox.deliveries")
        connection = Connection(database_url, *CLAIMS_SETUP)

        async def claim_reads_all_of_deliveries() -> bool:
            # A claim of no rows plans all the same and changes nothing. Planned for an
            # empty table, the claim reads all of deliveries for the rows it has picked.
            params = db.deliveries.claim_params(
                limit=0,
                lease=str(uuid.uuid4()),
                lease_seconds=30,
                per_webhook=1,
                webhooks_in_flight={},
                per_account=1,
                accounts_in_flight={},
            )
            conn = await connection.get()
            plan = await nested_plan(conn, db.query("claim"), params, "due AS MATERIALIZED")
            return "Seq Scan on deliveries d " in plan

        try:
            assert await claim_reads_all_of_deliveries()
            sql(
                "INSERT INTO outbox.deliveries (event_id, webhook_id)"
                " SELECT g, 1 FROM generate_series(1, 5000) g"
            )
            assert await claim_reads_all_of_deliveries()  # the plan made for the empty table
            monkeypatch.setattr(dispatcher, "REPLAN_SECONDS", 0.0)
            assert not await claim_reads_all_of_deliveries()
        finally:
            await connection.close()
