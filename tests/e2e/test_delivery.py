"""End to end: real `outbox run` processes deliver to a real HTTPS receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import standardwebhooks

from outbox import __version__
from tests.conftest import SIDECAR_LOGIN, SQL, Sidecar, wait_until
from tests.e2e.test_api import Answer, make_token
from tests.receiver import BlackHole, Receiver, Reply

SECRET = "whsec_test_secret_0123"
Start = Callable[..., Sidecar]


def delivery(sql: SQL, delivery_id: int | None = None) -> dict[str, Any]:
    rows = sql(
        "SELECT id, status, attempts, last_error, last_response_status, finished_at"
        " FROM outbox.deliveries WHERE %s::bigint IS NULL OR id = %s ORDER BY id",
        (delivery_id, delivery_id),
    )
    keys = ("id", "status", "attempts", "last_error", "last_response_status", "finished_at")
    assert rows, "no delivery"
    return dict(zip(keys, rows[-1], strict=True))


def finished(sql: SQL, timeout: float = 20) -> dict[str, Any]:
    return wait_until(
        lambda: (d := delivery(sql))["status"] != "pending" and d,
        timeout=timeout,
        what="the delivery to finish",
    )


class TestWireFormat:
    def test_signed_delivery_matches_the_contract(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A delivery carries the contract's headers and body, signed both ways."""
        sql.webhook(receiver.url(), secret=SECRET)
        sidecars()
        data = {"lead": {"id": 42, "name": "Ada", "tags": ["é", "☃"]}, "score": {"overall": 87}}
        sql("BEGIN")
        sql(
            "INSERT INTO outbox.events (account_id, event, data, occurred_at) VALUES"
            " ('acct_1', 'lead.scored', %s, '2026-11-27T12:34:56.789Z')",
            (json.dumps(data),),
        )
        sql("COMMIT")
        (got,) = receiver.wait_for(1)
        d = finished(sql)
        assert d["status"] == "succeeded" and d["attempts"] == 1

        body = json.loads(got.body)
        assert body == {
            "event": "lead.scored",
            "timestamp": "2026-11-27T12:34:56.789Z",
            "data": data,
        }
        h = got.headers
        assert h["Content-Type"] == "application/json"
        assert h["User-Agent"] == f"outbox/{__version__}"
        assert h["X-Webhook-Event"] == "lead.scored"
        assert h["X-Webhook-Id"] == str(d["id"]) == h["webhook-id"]
        assert h["X-Webhook-Attempt"] == "1"
        assert "X-Webhook-Test" not in h
        expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
        assert h["X-Webhook-Signature"] == "sha256=" + expected
        assert abs(int(h["webhook-timestamp"]) - time.time()) < 60
        standardwebhooks.Webhook(SECRET.encode()).verify(got.body, h)

    def test_no_secret_means_no_signature_headers(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A webhook without a secret gets unsigned deliveries, with no signature headers."""
        sql.webhook(receiver.url(), secret=None)
        sidecars()
        sql.emit()
        (got,) = receiver.wait_for(1)
        for header in ("X-Webhook-Signature", "webhook-signature", "webhook-timestamp"):
            assert header not in got.headers

    def test_attempt_log_line_never_shows_the_secret(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Each attempt logs one line with its ids, status and duration, never the secret."""
        hook = sql.webhook(receiver.url(), secret=SECRET)
        sidecar = sidecars()
        sql.emit()
        finished(sql)
        assert sidecar.stop() == 0
        attempts = [line for line in sidecar.log_lines() if line.get("event") == "attempt"]
        assert len(attempts) == 1
        line = attempts[0]
        assert line["webhook_id"] == hook and line["attempt"] == 1 and line["status"] == 200
        assert isinstance(line["duration_ms"], int) and line["delivery_id"] > 0
        assert SECRET not in sidecar.log()


class TestFanOut:
    def test_only_matching_webhooks_receive(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """An event goes to the account's webhooks for that event, and to no other."""
        sql.webhook(receiver.url("/match1"))
        sql.webhook(receiver.url("/match2"))
        sql.webhook(receiver.url("/other-event"), event="reply.received")
        sql.webhook(receiver.url("/other-account"), account="acct_2")
        sql.webhook(receiver.url("/disabled"), enabled=False)
        sidecars()
        sql.emit()
        receiver.wait_for(1, "/match1")
        receiver.wait_for(1, "/match2")
        wait_until(
            lambda: (
                sql.one("SELECT count(*) FROM outbox.deliveries WHERE status = 'succeeded'") == 2
            )
        )
        assert sorted(r.path for r in receiver.received()) == ["/match1", "/match2"]

    def test_rolled_back_event_is_never_sent(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A producer transaction that rolls back emits nothing; the next commit does."""
        sql.webhook(receiver.url())
        sidecars()
        sql("BEGIN")
        sql.emit(data={"n": "rolled back"})
        sql("ROLLBACK")
        sql.emit(data={"n": "committed"})
        receiver.wait_for(1)
        time.sleep(0.5)
        assert [json.loads(r.body)["data"]["n"] for r in receiver.received()] == ["committed"]


class TestRetries:
    def test_retries_with_growing_gaps_then_success(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Failed attempts are retried after growing delays, with the same id, until a 2xx."""
        answers = iter([500, 502, 200])
        receiver.respond = lambda _: Reply(next(answers))
        sql.webhook(receiver.url())
        sidecars(OUTBOX_RETRY_DELAYS="0.3,1.2,5")
        sql.emit()
        got = receiver.wait_for(3)
        d = finished(sql)
        assert d["status"] == "succeeded" and d["attempts"] == 3 and d["last_error"] is None
        assert [r.headers["X-Webhook-Attempt"] for r in got] == ["1", "2", "3"]
        assert len({r.headers["X-Webhook-Id"] for r in got}) == 1
        gap1, gap2 = got[1].at - got[0].at, got[2].at - got[1].at
        assert 0.3 * 0.8 <= gap1 < gap2, (gap1, gap2)
        assert gap2 >= 1.2 * 0.8
        attempts = sql(
            "SELECT attempt, response_status, error FROM outbox.delivery_attempts ORDER BY attempt"
        )
        assert attempts == [(1, 500, "HTTP 500"), (2, 502, "HTTP 502"), (3, 200, None)]

    def test_exhausted_retries_fail_with_the_reason(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """After the last retry the delivery is failed and the status view says why."""
        receiver.respond = lambda _: Reply(503)
        hook = sql.webhook(receiver.url())
        sidecars(OUTBOX_RETRY_DELAYS="0.1,0.1")
        sql.emit()
        d = finished(sql)
        assert d["status"] == "failed" and d["attempts"] == 3
        assert d["last_error"] == "HTTP 503" and d["last_response_status"] == 503
        assert len(receiver.received()) == 3
        status = sql(
            "SELECT last_delivery_status, last_error, pending"
            " FROM outbox.webhook_status WHERE id = %s",
            (hook,),
        )
        assert status == [("failed", "HTTP 503", 0)]

    def test_retry_after_is_a_minimum(self, sql: SQL, receiver: Receiver, sidecars: Start) -> None:
        """A 429 with Retry-After delays the retry to at least that long (capped)."""
        answers = iter([Reply(429, {"Retry-After": "2"}), Reply(200)])
        receiver.respond = lambda _: next(answers)
        sql.webhook(receiver.url())
        sidecars(OUTBOX_RETRY_DELAYS="0.1,5")
        sql.emit()
        first, second = receiver.wait_for(2, timeout=20)
        assert second.at - first.at >= 1.9
        assert finished(sql)["status"] == "succeeded"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestFailureReasons:
    def _fail(self, sql: SQL, sidecars: Start, url: str, **env: str) -> dict[str, Any]:
        sql.webhook(url)
        sidecars(OUTBOX_RETRY_DELAYS="", **env)
        sql.emit()
        d = finished(sql)
        assert d["status"] == "failed" and d["attempts"] == 1
        return d

    def test_timeout(self, sql: SQL, receiver: Receiver, sidecars: Start) -> None:
        """A receiver slower than OUTBOX_HTTP_TIMEOUT fails the attempt as a timeout."""
        receiver.respond = lambda _: Reply(200, delay=3)
        d = self._fail(sql, sidecars, receiver.url(), OUTBOX_HTTP_TIMEOUT="0.5")
        assert d["last_error"] == "timeout after 0.5s"
        assert d["last_response_status"] is None

    def test_connection_refused(self, sql: SQL, sidecars: Start) -> None:
        """Nobody listening on the port reads as connection refused."""
        d = self._fail(sql, sidecars, f"https://127.0.0.1:{closed_port()}/hook")
        assert d["last_error"] == "connection refused"

    def test_redirect_is_not_followed(self, sql: SQL, receiver: Receiver, sidecars: Start) -> None:
        """A 3xx fails the attempt; the Location is not visited."""
        receiver.respond = lambda r: (
            Reply(302, {"Location": receiver.url("/elsewhere")})
            if r.path == "/hook"
            else Reply(200)
        )
        d = self._fail(sql, sidecars, receiver.url())
        assert d["last_error"].startswith("HTTP 302")
        assert d["last_response_status"] == 302
        assert receiver.received("/elsewhere") == []

    def test_untrusted_certificate(self, sql: SQL, receiver: Receiver, sidecars: Start) -> None:
        """A certificate no trusted CA signed fails with a TLS reason."""
        d = self._fail(sql, sidecars, receiver.url(), OUTBOX_CA_FILE="")
        assert d["last_error"].startswith("TLS: certificate verify failed")
        assert receiver.received() == []

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
    def test_private_targets_are_blocked_by_default(
        self, sql: SQL, receiver: Receiver, sidecars: Start, host: str
    ) -> None:
        """Without OUTBOX_ALLOW_PRIVATE_TARGETS, loopback targets are refused unsent."""
        url = receiver.url().replace("127.0.0.1", host)
        d = self._fail(sql, sidecars, url, OUTBOX_ALLOW_PRIVATE_TARGETS="false")
        assert d["last_error"] in (
            "blocked: 127.0.0.1 is not a public address",
            "blocked: ::1 is not a public address",
        )
        assert receiver.received() == []


class TestWebhookChanges:
    def test_disabled_webhook_gets_nothing_and_keeps_nothing(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Pending deliveries of a disabled webhook are cancelled, not sent after re-enabling."""
        hook = sql.webhook(receiver.url())
        sql.emit()  # pending, no dispatcher yet
        sql("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        sql.emit()  # not enqueued at all
        sql("UPDATE outbox.webhooks SET enabled = true WHERE id = %s", (hook,))
        sidecars()
        sql.emit(data={"after": True})
        (got,) = receiver.wait_for(1)
        assert json.loads(got.body)["data"] == {"after": True}
        time.sleep(0.5)
        assert len(receiver.received()) == 1
        assert sql("SELECT status, count(*) FROM outbox.deliveries GROUP BY 1 ORDER BY 1") == [
            ("cancelled", 1),
            ("succeeded", 1),
        ]

    def test_deleted_webhook_stops_at_once(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """After the delete commits, no attempt is made for the webhook's deliveries."""
        receiver.respond = lambda _: Reply(500)
        hook = sql.webhook(receiver.url())
        sidecars(OUTBOX_RETRY_DELAYS="0.5,0.5,0.5")
        sql.emit()
        receiver.wait_for(1)
        sql("DELETE FROM outbox.webhooks WHERE id = %s", (hook,))
        count = len(receiver.received())
        time.sleep(1.5)
        assert len(receiver.received()) == count
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 0

    def test_edited_url_and_secret_apply_to_the_next_attempt(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A retry claimed after an edit goes to the new URL with the new secret."""
        receiver.respond = lambda r: Reply(500 if r.path == "/old" else 200)
        hook = sql.webhook(receiver.url("/old"))
        sidecars(OUTBOX_RETRY_DELAYS="1")
        sql.emit()
        receiver.wait_for(1, "/old")
        new_secret = "a-brand-new-secret-456"
        sql(
            "UPDATE outbox.webhooks SET url = %s, secret = %s WHERE id = %s",
            (receiver.url("/new"), new_secret, hook),
        )
        (got,) = receiver.wait_for(1, "/new")
        expected = hmac.new(new_secret.encode(), got.body, hashlib.sha256).hexdigest()
        assert got.headers["X-Webhook-Signature"] == "sha256=" + expected
        assert got.headers["X-Webhook-Attempt"] == "2"


class TestFairness:
    def test_a_slow_endpoint_does_not_hold_up_the_others(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """With a slow webhook backlogged, a fast webhook's events still go out promptly."""
        receiver.respond = lambda r: Reply(200, delay=3 if r.path == "/slow" else 0)
        sql.webhook(receiver.url("/slow"), event="lead.created")
        sql.webhook(receiver.url("/fast"), event="lead.scored")
        sidecars(OUTBOX_CONCURRENCY="16", OUTBOX_HTTP_TIMEOUT="10")
        for _ in range(40):
            sql.emit(event="lead.created")
        receiver.wait_for(1, "/slow")
        for _ in range(10):
            sql.emit(event="lead.scored")
        receiver.wait_for(10, "/fast", timeout=2.5)
        slow_in_flight = len(receiver.received("/slow"))
        assert slow_in_flight <= 16 // 8, "the slow webhook took more than its share"


def pound_with_test_sends(
    port: int, token: str, hooks: list[int], stop: threading.Event, answers: list[Answer]
) -> None:
    """Ask for test sends to ``hooks`` in turn until ``stop``; a 429 waits as it says."""
    n = 0
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(
                "POST",
                f"/api/v1/webhooks/{hooks[n % len(hooks)]}/test",
                headers={"Authorization": f"Bearer {token}"},
            )
            response = conn.getresponse()
            answer = Answer(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()
        answers.append(answer)
        n += 1
        if answer.status == 429:
            stop.wait(min(float(answer.headers["Retry-After"]), 0.2))


class TestAccountFairness:
    @pytest.mark.slow
    def test_test_sends_to_a_black_hole_do_not_starve_another_accounts_delivery(
        self, sql: SQL, receiver: Receiver, black_hole: BlackHole, sidecars: Start
    ) -> None:
        """One account's test sends to an endpoint that never answers, asked for from 16
        clients at once, leave another account's delivery its slots: it succeeds at the
        first attempt. The test sends answer with a timeout or 429, nothing else."""
        sidecar = sidecars(OUTBOX_CONCURRENCY="4", OUTBOX_RETRY_DELAYS="")
        token = make_token(sql, "acct_a")
        hooks = [sql.webhook(black_hole.url(f"/{n}"), account="acct_a") for n in range(4)]
        sql.webhook(receiver.url(), account="acct_b")
        stop = threading.Event()
        answers: list[Answer] = []
        clients = [
            threading.Thread(
                target=pound_with_test_sends,
                args=(sidecar.api_port, token, hooks, stop, answers),
            )
            for _ in range(16)
        ]
        for client in clients:
            client.start()
        try:
            wait_until(lambda: black_hole.connections() >= 4, what="test sends in flight")
            sql.emit(account="acct_b")
            d = finished(sql)
        finally:
            stop.set()
            for client in clients:
                client.join(30)
        assert (d["status"], d["attempts"], d["last_error"]) == ("succeeded", 1, None)
        assert len(receiver.received()) == 1
        for answer in answers:
            if answer.status == 200:
                assert answer.json["error"] == "timeout after 2s", answer.json
            else:
                assert answer.status == 429, answer
                assert int(answer.headers["Retry-After"]) >= 1
                assert answer.error[0] == "rate_limited"

    @pytest.mark.slow
    def test_one_accounts_backlog_leaves_slots_for_another_account(
        self, sql: SQL, receiver: Receiver, black_hole: BlackHole, sidecars: Start
    ) -> None:
        """An account whose webhooks (each within its own share) never answer takes at
        most its share of the slots: another account's newer event is delivered while
        the first account's older deliveries are still waiting for a slot."""
        hooks = [
            sql.webhook(black_hole.url(f"/{n}"), account="acct_a", event="lead.created")
            for n in range(2)
        ]
        mine = sql.webhook(receiver.url(), account="acct_b")
        for _ in range(4):
            sql.emit(account="acct_a", event="lead.created")
        # Concurrency 4: a share of 2 per webhook, and of 2 per account.
        sidecars(OUTBOX_CONCURRENCY="4", OUTBOX_RETRY_DELAYS="")
        wait_until(lambda: black_hole.connections() >= 2, what="the first account's attempts")
        sql.emit(account="acct_b")
        theirs = wait_until(
            lambda: sql(
                "SELECT status, attempts, finished_at FROM outbox.deliveries"
                " WHERE webhook_id = %s AND status <> 'pending'",
                (mine,),
            ),
            what="the second account's delivery",
        )
        assert [row[:2] for row in theirs] == [("succeeded", 1)]
        # Attempts are recorded when they end, so this waits for a later round of the
        # first account's: it starts after the other account's delivery was done.
        wait_until(
            lambda: sql.one(
                "SELECT count(*) FROM outbox.delivery_attempts a"
                " JOIN outbox.deliveries d ON d.id = a.delivery_id"
                " WHERE d.webhook_id = ANY (%s) AND a.started_at > %s",
                (hooks, theirs[0][2]),
            ),
            what="an attempt of the first account after the second account's delivery",
        )


class TestWakeUp:
    def test_idle_dispatcher_wakes_on_commit_not_on_poll(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """With polling all but off, committed events still arrive: NOTIFY woke the dispatcher."""
        sql.webhook(receiver.url())
        sidecars(OUTBOX_POLL_INTERVAL="600")
        time.sleep(0.3)  # let it go idle and arm the doorbell
        for n in range(1, 6):
            sql.emit(data={"n": n})
            receiver.wait_for(n, timeout=10)
            time.sleep(0.1)


class TestProducerRole:
    def test_producer_role_can_emit_and_it_is_delivered(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A producer with only outbox_producer's rights emits, and the event is delivered."""
        sql.webhook(receiver.url())
        sidecars()
        sql("SET ROLE outbox_producer")
        sql("INSERT INTO outbox.events (account_id, event) VALUES ('acct_1', 'lead.scored')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sql("SELECT * FROM outbox.deliveries")
        sql("RESET ROLE")
        assert receiver.wait_for(1)


class TestSidecarRole:
    def test_delivers_logged_in_with_outbox_sidecar_rights_only(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """`outbox run` delivers and records as a role that owns nothing in the database."""
        sql.webhook(receiver.url(), secret=SECRET)
        sidecars()
        sql.emit()
        receiver.wait_for(1)
        assert finished(sql)["status"] == "succeeded"
        users = {
            row[0]
            for row in sql(
                "SELECT usename FROM pg_stat_activity"
                " WHERE application_name = 'outbox' AND datname = current_database()"
            )
        }
        assert users == {SIDECAR_LOGIN}
        assert (
            sql.one(
                "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = %s",
                (SIDECAR_LOGIN,),
            )
            is False
        )


class TestSecretRotation:
    def test_old_and_new_secret_sign_during_the_overlap(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """For 24 hours webhook-signature carries "v1,<new> v1,<old>"; then the new alone."""
        old, new = SECRET, "whsec_" + base64.b64encode(bytes(range(32))).decode()
        hook = sql.webhook(receiver.url(), secret=old)
        sql("UPDATE outbox.webhooks SET secret = %s WHERE id = %s", (new, hook))
        sidecars()
        sql.emit()
        (got,) = receiver.wait_for(1)
        signatures = got.headers["webhook-signature"].split(" ")
        assert len(signatures) == 2
        headers = {k: got.headers[k] for k in ("webhook-id", "webhook-timestamp")}
        # A receiver with either secret verifies: the new one with `Webhook(secret)`.
        standardwebhooks.Webhook(new).verify(
            got.body, headers | {"webhook-signature": signatures[0]}
        )
        standardwebhooks.Webhook(old.encode()).verify(
            got.body, headers | {"webhook-signature": signatures[1]}
        )
        expected = "sha256=" + hmac.new(new.encode(), got.body, hashlib.sha256).hexdigest()
        assert got.headers["X-Webhook-Signature"] == expected

        sql("UPDATE outbox.webhooks SET previous_secret_expires_at = now() WHERE id = %s", (hook,))
        sql.emit()
        second = receiver.wait_for(2)[1]
        assert " " not in second.headers["webhook-signature"]
        standardwebhooks.Webhook(new).verify(
            second.body,
            {k: second.headers[k] for k in headers}
            | {"webhook-signature": second.headers["webhook-signature"]},
        )
