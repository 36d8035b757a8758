"""outbox.events: what producers may insert, and the fan-out into deliveries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from outbox import db
from tests.conftest import SQL, wait_until
from tests.db.helpers import EVENTS, HTTPS, claim, raises

VALID = ", ".join(EVENTS)
LIMIT = 262144


def insert_event(sql: SQL, account: Any, event: Any, data: Any = None) -> int:
    if data is None:
        return int(
            sql.one(
                "INSERT INTO outbox.events (account_id, event) VALUES (%s, %s) RETURNING id",
                (account, event),
            )
        )
    return int(
        sql.one(
            "INSERT INTO outbox.events (account_id, event, data) VALUES (%s, %s, %s::jsonb)"
            " RETURNING id",
            (account, event, data),
        )
    )


def deliveries(sql: SQL) -> list[tuple[int, int]]:
    """(event_id, webhook_id) of every delivery, sorted."""
    return [
        (int(e), int(w))
        for e, w in sql("SELECT event_id, webhook_id FROM outbox.deliveries ORDER BY 1, 2")
    ]


class TestEventName:
    def test_unknown_event_is_rejected_listing_all_seven_names(self, sql: SQL) -> None:
        """An INSERT with an event outside the catalogue fails naming every valid event."""
        with raises(
            errors.CheckViolation,
            f"unknown event 'lead.deleted': valid events are {VALID}",
        ):
            insert_event(sql, "acct_1", "lead.deleted")
        assert sql.one("SELECT count(*) FROM outbox.events") == 0

    def test_one_lock_key(self, sql: SQL) -> None:
        """outbox.lock_key(), which every advisory lock uses, is what migrate uses too."""
        assert sql.one("SELECT outbox.lock_key()") == db.LOCK_KEY
        assert f"({db.LOCK_KEY}, 0)" in db.query("migrate_lock")

    def test_the_database_enforces_the_python_catalogue(self, sql: SQL) -> None:
        """outbox.event_names() is outbox.events.EVENTS, in the same order."""
        assert sql.one("SELECT outbox.event_names()") == list(EVENTS)

    def test_event_names_are_case_sensitive(self, sql: SQL) -> None:
        """A display-name spelling such as 'Lead.Scored' is not a wire name."""
        with raises(
            errors.CheckViolation, f"unknown event 'Lead.Scored': valid events are {VALID}"
        ):
            insert_event(sql, "acct_1", "Lead.Scored")

    def test_emit_rejects_unknown_event_the_same_way(self, sql: SQL) -> None:
        """outbox.emit() applies the same rule and message as a direct INSERT."""
        with raises(errors.CheckViolation, f"unknown event 'nope': valid events are {VALID}"):
            sql.emit("acct_1", "nope")

    @pytest.mark.parametrize("event", EVENTS)
    def test_every_wire_name_is_accepted(self, sql: SQL, event: str) -> None:
        """Each of the seven wire names can be emitted."""
        event_id = sql.emit("acct_1", event)
        assert sql.one("SELECT event FROM outbox.events WHERE id = %s", (event_id,)) == event

    def test_missing_event_is_rejected(self, sql: SQL) -> None:
        """An event row needs an event name."""
        with raises(
            errors.NotNullViolation,
            'null value in column "event" of relation "events" violates not-null constraint',
        ):
            sql("INSERT INTO outbox.events (account_id) VALUES ('acct_1')")


class TestAccount:
    def test_missing_account_is_rejected(self, sql: SQL) -> None:
        """An INSERT without account_id fails on the NOT NULL constraint."""
        with raises(
            errors.NotNullViolation,
            'null value in column "account_id" of relation "events" violates not-null constraint',
        ):
            sql("INSERT INTO outbox.events (event) VALUES ('lead.scored')")

    def test_null_account_through_emit_is_rejected(self, sql: SQL) -> None:
        """outbox.emit(NULL, ...) fails instead of inserting an orphan event."""
        with raises(errors.NotNullViolation):
            sql("SELECT outbox.emit(NULL, 'lead.scored', '{}')")
        assert sql.one("SELECT count(*) FROM outbox.events") == 0

    def test_empty_account_is_rejected(self, sql: SQL) -> None:
        """An empty account_id fails with a message naming the column."""
        with raises(errors.CheckViolation, "account_id must not be empty"):
            insert_event(sql, "", "lead.scored")


class TestData:
    @pytest.mark.parametrize(
        ("data", "kind"),
        [("[1, 2]", "array"), ('"text"', "string"), ("42", "number"), ("null", "null")],
    )
    def test_non_object_data_is_rejected(self, sql: SQL, data: str, kind: str) -> None:
        """data that is not a JSON object fails with 'data must be a JSON object'."""
        with raises(errors.CheckViolation, f"data must be a JSON object, not {kind}"):
            insert_event(sql, "acct_1", "lead.scored", data)

    def test_non_object_data_through_emit_is_rejected(self, sql: SQL) -> None:
        """outbox.emit() with an array fails the same way."""
        with raises(errors.CheckViolation, "data must be a JSON object, not array"):
            sql("SELECT outbox.emit('acct_1', 'lead.scored', '[]'::jsonb)")

    def test_data_of_exactly_the_limit_is_accepted(self, sql: SQL) -> None:
        """data whose text form is exactly 262144 bytes is stored."""
        data = json.dumps({"k": "x" * (LIMIT - len('{"k": ""}'))})
        event_id = insert_event(sql, "acct_1", "lead.scored", data)
        size = sql.one(
            "SELECT octet_length(data::text) FROM outbox.events WHERE id = %s", (event_id,)
        )
        assert size == LIMIT

    def test_data_over_the_limit_is_rejected(self, sql: SQL) -> None:
        """data whose text form is 262145 bytes fails naming its size and the limit."""
        data = json.dumps({"k": "x" * (LIMIT + 1 - len('{"k": ""}'))})
        with raises(errors.CheckViolation, f"data is {LIMIT + 1} bytes; the limit is {LIMIT}"):
            insert_event(sql, "acct_1", "lead.scored", data)
        assert sql.one("SELECT count(*) FROM outbox.events") == 0

    def test_limit_counts_bytes_not_characters(self, sql: SQL) -> None:
        """Multi-byte characters count by their UTF-8 size: fewer characters can exceed it."""
        chars = LIMIT // 2  # two bytes each: ~2x over the limit in bytes, under it in chars
        data = json.dumps({"k": "é" * chars}, ensure_ascii=False)
        size = 2 * chars + len('{"k": ""}')
        with raises(errors.CheckViolation, f"data is {size} bytes; the limit is {LIMIT}"):
            insert_event(sql, "acct_1", "lead.scored", data)

    def test_data_defaults_to_an_empty_object(self, sql: SQL) -> None:
        """An INSERT without data stores {}."""
        event_id = insert_event(sql, "acct_1", "lead.scored")
        assert sql.one("SELECT data FROM outbox.events WHERE id = %s", (event_id,)) == {}

    def test_emit_with_null_data_stores_an_empty_object(self, sql: SQL) -> None:
        """outbox.emit(account, event, NULL) stores {} rather than failing."""
        event_id = sql.one("SELECT outbox.emit('acct_1', 'lead.scored', NULL)")
        assert sql.one("SELECT data FROM outbox.events WHERE id = %s", (event_id,)) == {}

    def test_data_is_stored_unchanged(self, sql: SQL) -> None:
        """The producer's object comes back as it was given."""
        data = {"lead": {"id": 42, "name": "Ada"}, "score": {"overall": 87}, "tags": ["a"]}
        event_id = sql.emit("acct_1", "lead.scored", data)
        assert sql.one("SELECT data FROM outbox.events WHERE id = %s", (event_id,)) == data


class TestColumns:
    def test_occurred_at_defaults_to_the_transaction_time(self, database_url: str) -> None:
        """Without occurred_at the row gets now(), the producer transaction's time."""
        with psycopg.connect(database_url) as conn:
            event_id = conn.execute(
                "INSERT INTO outbox.events (account_id, event) VALUES ('a', 'lead.scored')"
                " RETURNING id"
            ).fetchone()
            row = conn.execute(
                "SELECT occurred_at = now() FROM outbox.events WHERE id = %s", event_id
            ).fetchone()
            assert row == (True,)

    def test_emit_defaults_occurred_at_to_now(self, database_url: str) -> None:
        """outbox.emit() without occurred_at stamps the transaction's now()."""
        with psycopg.connect(database_url) as conn:
            event_id = conn.execute("SELECT outbox.emit('a', 'lead.scored', '{}')").fetchone()
            row = conn.execute(
                "SELECT occurred_at = now() FROM outbox.events WHERE id = %s", event_id
            ).fetchone()
            assert row == (True,)

    def test_explicit_occurred_at_is_kept(self, sql: SQL) -> None:
        """A producer may give the time the event happened."""
        event_id = sql.one(
            "SELECT outbox.emit('a', 'lead.scored', '{}', '2026-11-27 12:34:56.789+00')"
        )
        assert sql.one(
            "SELECT occurred_at = '2026-11-27 12:34:56.789+00' FROM outbox.events WHERE id = %s",
            (event_id,),
        )

    def test_id_cannot_be_set_by_producers(self, sql: SQL) -> None:
        """id is GENERATED ALWAYS: an INSERT giving one fails."""
        with raises(errors.GeneratedAlways, 'cannot insert a non-DEFAULT value into column "id"'):
            sql(
                "INSERT INTO outbox.events (id, account_id, event)"
                " VALUES (12345, 'acct_1', 'lead.scored')"
            )

    def test_emit_returns_the_new_id(self, sql: SQL) -> None:
        """outbox.emit() returns the id of the row it inserted, a new one each call."""
        first = sql.emit("acct_1", "lead.scored", {"n": 1})
        second = sql.emit("acct_2", "lead.created", {"n": 2})
        assert first != second
        rows = sql("SELECT id, account_id, event, data FROM outbox.events ORDER BY id")
        assert rows == [
            (first, "acct_1", "lead.scored", {"n": 1}),
            (second, "acct_2", "lead.created", {"n": 2}),
        ]


class TestFanOut:
    def test_one_delivery_per_enabled_subscribed_webhook_of_the_account(self, sql: SQL) -> None:
        """Only the account's enabled webhooks for that event get a delivery, one each."""
        a = sql.webhook(HTTPS, account="acct_1", event="lead.scored")
        b = sql.webhook(HTTPS, account="acct_1", event="lead.scored")
        sql.webhook(HTTPS, account="acct_1", event="lead.scored", enabled=False)
        sql.webhook(HTTPS, account="acct_1", event="lead.created")
        sql.webhook(HTTPS, account="acct_2", event="lead.scored")
        event_id = sql.emit("acct_1", "lead.scored")
        assert deliveries(sql) == [(event_id, a), (event_id, b)]
        rows = sql(
            "SELECT status, attempts, finished_at, last_error, last_response_status,"
            " next_attempt_at <= now() FROM outbox.deliveries"
        )
        assert rows == [("pending", 0, None, None, None, True)] * 2

    def test_direct_insert_fans_out_like_emit(self, sql: SQL) -> None:
        """A plain INSERT INTO outbox.events enqueues the same deliveries as emit()."""
        hook = sql.webhook(HTTPS, event="reply.received")
        event_id = insert_event(sql, "acct_1", "reply.received", '{"x": 1}')
        assert deliveries(sql) == [(event_id, hook)]

    def test_no_webhooks_no_deliveries(self, sql: SQL) -> None:
        """An event for an account without webhooks is stored with no delivery."""
        sql.webhook(HTTPS, account="acct_2")
        sql.emit("acct_1", "lead.scored")
        assert sql.one("SELECT count(*) FROM outbox.events") == 1
        assert deliveries(sql) == []

    def test_rolled_back_transaction_emits_nothing(self, sql: SQL, database_url: str) -> None:
        """A producer transaction that rolls back leaves no event and no delivery."""
        sql.webhook(HTTPS)
        with psycopg.connect(database_url) as conn:
            conn.execute("SELECT outbox.emit('acct_1', 'lead.scored', '{}')")
            conn.execute(
                "INSERT INTO outbox.events (account_id, event) VALUES ('acct_1', 'lead.scored')"
            )
            inside = conn.execute("SELECT count(*) FROM outbox.deliveries").fetchone()
            conn.rollback()
        assert inside == (2,)  # the fan-out ran inside the transaction...
        assert sql.one("SELECT count(*) FROM outbox.events") == 0  # ...and went with it
        assert deliveries(sql) == []

    def test_committed_transaction_enqueues_with_it(self, sql: SQL, database_url: str) -> None:
        """Deliveries appear exactly when the producer's transaction commits."""
        hook = sql.webhook(HTTPS)
        with psycopg.connect(database_url) as conn:
            event_id = conn.execute("SELECT outbox.emit('acct_1', 'lead.scored', '{}')").fetchone()
            assert deliveries(sql) == []  # not visible before the commit
            conn.commit()
        assert event_id is not None
        assert deliveries(sql) == [(event_id[0], hook)]

    def test_webhooks_created_after_the_commit_do_not_get_it(self, sql: SQL) -> None:
        """A webhook added after an event committed gets only later events."""
        old = sql.webhook(HTTPS)
        first = sql.emit()
        new = sql.webhook(HTTPS)
        assert deliveries(sql) == [(first, old)]
        second = sql.emit()
        assert deliveries(sql) == [(first, old), (second, old), (second, new)]

    def test_multi_row_insert_fans_out_n_times_webhooks(self, sql: SQL) -> None:
        """An INSERT of N events at once yields one delivery per event and webhook."""
        hooks = [sql.webhook(HTTPS) for _ in range(3)]
        ids = [
            int(row[0])
            for row in sql(
                "INSERT INTO outbox.events (account_id, event, data)"
                " SELECT 'acct_1', 'lead.scored', jsonb_build_object('n', n)"
                " FROM generate_series(1, 5) n RETURNING id"
            )
        ]
        assert len(ids) == 5
        assert deliveries(sql) == sorted((e, w) for e in ids for w in hooks)

    def test_multi_row_insert_with_mixed_accounts_and_events(self, sql: SQL) -> None:
        """Each row of a multi-row INSERT fans out to its own account's and event's webhooks."""
        a = sql.webhook(HTTPS, account="acct_1", event="lead.scored")
        b = sql.webhook(HTTPS, account="acct_2", event="lead.created")
        rows = sql(
            "INSERT INTO outbox.events (account_id, event) VALUES"
            " ('acct_1', 'lead.scored'), ('acct_2', 'lead.created'),"
            " ('acct_1', 'lead.created'), ('acct_2', 'lead.scored') RETURNING id"
        )
        e1, e2, _, _ = (int(r[0]) for r in rows)
        assert deliveries(sql) == [(e1, a), (e2, b)]

    def test_a_rejected_row_rejects_the_whole_statement(self, sql: SQL) -> None:
        """One bad row in a multi-row INSERT leaves no event and no delivery behind."""
        sql.webhook(HTTPS)
        with raises(errors.CheckViolation, "data must be a JSON object, not array"):
            sql(
                "INSERT INTO outbox.events (account_id, event, data) VALUES"
                " ('acct_1', 'lead.scored', '{}'), ('acct_1', 'lead.scored', '[]')"
            )
        assert sql.one("SELECT count(*) FROM outbox.events") == 0
        assert deliveries(sql) == []

    def test_a_row_that_on_conflict_skips_fans_out_nothing(self, sql: SQL) -> None:
        """INSERT ... ON CONFLICT DO NOTHING that meets an existing id (an identity
        sequence set back, as after a restore) enqueues nothing for the skipped row."""
        hook = sql.webhook(HTTPS)
        first = insert_event(sql, "acct_1", "lead.scored")
        sql("SELECT setval(pg_get_serial_sequence('outbox.events', 'id'), %s, false)", (first,))
        sql(
            "INSERT INTO outbox.events (account_id, event) VALUES ('acct_1', 'lead.scored')"
            " ON CONFLICT DO NOTHING"
        )
        assert sql.one("SELECT count(*) FROM outbox.events") == 1
        assert deliveries(sql) == [(first, hook)]

    def test_the_fan_out_sees_the_row_as_written(self, sql: SQL) -> None:
        """The owner's own BEFORE trigger may change or skip a row: the fan-out follows
        what was written, not what was asked."""
        hook = sql.webhook(HTTPS, account="acct_1")
        sql(
            "CREATE FUNCTION public.tidy() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.data ? 'skip' THEN RETURN NULL; END IF;"
            " NEW.account_id := lower(NEW.account_id); RETURN NEW; END $$"
        )
        sql(
            "CREATE TRIGGER zz_tidy BEFORE INSERT ON outbox.events"
            " FOR EACH ROW EXECUTE FUNCTION public.tidy()"
        )
        kept = insert_event(sql, "ACCT_1", "lead.scored")
        sql(
            "INSERT INTO outbox.events (account_id, event, data)"
            " VALUES ('acct_1', 'lead.scored', '{\"skip\": true}')"
        )
        assert deliveries(sql) == [(kept, hook)]

    def test_an_update_is_checked_the_same_way_and_fans_out_nothing(self, sql: SQL) -> None:
        """The owner's UPDATE of an event meets the INSERT's rules and enqueues nothing."""
        sql.webhook(HTTPS)
        event = insert_event(sql, "acct_1", "lead.scored")
        with raises(errors.CheckViolation, "data must be a JSON object, not array"):
            sql("UPDATE outbox.events SET data = '[]' WHERE id = %s", (event,))
        with raises(errors.CheckViolation, f"unknown event 'lead.lost': valid events are {VALID}"):
            sql("UPDATE outbox.events SET event = 'lead.lost' WHERE id = %s", (event,))
        sql("UPDATE outbox.events SET data = '{\"n\": 1}' WHERE id = %s", (event,))
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 1


class TestConcurrentDelete:
    def test_webhook_deleted_during_fan_out_does_not_fail_the_producer(
        self, sql: SQL, database_url: str
    ) -> None:
        """A producer racing a webhook DELETE succeeds, and the deleted webhook gets nothing."""
        hook = sql.webhook(HTTPS)
        outcome: dict[str, Any] = {}

        def produce() -> None:
            with psycopg.connect(database_url, autocommit=True) as conn:
                try:
                    conn.execute("SELECT outbox.emit('acct_1', 'lead.scored', '{}')")
                    outcome["ok"] = True
                except psycopg.Error as exc:
                    outcome["error"] = f"{exc.sqlstate}: {exc.diag.message_primary}"

        with psycopg.connect(database_url) as deleter:
            deleter.execute("DELETE FROM outbox.webhooks WHERE id = %s", (hook,))
            thread = threading.Thread(target=produce)
            thread.start()
            # Commit the delete while the producer waits on it (or once it is done).
            wait_until(
                lambda: (
                    not thread.is_alive()
                    or sql.one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                ),
                timeout=10,
                what="the producer to wait for the delete",
            )
            deleter.commit()
        thread.join(10)
        assert outcome == {"ok": True}
        assert sql.one("SELECT count(*) FROM outbox.events") == 1
        # Any delivery the race left behind is dropped by the next claim, never sent.
        assert claim(sql.conn) == []
        assert deliveries(sql) == []


@pytest.fixture
def producer(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection acting as outbox_producer."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET ROLE outbox_producer")
        yield conn


class TestProducerRole:
    def test_role_exists_and_cannot_log_in(self, sql: SQL) -> None:
        """The migrations create the cluster-wide role outbox_producer, NOLOGIN."""
        assert sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'outbox_producer'") == [
            (False,)
        ]

    def test_producer_can_insert_and_fan_out_happens(
        self, sql: SQL, producer: psycopg.Connection[Any]
    ) -> None:
        """outbox_producer may INSERT into outbox.events, and the fan-out still runs."""
        hook = sql.webhook(HTTPS)
        assert producer.execute("SELECT current_user").fetchone() == ("outbox_producer",)
        producer.execute(
            "INSERT INTO outbox.events (account_id, event, data)"
            " VALUES ('acct_1', 'lead.scored', '{\"a\": 1}')"
        )
        event_id = sql.one("SELECT id FROM outbox.events")
        assert deliveries(sql) == [(event_id, hook)]

    def test_producer_can_emit(self, sql: SQL, producer: psycopg.Connection[Any]) -> None:
        """outbox_producer may call outbox.emit(), which returns the id and fans out."""
        hook = sql.webhook(HTTPS)
        row = producer.execute("SELECT outbox.emit('acct_1', 'lead.scored', '{}')").fetchone()
        assert row is not None
        assert deliveries(sql) == [(row[0], hook)]

    def test_producer_gets_the_same_validation(self, producer: psycopg.Connection[Any]) -> None:
        """The rules apply to outbox_producer too (the check functions are callable)."""
        with raises(errors.CheckViolation, f"unknown event 'x': valid events are {VALID}"):
            producer.execute("INSERT INTO outbox.events (account_id, event) VALUES ('acct_1', 'x')")

    @pytest.mark.parametrize(
        "statement",
        [
            "SELECT * FROM outbox.events",
            "UPDATE outbox.events SET account_id = 'x'",
            "DELETE FROM outbox.events",
        ],
    )
    def test_producer_cannot_read_or_change_events(
        self, sql: SQL, producer: psycopg.Connection[Any], statement: str
    ) -> None:
        """outbox_producer has no SELECT, UPDATE or DELETE on outbox.events."""
        sql.emit()
        with raises(errors.InsufficientPrivilege, "permission denied for table events"):
            producer.execute(statement)
        assert sql.one("SELECT account_id FROM outbox.events") == "acct_1"

    @pytest.mark.parametrize(
        ("statement", "table"),
        [
            ("SELECT * FROM outbox.webhooks", "webhooks"),
            (
                "INSERT INTO outbox.webhooks (account_id, name, url, event)"
                " VALUES ('a', 'n', 'https://example.com', 'lead.scored')",
                "webhooks",
            ),
            ("UPDATE outbox.webhooks SET enabled = false", "webhooks"),
            ("DELETE FROM outbox.webhooks", "webhooks"),
            ("SELECT * FROM outbox.deliveries", "deliveries"),
            ("UPDATE outbox.deliveries SET status = 'cancelled'", "deliveries"),
            ("DELETE FROM outbox.deliveries", "deliveries"),
            ("SELECT * FROM outbox.delivery_attempts", "delivery_attempts"),
            ("SELECT * FROM outbox.webhook_status", "view webhook_status"),
        ],
    )
    def test_producer_cannot_touch_webhooks_or_deliveries(
        self, sql: SQL, producer: psycopg.Connection[Any], statement: str, table: str
    ) -> None:
        """outbox_producer has no rights on webhooks, deliveries, attempts or the status view."""
        sql.webhook(HTTPS)
        sql.emit()
        if " " not in table:
            table = f"table {table}"
        with raises(errors.InsufficientPrivilege, f"permission denied for {table}"):
            producer.execute(statement)
        assert sql("SELECT enabled FROM outbox.webhooks") == [(True,)]
        assert sql("SELECT status FROM outbox.deliveries") == [("pending",)]
