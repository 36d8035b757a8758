"""End to end: an endpoint's own headers, rate limits across sidecars, and answers of 429
that do not use up retries (CONTRACT sections 18 and 19), with real `outbox run`
processes and a real HTTPS receiver."""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Callable

import pytest

from tests.conftest import SQL, Sidecar, wait_until
from tests.receiver import Received, Receiver, Reply

Start = Callable[..., Sidecar]
TOKEN = "Bearer crm-token-0123456789"


def limited_hook(sql: SQL, url: str, *, rate_limit: int | None = None, **headers: str) -> int:
    return int(
        sql.one(
            "INSERT INTO outbox.webhooks (account_id, name, url, event, headers, rate_limit)"
            " VALUES ('acct_1', 'CRM', %s, 'lead.scored', %s, %s) RETURNING id",
            (url, json.dumps(headers), rate_limit),
        )
    )


def statuses(sql: SQL, hook: int) -> dict[str, int]:
    rows = sql(
        "SELECT status, count(*) FROM outbox.deliveries WHERE webhook_id = %s GROUP BY status",
        (hook,),
    )
    return {status: int(n) for status, n in rows}


def checks_bearer(expected: list[str]) -> Callable[[Received], Reply]:
    """A receiver that wants ``Authorization: <expected[0]>`` (which may change)."""
    return lambda got: Reply(200 if got.headers.get("Authorization") == expected[0] else 401)


class TestHeaders:
    def test_a_receiver_that_checks_a_bearer_credential(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Deliveries carry the webhook's Authorization header beside the signature's
        headers, and a changed credential goes with the next attempt claimed."""
        expected = [TOKEN]
        receiver.respond = checks_bearer(expected)
        hook = limited_hook(sql, receiver.url(), Authorization=TOKEN, **{"X-Api-Key": "key-1"})
        sql("UPDATE outbox.webhooks SET secret = 'whsec_test_secret_0123' WHERE id = %s", (hook,))
        sidecar = sidecars(OUTBOX_RETRY_DELAYS="0.5,0.5,0.5")
        sql.emit()
        (got,) = receiver.wait_for(1)
        assert got.headers["Authorization"] == TOKEN
        assert got.headers["X-Api-Key"] == "key-1"
        assert got.headers["X-Webhook-Signature"].startswith("sha256=")
        wait_until(lambda: statuses(sql, hook) == {"succeeded": 1}, what="the delivery")

        # The endpoint rotates its credential: the old one is refused, a retry then
        # carries the new one as soon as the webhook has it.
        expected[0] = "Bearer rotated-0123456789"
        sql.emit()
        receiver.wait_for(2)
        sql(
            "UPDATE outbox.webhooks SET headers = jsonb_set(headers, '{Authorization}', %s)"
            " WHERE id = %s",
            (json.dumps(expected[0]), hook),
        )
        wait_until(lambda: statuses(sql, hook) == {"succeeded": 2}, what="the retry")
        last = receiver.received()[-1]
        assert last.headers["Authorization"] == expected[0]
        assert int(last.headers["X-Webhook-Attempt"]) >= 2
        # The credential is in no log line.
        assert "crm-token" not in sidecar.log() and "rotated-0123" not in sidecar.log()

    def test_an_authorization_header_replaces_credentials_in_the_url(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A URL with user:password@ sends Basic credentials; given an Authorization
        header too, the webhook's header is what goes."""
        url = receiver.url().replace("https://", "https://user:password@")
        hook = limited_hook(sql, url, Authorization=TOKEN)
        sidecars()
        sql.emit()
        (got,) = receiver.wait_for(1)
        assert got.headers["Authorization"] == TOKEN
        wait_until(lambda: statuses(sql, hook) == {"succeeded": 1}, what="the delivery")


class TestRateLimit:
    @pytest.mark.slow
    def test_three_sidecars_keep_a_limit_of_5_per_second(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """150 queued deliveries to a webhook limited to 5/s, three sidecars: over any
        10 seconds at most 10 x 5 + 1 requests arrive, and every delivery succeeds at
        its first attempt (none waits as a failure). Thirty seconds of arrivals hold
        three whole windows, which is enough to see a limit kept per sidecar (3 x 5/s)
        rather than across them."""
        hook = limited_hook(sql, receiver.url(), rate_limit=5)
        sql(
            "INSERT INTO outbox.events (account_id, event, data)"
            " SELECT 'acct_1', 'lead.scored', jsonb_build_object('n', n)"
            " FROM generate_series(1, 150) n"
        )
        started = [sidecars() for _ in range(3)]
        receiver.wait_for(150, timeout=60)
        wait_until(lambda: statuses(sql, hook) == {"succeeded": 150}, what="150 deliveries")
        arrivals = sorted(r.at for r in receiver.received())
        assert len(arrivals) == 150
        # The most that arrived within 10 seconds of any arrival (any window with more
        # would have one starting at an arrival).
        busiest = max(
            bisect.bisect_right(arrivals, start + 10.0) - i for i, start in enumerate(arrivals)
        )
        assert busiest <= 10 * 5 + 1, busiest
        assert sql.one("SELECT max(attempts) FROM outbox.deliveries") == 1
        # The three shared the work: the limit held across sidecars, not within one.
        made = [
            sum(1 for line in sidecar.log_lines() if line.get("event") == "attempt")
            for sidecar in started
        ]
        assert sum(made) == 150 and all(made), made

    def test_a_limited_backlog_does_not_hold_up_the_others(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """With a webhook limited to 1/s and 60 queued for it, another webhook's 30
        deliveries go out, not behind that backlog nor through its slots."""
        limited = limited_hook(sql, receiver.url("/slow"), rate_limit=1)
        sql(
            "INSERT INTO outbox.events (account_id, event)"
            " SELECT 'acct_1', 'lead.scored' FROM generate_series(1, 60)"
        )
        sidecars(OUTBOX_CONCURRENCY="4")
        receiver.wait_for(1, "/slow")
        other = sql.webhook(receiver.url("/fast"), account="acct_2", event="lead.created")
        for _ in range(30):
            sql.emit(account="acct_2", event="lead.created")
        wait_until(lambda: statuses(sql, other) == {"succeeded": 30}, what="the other webhook")
        # At 1/s, most of the limited backlog still waits, pending, none failed.
        waiting = statuses(sql, limited)
        assert waiting.get("pending", 0) >= 40 and "failed" not in waiting, waiting


class TestSlowDown:
    def test_five_429s_then_200_succeeds_with_three_retries(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """An endpoint that says "slow down" five times, then takes the delivery: with
        three retries configured it still ends succeeded, and X-Webhook-Attempt counts
        every request."""
        answers = iter([*([Reply(429)] * 5), Reply(200)])
        lock = threading.Lock()

        def respond(_: Received) -> Reply:
            with lock:
                return next(answers)

        receiver.respond = respond
        hook = sql.webhook(receiver.url())
        sidecars(OUTBOX_RETRY_DELAYS="0.05,0.1,0.15")
        sql.emit()
        got = receiver.wait_for(6)
        wait_until(lambda: statuses(sql, hook) == {"succeeded": 1}, what="the delivery")
        assert [r.headers["X-Webhook-Attempt"] for r in got] == ["1", "2", "3", "4", "5", "6"]
        assert sql("SELECT attempts, slowdowns, last_error FROM outbox.deliveries") == [
            (6, 5, None)
        ]
        assert sql(
            "SELECT attempt, response_status FROM outbox.delivery_attempts ORDER BY attempt"
        ) == [(1, 429), (2, 429), (3, 429), (4, 429), (5, 429), (6, 200)]

    def test_after_ten_429s_they_count_like_any_failure(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """An endpoint that only ever answers 429 gets 10 requests let off and then the
        usual 1 + 3 attempts: 14 in all, then the delivery fails with the reason."""
        receiver.respond = lambda _: Reply(429)
        hook = sql.webhook(receiver.url())
        sidecars(OUTBOX_RETRY_DELAYS="0.02,0.02,0.02")
        sql.emit()
        wait_until(lambda: statuses(sql, hook) == {"failed": 1}, what="the delivery to fail")
        assert sql("SELECT attempts, slowdowns, last_error FROM outbox.deliveries") == [
            (14, 10, "HTTP 429")
        ]
        assert len(receiver.received()) == 14

    def test_retry_after_is_what_a_429_waits(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A 429 with Retry-After is tried again after it, not after the scheduled delay
        (a minute here), and still uses up no retry."""
        answers = iter([Reply(429, {"Retry-After": "1"}), Reply(200)])
        receiver.respond = lambda _: next(answers)
        sql.webhook(receiver.url())
        sidecars(OUTBOX_RETRY_DELAYS="60,60")
        sql.emit()
        first, second = receiver.wait_for(2, timeout=20)
        assert second.at - first.at >= 0.9
        # The second answer is recorded a moment after it came.
        row = wait_until(
            lambda: sql(
                "SELECT status, attempts, retry_base FROM outbox.deliveries WHERE"
                " status <> 'pending'"
            ),
            what="the delivery to finish",
        )
        assert row == [("succeeded", 2, 1)]
