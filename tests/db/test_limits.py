"""An endpoint's own headers, rate limits and 429s in the database (migration 13):
the rules on headers and rate_limit, the claim's pace, next_due, and record's slowdowns."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from outbox import db
from tests.conftest import SQL
from tests.db.helpers import HTTPS, claim, raises, record


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The dispatcher's side: an autocommit connection of its own."""
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def hook_with(sql: SQL, headers: Any = None, rate_limit: int | None = None) -> int:
    return int(
        sql.one(
            "INSERT INTO outbox.webhooks (account_id, name, url, event, headers, rate_limit)"
            " VALUES ('acct_1', 'hook', %s, 'lead.scored', coalesce(%s::jsonb, '{}'), %s)"
            " RETURNING id",
            (HTTPS, None if headers is None else json.dumps(headers), rate_limit),
        )
    )


def emit_many(sql: SQL, n: int) -> None:
    sql(
        "INSERT INTO outbox.events (account_id, event)"
        " SELECT 'acct_1', 'lead.scored' FROM generate_series(1, %s)",
        (n,),
    )


def next_due(conn: psycopg.Connection[Any], pace_ahead: float = 0.0) -> float | None:
    found = conn.execute(db.query("next_due"), {"pace_ahead": pace_ahead}).fetchone()
    assert found is not None
    return None if found[0] is None else float(found[0])


class TestHeaders:
    def test_default_is_no_headers(self, sql: SQL) -> None:
        """A webhook created without headers has {}."""
        hook = sql.webhook(HTTPS)
        assert sql.one("SELECT headers FROM outbox.webhooks WHERE id = %s", (hook,)) == {}

    def test_credentials_are_stored(self, sql: SQL) -> None:
        """Up to ten headers with token names and printable values are kept as given."""
        headers = {"Authorization": "Bearer abc.def", "X-Api-Key": "k-1"} | {
            f"X-Extra-{i}": f"value {i} !~" for i in range(8)
        }
        hook = hook_with(sql, headers)
        assert sql.one("SELECT headers FROM outbox.webhooks WHERE id = %s", (hook,)) == headers

    @pytest.mark.parametrize(
        "name",
        [
            "Host",
            "content-type",
            "Content-Length",
            "TRANSFER-ENCODING",
            "Connection",
            "User-Agent",
            "X-Webhook-Signature",
            "x-webhook-anything",
            "webhook-id",
            "Webhook-Whatever",
        ],
    )
    def test_names_outbox_sets_are_refused(self, sql: SQL, name: str) -> None:
        """Every header outbox sets itself, in any case, is refused naming it."""
        with raises(
            errors.CheckViolation, f"headers: {name} is set by outbox itself and cannot be given"
        ):
            hook_with(sql, {name: "x"})
        assert sql.one("SELECT count(*) FROM outbox.webhooks") == 0

    @pytest.mark.parametrize("name", ["", "Has Space", "Colon:", "Ünicode", "a" * 65, "(x)"])
    def test_names_that_are_not_http_tokens_are_refused(self, sql: SQL, name: str) -> None:
        """A name that is not an HTTP token of 1 to 64 characters is refused."""
        with raises(errors.CheckViolation) as info:
            hook_with(sql, {name: "x"})
        message = info.value.diag.message_primary or ""
        assert message.startswith("headers: '") and "is not a header name" in message

    def test_eleven_headers_are_refused(self, sql: SQL) -> None:
        """At most 10 headers."""
        with raises(errors.CheckViolation, "headers has 11 headers; the limit is 10"):
            hook_with(sql, {f"X-H{i}": "v" for i in range(11)})

    def test_the_same_name_twice_in_another_case_is_refused(self, sql: SQL) -> None:
        """Header names are not case-sensitive: two spellings of one are refused."""
        with raises(
            errors.CheckViolation,
            "headers: X-KEY and x-key are the same header (names are not case-sensitive)",
        ):
            hook_with(sql, {"X-KEY": "a", "x-key": "b"})

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (1, "headers: the value of X-Key must be a string, not number"),
            (None, "headers: the value of X-Key must be a string, not null"),
            ({"a": "b"}, "headers: the value of X-Key must be a string, not object"),
            ("a" * 1025, "headers: the value of X-Key is 1025 characters; the limit is 1024"),
            (
                "line\r\nInjected: yes",
                "headers: the value of X-Key may have only printable ASCII characters"
                " (no line breaks or other control characters)",
            ),
            (
                "caf\u00e9",
                "headers: the value of X-Key may have only printable ASCII characters"
                " (no line breaks or other control characters)",
            ),
        ],
    )
    def test_bad_values_are_refused_without_showing_them(
        self, sql: SQL, value: Any, message: str
    ) -> None:
        """A value that is not a string of at most 1024 printable characters is refused;
        the message names the header and never shows the value."""
        with raises(errors.CheckViolation, message):
            hook_with(sql, {"X-Key": value})

    def test_a_value_of_1024_characters_is_taken(self, sql: SQL) -> None:
        hook = hook_with(sql, {"X-Key": "a" * 1024})
        assert (
            sql.one("SELECT length(headers->>'X-Key') FROM outbox.webhooks WHERE id = %s", (hook,))
            == 1024
        )

    @pytest.mark.parametrize("headers", [[], "Authorization: x", 1])
    def test_headers_must_be_an_object(self, sql: SQL, headers: Any) -> None:
        with raises(errors.CheckViolation) as info:
            hook_with(sql, headers)
        message = info.value.diag.message_primary or ""
        assert message.startswith("headers must be a JSON object of header names to values, not")

    def test_null_headers_are_refused(self, sql: SQL) -> None:
        hook = sql.webhook(HTTPS)
        with raises(errors.NotNullViolation):
            sql("UPDATE outbox.webhooks SET headers = NULL WHERE id = %s", (hook,))

    def test_the_rules_hold_for_updates(self, sql: SQL) -> None:
        """An UPDATE cannot set headers an INSERT could not."""
        hook = hook_with(sql, {"Authorization": "Bearer a"})
        with raises(
            errors.CheckViolation, "headers: Host is set by outbox itself and cannot be given"
        ):
            sql('UPDATE outbox.webhooks SET headers = \'{"Host": "x"}\' WHERE id = %s', (hook,))
        assert sql.one("SELECT headers FROM outbox.webhooks") == {"Authorization": "Bearer a"}


class TestRateLimit:
    @pytest.mark.parametrize("limit", [0, -1])
    def test_below_one_is_refused(self, sql: SQL, limit: int) -> None:
        with raises(
            errors.CheckViolation,
            "rate_limit must be at least 1 (attempts per second), or null for no limit",
        ):
            hook_with(sql, rate_limit=limit)

    def test_null_and_one_are_taken(self, sql: SQL) -> None:
        unlimited = hook_with(sql)
        limited = hook_with(sql, rate_limit=1)
        assert sql("SELECT id, rate_limit FROM outbox.webhooks ORDER BY id") == [
            (unlimited, None),
            (limited, 1),
        ]


class TestClaimedJob:
    def test_a_claim_carries_the_headers_and_slowdowns(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """The claimed row has the webhook's headers as they are at the claim, the
        delivery's slowdowns, and no delay without a rate limit."""
        hook = hook_with(sql, {"Authorization": "Bearer old"})
        sql.emit()
        sql('UPDATE outbox.webhooks SET headers = \'{"Authorization": "Bearer new"}\'')
        [job] = claim(conn)
        assert job["webhook_id"] == hook
        assert job["headers"] == {"Authorization": "Bearer new"}
        assert job["slowdowns"] == 0
        assert job["delay"] == 0


def pace(sql: SQL, hook: int) -> Any:
    return sql.one(
        "SELECT extract(epoch FROM next_start_at - now()) FROM outbox.webhook_pace"
        " WHERE webhook_id = %s",
        (hook,),
    )


class TestPace:
    def test_one_attempt_per_interval_at_a_time(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """With nothing claimed ahead, a webhook limited to 2/s gets one attempt, due at
        once, and then none until half a second has passed; its next start is then half
        a second away."""
        hook = hook_with(sql, rate_limit=2)
        emit_many(sql, 5)
        [first] = claim(conn, pace_ahead=0)
        assert first["delay"] <= 0
        assert claim(conn, pace_ahead=0) == []
        assert 0.4 < float(pace(sql, hook)) <= 0.5
        assert sql.one("SELECT count(*) FROM outbox.deliveries WHERE lease IS NULL") == 4

    def test_attempts_within_the_horizon_are_spaced(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """Claiming ahead, a webhook limited to 10/s gets the attempts that may start in
        the next 0.35 s: four, 0.1 s apart; the pace moves on by 0.4 s."""
        hook = hook_with(sql, rate_limit=10)
        emit_many(sql, 10)
        rows = claim(conn, pace_ahead=0.35)
        delays = sorted(r["delay"] for r in rows)
        assert len(delays) == 4
        gaps = [b - a for a, b in itertools.pairwise(delays)]
        assert all(abs(gap - 0.1) < 1e-3 for gap in gaps), delays
        assert -0.05 < delays[0] <= 0
        assert 0.35 < float(pace(sql, hook)) <= 0.4
        # The next start, 0.4 s on, is past a horizon of 0.1 s: nothing more for now. (A
        # horizon of 0.35 s again would be crossed by a claim only 50 ms later.)
        assert claim(conn, pace_ahead=0.1) == []

    def test_a_limited_backlog_leaves_room_for_others(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """The deliveries of a webhook at its limit are not even scanned: a claim whose
        window they would fill gets another webhook's deliveries behind them."""
        limited = hook_with(sql, rate_limit=1)
        emit_many(sql, 40)
        other = sql.webhook(HTTPS, account="acct_2")
        for _ in range(5):
            sql.emit(account="acct_2")
        first = claim(conn, limit=5, pace_ahead=0)
        # A window of 10 holds only the limited webhook's oldest rows: one of them goes.
        assert [r["webhook_id"] for r in first] == [limited]
        second = claim(conn, limit=5, pace_ahead=0)
        assert [r["webhook_id"] for r in second] == [other] * 5

    def test_next_due_waits_for_the_pace(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        """With only a limited backlog left, the dispatcher is told to look again when
        the next attempt may be claimed, not at once."""
        hook_with(sql, rate_limit=2)
        emit_many(sql, 3)
        claim(conn, pace_ahead=0)
        due = next_due(conn, pace_ahead=0)
        assert due is not None and 0.4 < due <= 0.5
        # Claiming ahead, the attempt may be claimed 0.1 s before it starts.
        due = next_due(conn, pace_ahead=0.1)
        assert due is not None and 0.3 < due <= 0.4

    def test_next_due_ignores_a_pace_with_nothing_pending(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A limited webhook with no backlog wakes no one."""
        hook_with(sql, rate_limit=1)
        sql.emit()
        claim(conn, pace_ahead=0)
        assert next_due(conn) is not None  # the lease
        sql("UPDATE outbox.deliveries SET status = 'succeeded', finished_at = now()")
        assert next_due(conn) is None

    def test_concurrent_claims_share_the_pace(
        self, sql: SQL, conn: psycopg.Connection[Any], database_url: str
    ) -> None:
        """A claim of the same webhook by another dispatcher, while one is under way,
        waits for it and spaces its own attempts after the first one's."""
        hook = hook_with(sql, rate_limit=1)
        emit_many(sql, 8)
        other_rows: list[dict[str, Any]] = []
        # A claim locks a window of twice its limit: the other finds rows of its own.
        with conn.transaction():
            mine = claim(conn, limit=2, pace_ahead=1.5)
            # Starting now and in 1 s; the next start is 2 s away.
            assert sorted(round(r["delay"]) for r in mine) == [0, 1]

            def other() -> None:
                with psycopg.connect(database_url, autocommit=True) as c:
                    other_rows.extend(claim(c, limit=2, pace_ahead=1.5))

            thread = threading.Thread(target=other)
            thread.start()
            # It waits on the pace row this claim holds.
            thread.join(0.5)
            assert thread.is_alive()
        thread.join(10)
        # Its two start 2 s and 3 s after the first claim began, 0.5 s before it looked.
        assert len(other_rows) == 2
        assert {r["id"] for r in other_rows}.isdisjoint(r["id"] for r in mine)
        delays = sorted(r["delay"] for r in other_rows)
        # Each row's delay is read against the clock as that row is returned: on a busy
        # machine the second is read a few milliseconds after the first.
        assert 1.3 < delays[0] <= 1.5 and abs(delays[1] - delays[0] - 1) < 0.01, delays
        assert 3.3 < float(pace(sql, hook)) <= 3.5

    def test_a_delayed_attempt_is_leased_from_its_start(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        hook_with(sql, rate_limit=1)
        emit_many(sql, 2)
        rows = claim(conn, pace_ahead=1.5, lease_seconds=30)
        last = max(rows, key=lambda r: r["delay"])
        assert 0.9 < last["delay"] <= 1
        lease = sql.one(
            "SELECT extract(epoch FROM leased_until - now()) FROM outbox.deliveries WHERE id = %s",
            (last["id"],),
        )
        assert 30.9 < float(lease) <= 31

    def test_removing_the_limit_lets_the_backlog_go(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A webhook whose limit is removed is claimed as any other, its pace unread."""
        hook = hook_with(sql, rate_limit=1)
        emit_many(sql, 5)
        assert len(claim(conn, pace_ahead=0)) == 1
        sql("UPDATE outbox.webhooks SET rate_limit = NULL WHERE id = %s", (hook,))
        rows = claim(conn, pace_ahead=0)
        assert len(rows) == 4 and all(r["delay"] == 0 for r in rows)

    def test_a_deleted_webhook_takes_its_pace(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        hook = hook_with(sql, rate_limit=1)
        sql.emit()
        claim(conn, pace_ahead=0)
        assert sql.one("SELECT count(*) FROM outbox.webhook_pace") == 1
        sql("DELETE FROM outbox.webhooks WHERE id = %s", (hook,))
        assert sql.one("SELECT count(*) FROM outbox.webhook_pace") == 0


class TestSlowdowns:
    def test_a_let_off_429_does_not_count_towards_retries(
        self, sql: SQL, conn: psycopg.Connection[Any]
    ) -> None:
        """A result marked slowdown is recorded as an attempt, the delivery stays pending,
        and the retry schedule does not move: retry_base goes up with attempts."""
        sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        [job] = claim(conn, lease=lease)
        record(
            conn,
            [
                {
                    "id": job["id"],
                    "lease": lease,
                    "attempt": 1,
                    "status": 429,
                    "error": "HTTP 429",
                    "outcome": "pending",
                    "retry_in": 0,
                    "slowdown": True,
                }
            ],
        )
        assert sql("SELECT status, attempts, retry_base, slowdowns FROM outbox.deliveries") == [
            ("pending", 1, 1, 1)
        ]
        assert sql.one("SELECT response_status FROM outbox.delivery_attempts") == 429
        [again] = claim(conn)
        assert (again["attempt"], again["retry_base"], again["slowdowns"]) == (2, 1, 1)

    def test_other_failures_count_as_before(self, sql: SQL, conn: psycopg.Connection[Any]) -> None:
        sql.webhook(HTTPS)
        sql.emit()
        lease = uuid.uuid4()
        [job] = claim(conn, lease=lease)
        record(
            conn,
            [
                {
                    "id": job["id"],
                    "lease": lease,
                    "attempt": 1,
                    "status": 429,
                    "error": "HTTP 429",
                    "outcome": "pending",
                    "retry_in": 0,
                }
            ],
        )
        assert sql("SELECT attempts, retry_base, slowdowns FROM outbox.deliveries") == [(1, 0, 0)]


class TestPrivileges:
    @pytest.mark.parametrize(
        "function",
        [
            "outbox.claim_v3(integer, integer, uuid, double precision, integer, bigint[],"
            " bigint[], bigint[], integer, text[], text[], bigint[], double precision)",
            "outbox.next_due_v3(double precision)",
            "outbox.record_v2(json)",
            "outbox.valid_headers(jsonb)",
        ],
    )
    def test_the_sidecar_runs_them_and_producers_do_not(self, sql: SQL, function: str) -> None:
        if not sql("SELECT 1 FROM pg_roles WHERE rolname = 'outbox_sidecar'"):
            pytest.skip("migrate could not create outbox_sidecar")
        assert sql.one(
            "SELECT has_function_privilege('outbox_sidecar', %s, 'EXECUTE')", (function,)
        )
        assert not sql.one(
            "SELECT has_function_privilege('outbox_producer', %s, 'EXECUTE')", (function,)
        )
