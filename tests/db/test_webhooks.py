"""outbox.webhooks: the rules every path must obey, enabling/deleting, and the status view."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import errors

from tests.conftest import SQL
from tests.db.helpers import EVENTS, HTTPS, raises

URL_MESSAGE = "url must be an absolute https:// URL with a host"
VALID = ", ".join(EVENTS)


class TestUrl:
    @pytest.mark.parametrize(
        "url",
        [
            "http://example.com",
            "ftp://example.com",
            "example.com",
            "https:///path",
            "https://",
            "https://:443/x",
            "//example.com/x",
            "https://exa mple.com",
            "https://example.com/a b",
            " https://example.com",
            "https://example.com ",
            "https://example.com\n",
            "https://exa\tmple.com",
            "https://example.com:99999/x",
            "https://example.com:0/x",
            "",
        ],
    )
    def test_rejects_anything_but_absolute_https_with_host(self, sql: SQL, url: str) -> None:
        """A url that is not an absolute https:// URL with a host fails with the rule named."""
        with raises(errors.CheckViolation, URL_MESSAGE):
            sql.webhook(url)
        assert sql.one("SELECT count(*) FROM outbox.webhooks") == 0

    @pytest.mark.parametrize(
        "url",
        [
            "https://example.com",
            "https://example.com:8443/a?b=c",
            "https://[2001:db8::1]/x",
            "HTTPS://Example.com",
            "https://hooks.example.com/in#frag",
        ],
    )
    def test_accepts_https_urls(self, sql: SQL, url: str) -> None:
        """Absolute https:// URLs with a host (name, port, IPv6 literal, any case) are stored."""
        hook = sql.webhook(url)
        assert sql.one("SELECT url FROM outbox.webhooks WHERE id = %s", (hook,)) == url

    def test_too_long_url_is_rejected(self, sql: SQL) -> None:
        """A url over 2048 characters is refused with the same message."""
        with raises(errors.CheckViolation, URL_MESSAGE):
            sql.webhook("https://example.com/" + "a" * 2048)

    def test_rule_applies_to_updates(self, sql: SQL) -> None:
        """An UPDATE cannot set a url that an INSERT could not."""
        hook = sql.webhook(HTTPS)
        with raises(errors.CheckViolation, URL_MESSAGE):
            sql("UPDATE outbox.webhooks SET url = 'http://example.com' WHERE id = %s", (hook,))
        assert sql.one("SELECT url FROM outbox.webhooks") == HTTPS


class TestName:
    @pytest.mark.parametrize("name", ["", " ", "    "])
    def test_empty_or_blank_name_is_rejected(self, sql: SQL, name: str) -> None:
        """A name that is empty or only spaces fails with 'name must not be empty'."""
        with raises(errors.CheckViolation, "name must not be empty"):
            sql.webhook(HTTPS, name=name)

    @pytest.mark.parametrize("name", ["\t", "\n", " \t\r\n "])
    def test_other_whitespace_only_name_is_rejected(self, sql: SQL, name: str) -> None:
        """A name made only of tabs or newlines is as empty as one of spaces."""
        with raises(errors.CheckViolation, "name must not be empty"):
            sql.webhook(HTTPS, name=name)

    def test_missing_name_is_rejected(self, sql: SQL) -> None:
        """name is required."""
        with raises(
            errors.NotNullViolation,
            'null value in column "name" of relation "webhooks" violates not-null constraint',
        ):
            sql(
                "INSERT INTO outbox.webhooks (account_id, url, event)"
                " VALUES ('a', %s, 'lead.scored')",
                (HTTPS,),
            )

    def test_blank_name_on_update_is_rejected(self, sql: SQL) -> None:
        """An UPDATE cannot blank the name."""
        hook = sql.webhook(HTTPS, name="CRM")
        with raises(errors.CheckViolation, "name must not be empty"):
            sql("UPDATE outbox.webhooks SET name = '' WHERE id = %s", (hook,))

    def test_a_name_with_text_is_kept(self, sql: SQL) -> None:
        """A non-blank name, surrounding spaces and all, is stored as given."""
        hook = sql.webhook(HTTPS, name=" CRM sync ")
        assert sql.one("SELECT name FROM outbox.webhooks WHERE id = %s", (hook,)) == " CRM sync "


class TestSecret:
    def test_null_secret_is_allowed(self, sql: SQL) -> None:
        """A webhook without a secret (unsigned) is valid."""
        hook = sql.webhook(HTTPS, secret=None)
        assert sql.one("SELECT secret FROM outbox.webhooks WHERE id = %s", (hook,)) is None

    @pytest.mark.parametrize("secret", ["", "x", "a" * 15])
    def test_short_secret_is_rejected(self, sql: SQL, secret: str) -> None:
        """A secret of fewer than 16 characters fails with the rule named."""
        with raises(errors.CheckViolation, "secret must be at least 16 characters"):
            sql.webhook(HTTPS, secret=secret)

    def test_sixteen_characters_are_enough(self, sql: SQL) -> None:
        """A secret of exactly 16 characters is accepted."""
        hook = sql.webhook(HTTPS, secret="a" * 16)
        assert sql.one("SELECT secret FROM outbox.webhooks WHERE id = %s", (hook,)) == "a" * 16

    def test_short_secret_on_update_is_rejected(self, sql: SQL) -> None:
        """An UPDATE cannot shorten the secret below 16 characters, but may remove it."""
        hook = sql.webhook(HTTPS)
        with raises(errors.CheckViolation, "secret must be at least 16 characters"):
            sql("UPDATE outbox.webhooks SET secret = 'short' WHERE id = %s", (hook,))
        sql("UPDATE outbox.webhooks SET secret = NULL WHERE id = %s", (hook,))
        assert sql.one("SELECT secret FROM outbox.webhooks") is None


class TestEvent:
    def test_unknown_event_is_rejected(self, sql: SQL) -> None:
        """A webhook for an event outside the catalogue fails listing the valid names."""
        with raises(errors.CheckViolation, f"unknown event 'lead.won': valid events are {VALID}"):
            sql.webhook(HTTPS, event="lead.won")

    def test_unknown_event_on_update_is_rejected(self, sql: SQL) -> None:
        """An UPDATE cannot switch a webhook to an unknown event."""
        hook = sql.webhook(HTTPS)
        with raises(errors.CheckViolation, f"unknown event '': valid events are {VALID}"):
            sql("UPDATE outbox.webhooks SET event = '' WHERE id = %s", (hook,))

    def test_empty_account_is_rejected(self, sql: SQL) -> None:
        """A webhook belongs to a non-empty account."""
        with raises(errors.CheckViolation, "account_id must not be empty"):
            sql.webhook(HTTPS, account="")

    def test_defaults(self, sql: SQL) -> None:
        """A new webhook is enabled, with created_at = updated_at = the insert's time."""
        with psycopg.connect(sql.url) as conn:
            row = conn.execute(
                "INSERT INTO outbox.webhooks (account_id, name, url, event)"
                " VALUES ('a', 'n', %s, 'lead.scored')"
                " RETURNING enabled, created_at = now(), updated_at = now()",
                (HTTPS,),
            ).fetchone()
        assert row == (True, True, True)


class TestLimit:
    INSERT = (
        "INSERT INTO outbox.webhooks (account_id, name, url, event)"
        " VALUES (%s, 'n', 'https://example.com', 'lead.scored')"
    )

    def test_eleventh_webhook_is_refused(self, sql: SQL) -> None:
        """The 11th webhook of an account fails with SQLSTATE OB409 naming the limit of 10."""
        for i in range(10):
            sql.webhook(HTTPS, enabled=i % 2 == 0)  # disabled ones count too
        with raises(
            psycopg.Error, "account acct_1 already has 10 webhooks, the limit", sqlstate="OB409"
        ) as info:
            sql.webhook(HTTPS)
        assert "10" in str(info.value)
        assert sql.one("SELECT count(*) FROM outbox.webhooks") == 10

    def test_other_accounts_are_unaffected(self, sql: SQL) -> None:
        """An account at the limit does not stop another account from adding webhooks."""
        for _ in range(10):
            sql.webhook(HTTPS, account="acct_1")
        for _ in range(10):
            sql.webhook(HTTPS, account="acct_2")
        assert sql("SELECT account_id, count(*) FROM outbox.webhooks GROUP BY 1 ORDER BY 1") == [
            ("acct_1", 10),
            ("acct_2", 10),
        ]

    def test_a_multi_row_insert_cannot_pass_the_limit(self, sql: SQL) -> None:
        """One INSERT of 11 rows for an account fails as a whole."""
        with raises(psycopg.Error, sqlstate="OB409"):
            sql(
                "INSERT INTO outbox.webhooks (account_id, name, url, event)"
                " SELECT 'acct_1', 'n', 'https://example.com', 'lead.scored'"
                " FROM generate_series(1, 11)"
            )
        assert sql.one("SELECT count(*) FROM outbox.webhooks") == 0

    def test_deleting_one_frees_a_place(self, sql: SQL) -> None:
        """After a delete, the account may add a webhook again."""
        hooks = [sql.webhook(HTTPS) for _ in range(10)]
        sql("DELETE FROM outbox.webhooks WHERE id = %s", (hooks[0],))
        sql.webhook(HTTPS)
        assert sql.one("SELECT count(*) FROM outbox.webhooks") == 10

    def test_limit_holds_under_concurrent_creates(self, database_url: str) -> None:
        """20 simultaneous creates for one account: exactly 10 commit, 10 get OB409."""
        barrier = threading.Barrier(20, timeout=30)

        def create(_: int) -> str:
            with psycopg.connect(database_url) as conn:
                barrier.wait()
                try:
                    conn.execute(self.INSERT, ("acct_1",))
                    # Stay uncommitted a moment so a racy count would see the others miss.
                    conn.execute("SELECT pg_sleep(0.03)")
                    conn.commit()
                    return "ok"
                except psycopg.Error as exc:
                    conn.rollback()
                    return str(exc.sqlstate)

        with ThreadPoolExecutor(20) as pool:
            outcomes = list(pool.map(create, range(20)))
        assert sorted(outcomes) == ["OB409"] * 10 + ["ok"] * 10
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM outbox.webhooks").fetchone() == (10,)

    def test_limit_holds_for_a_repeatable_read_creator(self, sql: SQL, database_url: str) -> None:
        """A create in a REPEATABLE READ transaction cannot pass the limit either."""
        for _ in range(9):
            sql.webhook(HTTPS)
        with psycopg.connect(database_url) as late:
            late.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            late.execute("SELECT 1")  # its snapshot: 9 webhooks
            sql.webhook(HTTPS)  # the 10th commits meanwhile
            try:
                late.execute(self.INSERT, ("acct_1",))
                late.commit()
                refused = None
            except psycopg.Error as exc:
                late.rollback()
                refused = exc.sqlstate
        count = sql.one("SELECT count(*) FROM outbox.webhooks WHERE account_id = 'acct_1'")
        assert (count, refused in ("OB409", "40001")) == (10, True)


class TestUpdate:
    def test_account_cannot_change(self, sql: SQL) -> None:
        """Moving a webhook to another account fails with a check_violation."""
        hook = sql.webhook(HTTPS, account="acct_1")
        with raises(errors.CheckViolation, "account_id of a webhook cannot change"):
            sql("UPDATE outbox.webhooks SET account_id = 'acct_2' WHERE id = %s", (hook,))
        assert sql.one("SELECT account_id FROM outbox.webhooks") == "acct_1"

    def test_setting_the_same_account_is_allowed(self, sql: SQL) -> None:
        """An UPDATE that writes the unchanged account_id goes through."""
        hook = sql.webhook(HTTPS, account="acct_1")
        sql("UPDATE outbox.webhooks SET account_id = 'acct_1', name = 'x' WHERE id = %s", (hook,))
        assert sql.one("SELECT name FROM outbox.webhooks") == "x"

    def test_updated_at_moves_and_created_at_stays(self, sql: SQL) -> None:
        """Any UPDATE sets updated_at to the updating transaction's time."""
        past = datetime(2020, 1, 1, tzinfo=UTC)
        hook = int(
            sql.one(
                "INSERT INTO outbox.webhooks"
                " (account_id, name, url, event, created_at, updated_at)"
                " VALUES ('a', 'n', %s, 'lead.scored', %s, %s) RETURNING id",
                (HTTPS, past, past),
            )
        )
        with psycopg.connect(sql.url) as conn:
            row = conn.execute(
                "UPDATE outbox.webhooks SET name = 'renamed' WHERE id = %s"
                " RETURNING created_at, updated_at = now()",
                (hook,),
            ).fetchone()
        assert row == (past, True)

    def test_updated_at_cannot_be_set_by_hand(self, sql: SQL) -> None:
        """An UPDATE that writes updated_at itself still gets the current time."""
        hook = sql.webhook(HTTPS)
        sql(
            "UPDATE outbox.webhooks SET updated_at = '2000-01-01' WHERE id = %s",
            (hook,),
        )
        assert sql.one("SELECT now() - updated_at < interval '1 minute' FROM outbox.webhooks")


def set_delivery(
    sql: SQL,
    delivery: int,
    status: str,
    finished_at: datetime | None = None,
    last_error: str | None = None,
) -> None:
    sql(
        "UPDATE outbox.deliveries SET status = %s, finished_at = %s, last_error = %s WHERE id = %s",
        (status, finished_at, last_error, delivery),
    )


def delivery_ids(sql: SQL, hook: int) -> list[int]:
    return [
        int(r[0])
        for r in sql("SELECT id FROM outbox.deliveries WHERE webhook_id = %s ORDER BY id", (hook,))
    ]


class TestEnabled:
    def test_disabled_webhook_gets_no_delivery(self, sql: SQL) -> None:
        """A webhook created disabled is skipped by the fan-out."""
        hook = sql.webhook(HTTPS, enabled=False)
        sql.emit()
        assert delivery_ids(sql, hook) == []

    def test_disabling_cancels_pending_deliveries(self, sql: SQL) -> None:
        """Disabling cancels the webhook's pending deliveries and stamps finished_at."""
        hook = sql.webhook(HTTPS)
        other = sql.webhook(HTTPS)
        sql.emit()
        sql.emit()
        done = sql.emit()
        done_delivery = sql.one(
            "SELECT id FROM outbox.deliveries WHERE webhook_id = %s AND event_id = %s",
            (hook, done),
        )
        finished = datetime(2026, 1, 1, tzinfo=UTC)
        set_delivery(sql, done_delivery, "succeeded", finished)
        with psycopg.connect(sql.url) as conn:
            conn.execute("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
            now = conn.execute("SELECT now()").fetchone()
        assert now is not None
        rows = sql(
            "SELECT status, finished_at, last_error FROM outbox.deliveries"
            " WHERE webhook_id = %s ORDER BY id",
            (hook,),
        )
        assert rows == [
            ("cancelled", now[0], "webhook disabled"),
            ("cancelled", now[0], "webhook disabled"),
            ("succeeded", finished, None),
        ]
        # The other webhook's deliveries are untouched.
        assert sql(
            "SELECT DISTINCT status FROM outbox.deliveries WHERE webhook_id = %s", (other,)
        ) == [("pending",)]

    def test_reenabling_does_not_revive_cancelled_deliveries(self, sql: SQL) -> None:
        """Enabling again leaves cancelled deliveries cancelled; only new events flow."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        sql.emit()  # while disabled: nothing for it
        sql("UPDATE outbox.webhooks SET enabled = true WHERE id = %s", (hook,))
        assert sql("SELECT status FROM outbox.deliveries WHERE webhook_id = %s", (hook,)) == [
            ("cancelled",)
        ]
        later = sql.emit()
        assert sql(
            "SELECT event_id, status FROM outbox.deliveries WHERE webhook_id = %s ORDER BY id",
            (hook,),
        )[1:] == [(later, "pending")]

    def test_other_updates_do_not_cancel(self, sql: SQL) -> None:
        """Renaming or re-pointing an enabled webhook keeps its pending deliveries."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        sql(
            "UPDATE outbox.webhooks SET name = 'x', url = 'https://new.example.com',"
            " enabled = true WHERE id = %s",
            (hook,),
        )
        assert sql("SELECT status FROM outbox.deliveries") == [("pending",)]


class TestDelete:
    def test_delete_removes_its_deliveries_and_attempts(self, sql: SQL) -> None:
        """Deleting a webhook cascades to its deliveries and their attempts, not to others."""
        hook = sql.webhook(HTTPS)
        other = sql.webhook(HTTPS)
        sql.emit()
        sql(
            "INSERT INTO outbox.delivery_attempts"
            " (delivery_id, attempt, started_at, duration_ms, response_status, error)"
            " SELECT id, 1, now(), 5, 503, 'HTTP 503' FROM outbox.deliveries"
        )
        sql("DELETE FROM outbox.webhooks WHERE id = %s", (hook,))
        assert sql("SELECT webhook_id FROM outbox.deliveries") == [(other,)]
        assert sql.one("SELECT count(*) FROM outbox.delivery_attempts") == 1
        assert sql.one("SELECT count(*) FROM outbox.events") == 1


STATUS_COLUMNS = [
    "id",
    "account_id",
    "name",
    "url",
    "event",
    "enabled",
    "last_delivery_status",
    "last_delivery_at",
    "last_error",
    "pending",
    "retrying",
    "last_attempt_at",
    "last_attempt_status",
    "last_attempt_error",
    "next_retry_at",
    "format",
    "disabled_reason",
]


def status(sql: SQL, hook: int) -> tuple[object, ...]:
    rows = sql(
        "SELECT last_delivery_status, last_delivery_at, last_error, pending"
        " FROM outbox.webhook_status WHERE id = %s",
        (hook,),
    )
    assert len(rows) == 1, rows
    return rows[0]


class TestStatusView:
    T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def test_columns(self, sql: SQL) -> None:
        """The view has the contract's columns, in order."""
        cur = sql.conn.execute("SELECT * FROM outbox.webhook_status LIMIT 0")
        assert cur.description is not None
        assert [c.name for c in cur.description] == STATUS_COLUMNS

    def test_one_row_per_webhook(self, sql: SQL) -> None:
        """Every webhook appears once, with or without deliveries, disabled ones too."""
        a = sql.webhook(HTTPS, account="acct_1", name="a")
        b = sql.webhook(HTTPS, account="acct_1", name="b", enabled=False)
        c = sql.webhook("https://c.example.com", account="acct_2", name="c", event="lead.created")
        for _ in range(3):
            sql.emit("acct_1")
        for d in delivery_ids(sql, a)[:2]:
            set_delivery(sql, d, "failed", self.T0, "HTTP 500")
        rows = [r[:10] for r in sql("SELECT * FROM outbox.webhook_status ORDER BY id")]
        assert rows == [
            (a, "acct_1", "a", HTTPS, "lead.scored", True, "failed", self.T0, "HTTP 500", 1),
            (b, "acct_1", "b", HTTPS, "lead.scored", False, None, None, None, 0),
            (
                c,
                "acct_2",
                "c",
                "https://c.example.com",
                "lead.created",
                True,
                None,
                None,
                None,
                0,
            ),
        ]

    def test_pending_counts_pending_deliveries(self, sql: SQL) -> None:
        """pending counts the webhook's deliveries still to be sent, nothing else."""
        hook = sql.webhook(HTTPS)
        sql.webhook(HTTPS)
        for _ in range(4):
            sql.emit()
        assert status(sql, hook) == (None, None, None, 4)
        ids = delivery_ids(sql, hook)
        set_delivery(sql, ids[0], "cancelled", self.T0, "webhook disabled")
        assert status(sql, hook)[3] == 3

    def test_last_finished_failure_is_shown_with_its_reason(self, sql: SQL) -> None:
        """The most recently finished delivery decides: failed, when, and why."""
        hook = sql.webhook(HTTPS)
        for _ in range(4):
            sql.emit()
        d1, d2, d3, _ = delivery_ids(sql, hook)
        # Finish order differs from id order on purpose.
        set_delivery(sql, d2, "succeeded", self.T0)
        set_delivery(sql, d1, "failed", self.T0 + timedelta(hours=1), "HTTP 503")
        set_delivery(sql, d3, "cancelled", self.T0 + timedelta(hours=2), "webhook disabled")
        assert status(sql, hook) == ("failed", self.T0 + timedelta(hours=1), "HTTP 503", 1)

    def test_last_error_is_null_after_a_success(self, sql: SQL) -> None:
        """A success after a failure clears last_error."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        sql.emit()
        d1, d2 = delivery_ids(sql, hook)
        set_delivery(sql, d1, "failed", self.T0, "timeout after 10s")
        set_delivery(sql, d2, "succeeded", self.T0 + timedelta(minutes=1), "HTTP 500")
        assert status(sql, hook) == ("succeeded", self.T0 + timedelta(minutes=1), None, 0)

    def test_cancelled_deliveries_do_not_count(self, sql: SQL) -> None:
        """A webhook whose only finished deliveries were cancelled has no last status."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        assert status(sql, hook) == (None, None, None, 0)

    def test_pending_retry_of_a_failure_does_not_hide_the_previous_result(self, sql: SQL) -> None:
        """A delivery still pending does not count as finished, whatever its last_error."""
        hook = sql.webhook(HTTPS)
        sql.emit()
        sql.emit()
        d1, d2 = delivery_ids(sql, hook)
        set_delivery(sql, d1, "succeeded", self.T0)
        sql("UPDATE outbox.deliveries SET last_error = 'HTTP 502' WHERE id = %s", (d2,))
        assert status(sql, hook) == ("succeeded", self.T0, None, 1)
