"""Retention: what `prune` deletes and keeps, in bounded batches found through indexes."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from outbox import db, retention
from outbox.retention import Pruned
from tests.conftest import SQL, login_url, wait_until
from tests.db.helpers import HTTPS

DAY = 86400.0


def prune(url: str, older_than: float = DAY, **kwargs: Any) -> Pruned:
    async def go() -> Pruned:
        async with await db.connect(url) as conn:
            return await retention.prune(conn, older_than, **kwargs)

    return asyncio.run(go())


def finish(sql: SQL, ids: list[int], status: str, age: str, attempts: int = 1) -> None:
    """Mark deliveries finished `age` ago, each with `attempts` attempt rows."""
    sql(
        "UPDATE outbox.deliveries SET status = %s, finished_at = now() - %s::interval,"
        " attempts = %s, created_at = now() - %s::interval WHERE id = ANY (%s)",
        (status, age, attempts, age, ids),
    )
    sql(
        "INSERT INTO outbox.delivery_attempts"
        " (delivery_id, attempt, started_at, duration_ms, response_status)"
        " SELECT d, a, now() - %s::interval, 5, 200"
        " FROM unnest(%s::bigint[]) d, generate_series(1, %s) a",
        (age, ids, attempts),
    )


def age_events(sql: SQL, age: str) -> None:
    sql("UPDATE outbox.events SET occurred_at = now() - %s::interval", (age,))


def delivery_of(sql: SQL, event_id: int) -> int:
    return int(sql.one("SELECT id FROM outbox.deliveries WHERE event_id = %s", (event_id,)))


def ids(sql: SQL, table: str) -> set[int]:
    column = "delivery_id" if table == "delivery_attempts" else "id"
    return {r[0] for r in sql(f"SELECT {column} FROM outbox.{table}")}


def bulk(sql: SQL, n: int, attempts: int) -> None:
    """n events older than a day, each with one delivery finished two days ago."""
    webhook = sql.webhook(HTTPS)
    sql(
        "INSERT INTO outbox.events (account_id, event, occurred_at)"
        " SELECT 'acct_1', 'lead.scored', now() - interval '3 days' FROM generate_series(1, %s)",
        (n,),
    )
    sql(
        "UPDATE outbox.deliveries SET status = 'succeeded', attempts = %s,"
        " finished_at = now() - interval '2 days' WHERE webhook_id = %s",
        (attempts, webhook),
    )
    sql(
        "INSERT INTO outbox.delivery_attempts (delivery_id, attempt, started_at, duration_ms)"
        " SELECT d.id, a, now() - interval '2 days', 5"
        " FROM outbox.deliveries d, generate_series(1, %s) a",
        (attempts,),
    )
    sql("ANALYZE outbox.events, outbox.deliveries, outbox.delivery_attempts")


class TestWhatIsDeleted:
    def test_old_finished_deliveries_go_with_their_attempts_and_events(
        self, sql: SQL, database_url: str
    ) -> None:
        """Succeeded, failed and cancelled deliveries finished before the retention go,
        with their attempts and then their events; the counts say what went."""
        sql.webhook(HTTPS)
        events = [sql.emit() for _ in range(3)]
        deliveries = [delivery_of(sql, e) for e in events]
        for delivery, status in zip(deliveries, ("succeeded", "failed", "cancelled"), strict=True):
            finish(sql, [delivery], status, "2 days", attempts=2)
        age_events(sql, "3 days")

        pruned = prune(database_url)

        assert (pruned.deliveries, pruned.attempts, pruned.events) == (3, 6, 3)
        assert not ids(sql, "deliveries") | ids(sql, "delivery_attempts") | ids(sql, "events")

    def test_pending_deliveries_and_their_events_are_kept_however_old(
        self, sql: SQL, database_url: str
    ) -> None:
        """A pending delivery is never deleted, nor its attempts, nor its event."""
        sql.webhook(HTTPS)
        event = sql.emit()
        delivery = delivery_of(sql, event)
        finish(sql, [delivery], "pending", "40 days", attempts=2)
        sql("UPDATE outbox.deliveries SET finished_at = NULL")
        age_events(sql, "40 days")

        pruned = prune(database_url)

        assert (pruned.deliveries, pruned.attempts, pruned.events) == (0, 0, 0)
        assert ids(sql, "deliveries") == ids(sql, "delivery_attempts") == {delivery}
        assert ids(sql, "events") == {event}

    def test_an_old_event_stays_while_any_of_its_deliveries_does(
        self, sql: SQL, database_url: str
    ) -> None:
        """An event fanned out to two webhooks stays while one delivery is pending or
        finished recently, though the other delivery is gone."""
        sql.webhook(HTTPS, name="a")
        sql.webhook(HTTPS, name="b")
        pending_event, recent_event = sql.emit(), sql.emit()
        old = []
        for event, other in ((pending_event, "pending"), (recent_event, "succeeded")):
            first, second = (
                r[0]
                for r in sql(
                    "SELECT id FROM outbox.deliveries WHERE event_id = %s ORDER BY id", (event,)
                )
            )
            finish(sql, [first], "succeeded", "2 days")
            old.append(first)
            if other == "succeeded":
                finish(sql, [second], "succeeded", "1 hour")
        age_events(sql, "3 days")

        pruned = prune(database_url)

        assert (pruned.deliveries, pruned.events) == (2, 0)
        assert ids(sql, "events") == {pending_event, recent_event}
        assert not ids(sql, "deliveries") & set(old)

    def test_young_rows_are_kept(self, sql: SQL, database_url: str) -> None:
        """Deliveries finished within the retention, and young events, stay."""
        sql.webhook(HTTPS)
        event = sql.emit()
        delivery = delivery_of(sql, event)
        finish(sql, [delivery], "succeeded", "23 hours")
        lone = sql.emit(account="acct_without_webhooks")

        pruned = prune(database_url)

        assert (pruned.deliveries, pruned.attempts, pruned.events) == (0, 0, 0)
        assert ids(sql, "deliveries") == {delivery}
        assert ids(sql, "events") == {event, lone}

    def test_old_events_that_never_had_a_delivery_go(self, sql: SQL, database_url: str) -> None:
        """Events of accounts without webhooks go once older than the retention, also
        when newer ones were inserted before them."""
        young = sql.emit(account="acct_9")
        old = [sql.emit(account="acct_9") for _ in range(3)]
        sql(
            "UPDATE outbox.events SET occurred_at = now() - interval '2 days' WHERE id = ANY (%s)",
            (old,),
        )

        assert prune(database_url).events == 3
        assert ids(sql, "events") == {young}

    def test_a_replayed_delivery_is_kept(self, sql: SQL, database_url: str) -> None:
        """A finished delivery re-queued by a replay is pending again, so it stays."""
        sql.webhook(HTTPS)
        delivery = delivery_of(sql, sql.emit())
        finish(sql, [delivery], "failed", "2 days")
        age_events(sql, "3 days")
        sql.conn.execute(db.query("delivery_retry"), {"id": delivery, "account_id": None})

        assert prune(database_url).deliveries == 0
        assert ids(sql, "deliveries") == {delivery}

    def test_a_delivery_replayed_while_being_pruned_is_kept(
        self, sql: SQL, database_url: str
    ) -> None:
        """A replay that commits while prune waits for its row: the DELETE looks at the
        row again, finds it pending, and keeps it and its attempts."""
        sql.webhook(HTTPS)
        delivery = delivery_of(sql, sql.emit())
        finish(sql, [delivery], "failed", "2 days")
        with psycopg.connect(database_url) as replay:
            replay.execute(db.query("delivery_retry"), {"id": delivery, "account_id": None})
            with ThreadPoolExecutor(1) as pool:
                pruning = pool.submit(prune, database_url)
                wait_until(
                    lambda: sql.one(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    ),
                    what="prune to wait for the replay's row",
                )
                replay.commit()
                pruned = pruning.result(30)
        assert (pruned.deliveries, pruned.attempts) == (0, 0)
        assert sql.one("SELECT status FROM outbox.deliveries") == "pending"
        assert ids(sql, "delivery_attempts") == {delivery}


class TestBatches:
    def test_one_statement_deletes_at_most_the_batch_in_rows(
        self, sql: SQL, database_url: str
    ) -> None:
        """A batch counts a delivery and each of its attempts as one row each."""
        bulk(sql, retention.BATCH_ROWS + 2_000, attempts=1)
        cutoff = sql.one("SELECT now() - interval '1 day'")
        deliveries, attempts = sql(
            db.query("prune_deliveries"), {"cutoff": cutoff, "rows": retention.BATCH_ROWS}
        )[0]
        assert (deliveries, attempts) == (retention.BATCH_ROWS // 2, retention.BATCH_ROWS // 2)

    @pytest.mark.slow
    def test_a_large_backlog_takes_several_bounded_statements(
        self, sql: SQL, database_url: str
    ) -> None:
        """25,000 old deliveries and events are deleted in three statements or more of
        each kind, every one within BATCH_ROWS, and nothing old is left."""
        bulk(sql, 25_000, attempts=0)

        pruned = prune(database_url)

        assert (pruned.deliveries, pruned.events) == (25_000, 25_000)
        # 3 batches of deliveries and 3 of events, each followed by one that finds none.
        assert pruned.statements >= 8
        assert ids(sql, "deliveries") == ids(sql, "events") == set()

    def test_a_delivery_with_more_attempts_than_a_batch_still_goes(
        self, sql: SQL, database_url: str
    ) -> None:
        """The first delivery of a batch goes whatever its attempts, so pruning ends."""
        bulk(sql, 2, attempts=5)
        pruned = prune(database_url, rows=3)
        assert (pruned.deliveries, pruned.attempts, pruned.events) == (2, 10, 2)


class TestOneAtATime:
    def test_a_pruner_leaves_the_round_to_the_one_holding_the_lock(
        self, sql: SQL, database_url: str
    ) -> None:
        """While another process holds the pruners' lock, a sidecar's round deletes
        nothing and says it yielded."""
        bulk(sql, 10, attempts=1)
        with psycopg.connect(database_url) as other:
            other.execute("SELECT FROM outbox.locks WHERE name = 'prune' FOR UPDATE")
            pruned = prune(database_url)
        assert pruned.yielded and pruned.deliveries == 0
        assert prune(database_url).deliveries == 10

    def test_a_lock_held_elsewhere_is_tried_for_a_bounded_time_then_left(
        self, sql: SQL, database_url: str
    ) -> None:
        """Another pruner holding the lock makes `outbox prune` (which tries for
        ``wait`` seconds) give up and say so, never hang; released, pruning goes on."""
        bulk(sql, 10, attempts=1)
        with psycopg.connect(database_url) as other:
            other.execute("SELECT FROM outbox.locks WHERE name = 'prune' FOR UPDATE")
            pruned = prune(database_url, wait=0.3)
        assert pruned.yielded and pruned.deliveries == 0
        assert prune(database_url, wait=0.3).deliveries == 10

    def test_a_producer_cannot_hold_the_pruners_lock(
        self, sql: SQL, database_url: str, producer_login: str
    ) -> None:
        """Any role may take any advisory lock, outbox's too: none of them stops
        retention, and the pruners' own lock is a row a producer may not lock."""
        bulk(sql, 10, attempts=1)
        with psycopg.connect(login_url(database_url, producer_login)) as producer:
            for key in (0, 1, 2):
                producer.execute("SELECT pg_advisory_lock(1869968482, %s)", (key,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                producer.execute("SELECT FROM outbox.locks FOR UPDATE")
            producer.rollback()
            assert prune(database_url, wait=0.3).deliveries == 10

    def test_a_round_forgets_rotated_out_secrets_whose_overlap_ended(
        self, sql: SQL, database_url: str
    ) -> None:
        ended = sql.webhook("https://example.com/a", secret="old-secret-0123456789")
        running = sql.webhook("https://example.com/b", secret="old-secret-0123456789")
        for hook in (ended, running):
            sql(
                "UPDATE outbox.webhooks SET secret = 'new-secret-0123456789' WHERE id = %s", (hook,)
            )
        # As if the day of overlap had passed: written around the guard, as time does.
        sql("ALTER TABLE outbox.webhooks DISABLE TRIGGER webhooks_guard")
        sql(
            "UPDATE outbox.webhooks SET previous_secret_expires_at = now() - interval '1 s'"
            " WHERE id = %s",
            (ended,),
        )
        sql("ALTER TABLE outbox.webhooks ENABLE TRIGGER webhooks_guard")
        assert prune(database_url).secrets == 1
        kept = sql("SELECT id, previous_secret FROM outbox.webhooks ORDER BY id")
        assert kept == [(ended, None), (running, "old-secret-0123456789")]


@pytest.fixture
def producer_login(sql: SQL) -> Iterator[str]:
    name = f"outbox_producer_{uuid.uuid4().hex[:8]}"
    sql(f"CREATE ROLE {name} LOGIN IN ROLE outbox_producer")
    yield name
    sql(f"DROP ROLE {name}")


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _scans(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> list[str]:
    """'<node type> on <table>' for every table the query reads, with a generic plan
    (what a connection that prepares the query uses) and with custom plans."""
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", query)))
    numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m[1]) + 1}", query)
    conn.execute(f"PREPARE q AS {numbered}")
    values = ", ".join(f"%({n})s" for n in names)
    found = []
    for mode in ("force_generic_plan", "force_custom_plan"):
        conn.execute(f"SET plan_cache_mode = {mode}")
        # EXECUTE takes no bound parameters: the client writes the values in.
        cur = psycopg.ClientCursor(conn)
        (plan,) = cur.execute(f"EXPLAIN (FORMAT JSON) EXECUTE q({values})", params).fetchone()
        plan = plan if isinstance(plan, list) else json.loads(plan)
        found += [
            f"{n['Node Type']} on {n['Relation Name']}"
            for n in _nodes(plan[0]["Plan"])
            if "Relation Name" in n
        ]
    conn.execute("DEALLOCATE q")
    conn.execute("RESET plan_cache_mode")
    return found


class TestPlans:
    @pytest.mark.parametrize("name", ["prune_deliveries", "prune_events"])
    def test_each_batch_reads_through_an_index(
        self, sql: SQL, database_url: str, name: str
    ) -> None:
        """No batch statement scans a whole table, however large it grows."""
        bulk(sql, 20_000, attempts=1)
        cutoff = sql.one("SELECT now() - interval '1 day'")
        params = {"cutoff": cutoff, "rows": retention.BATCH_ROWS, "after": 0}
        scans = _scans(sql.conn, db.query(name), params)
        assert scans, scans
        assert not [s for s in scans if s.startswith("Seq Scan")], scans
