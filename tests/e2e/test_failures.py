"""Failures a customer can act on, end to end: real `outbox run` processes, a real
HTTPS receiver. A failing endpoint shows as retrying while its retries run, with the
receiver's own answer and the request that was sent; one that keeps failing is
disabled, saying why, until it is enabled again."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg.rows import dict_row

from outbox import __version__
from tests.conftest import SQL, Sidecar, wait_until
from tests.e2e.test_api import Api, new_api, outbox
from tests.receiver import Receiver, Reply

SECRET = "whsec_failures_secret_0123"
Start = Callable[..., Sidecar]
MAINTENANCE = b'{"error": "down for maintenance until 11:00 UTC"}'


def view(sql: SQL, webhook: int) -> dict[str, Any]:
    with sql.conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM outbox.webhook_status WHERE id = %s", (webhook,))
        row = cur.fetchone()
    assert row is not None
    return row


def attempt_rows(sql: SQL) -> list[dict[str, Any]]:
    with sql.conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT a.delivery_id, a.attempt, a.response_status, a.error, a.response_body"
            " FROM outbox.delivery_attempts a ORDER BY a.delivery_id, a.attempt"
        )
        return cur.fetchall()


def hook_as(api: Api, sql: SQL, url: str, **fields: Any) -> int:
    return sql.webhook(url, account=api.main, secret=SECRET, **fields)


def emit(sql: SQL, account: str, data: dict[str, Any] | None = None) -> int:
    return sql.emit(account, "lead.scored", data or {"lead": {"id": 42}})


class TestRetrying:
    def test_a_503_with_a_body_shows_as_retrying_everywhere(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """After a success, a 503 with an explanation: the view, `outbox status` and the
        API show the delivery retrying, why, and when the next attempt is; the last
        finished delivery is still the success."""
        sidecar = sidecars(OUTBOX_RETRY_DELAYS="600,600,600")
        api = new_api(sidecar, sql)
        hook = hook_as(api, sql, receiver.url(), name="CRM Sync")
        emit(sql, api.main)
        wait_until(lambda: view(sql, hook)["last_delivery_status"] == "succeeded")
        receiver.respond = lambda _: Reply(503, body=MAINTENANCE)
        emit(sql, api.main)
        row = wait_until(
            lambda: (r := view(sql, hook))["last_attempt_status"] == "failed" and r,
            what="the failed attempt",
        )
        now = datetime.now(UTC)
        assert row["last_delivery_status"] == "succeeded"
        assert row["retrying"] == 1 and row["pending"] == 1
        assert row["last_attempt_error"] == "HTTP 503"
        assert timedelta(minutes=7) < row["next_retry_at"] - now < timedelta(minutes=13)
        assert row["enabled"] is True and row["disabled_reason"] is None

        shown = outbox("status", "--account", api.main, env=sidecar.env).stdout
        header, line = shown.splitlines()
        for column in ("retrying", "next_retry_at", "last_attempt_status", "last_attempt_error"):
            assert column in header
        assert "CRM Sync" in line and "HTTP 503" in line and "failed" in line
        assert row["next_retry_at"].isoformat(timespec="seconds") in line

        got = api("GET", f"/api/v1/webhooks/{hook}").json
        assert got["last_delivery_status"] == "succeeded"
        assert got["retrying"] == 1
        assert got["last_attempt_status"] == "failed"
        assert got["last_attempt_error"] == "HTTP 503"
        assert got["next_retry_attempt"] == 2
        assert got["next_retry_at"].endswith("Z")
        assert got["disabled_reason"] is None
        assert api("GET", "/api/v1/webhooks").json["webhooks"] == [got]

    def test_a_test_send_does_not_change_the_status(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A failing test send leaves the webhook's newest attempt as it was."""
        sidecar = sidecars()
        api = new_api(sidecar, sql)
        hook = hook_as(api, sql, receiver.url())
        receiver.respond = lambda _: Reply(503)
        answer = api("POST", f"/api/v1/webhooks/{hook}/test", {})
        assert answer.json["status"] == 503
        assert sql("SELECT * FROM outbox.webhook_health") == []
        assert view(sql, hook)["last_attempt_status"] is None


class TestResponseBodies:
    def test_large_and_slow_bodies_are_cut_without_waiting(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A 1 MB answer and one that sends 1500 bytes and then stalls are both kept as
        their first 1024 bytes, recorded while the slow one still has not finished: the
        sender neither reads nor waits for the rest."""
        release = threading.Event()

        def answer(got: Any) -> Reply:
            if b'"slow"' in got.body:
                return Reply(503, body=b"s" * 1500, rest=b"t" * 1000, release=release)
            return Reply(503, body=b"L" * 2**20)

        receiver.respond = answer
        sidecars(OUTBOX_RETRY_DELAYS="none", OUTBOX_HTTP_TIMEOUT="120")
        api_account = "acct_bodies"
        sql.webhook(receiver.url(), account=api_account)
        emit(sql, api_account, {"kind": "large"})
        emit(sql, api_account, {"kind": "slow"})
        try:
            rows = wait_until(lambda: len(r := attempt_rows(sql)) == 2 and r, what="both attempts")
            assert not release.is_set()
            assert [(r["response_status"], r["error"]) for r in rows] == [(503, "HTTP 503")] * 2
            assert rows[0]["response_body"] == "L" * 1024
            assert rows[1]["response_body"] == "s" * 1024
            wait_until(lambda: receiver.left_early == ["/hook"], what="the sender to hang up")
        finally:
            release.set()

    def test_a_body_that_does_not_finish_in_time_says_so_beside_its_status(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A receiver that sends its status and then dribbles the body: the attempt is
        'timeout after 1s reading the body', with the status it did send."""
        release = threading.Event()
        receiver.respond = lambda _: Reply(200, body=b"st", rest=b"uck", release=release)
        sidecars(OUTBOX_RETRY_DELAYS="none", OUTBOX_HTTP_TIMEOUT="1")
        sql.webhook(receiver.url(), account="acct_dribble")
        emit(sql, "acct_dribble")
        try:
            rows = wait_until(lambda: attempt_rows(sql), what="the attempt")
            assert [(r["response_status"], r["error"]) for r in rows] == [
                (200, "timeout after 1s reading the body")
            ]
        finally:
            release.set()

    def test_invalid_utf8_is_replaced(self, sql: SQL, receiver: Receiver, sidecars: Start) -> None:
        """Bytes that are not UTF-8, a NUL, and a character cut in two at byte 1024 are
        stored as U+FFFD; a connection error has no body at all."""
        bodies = iter([b"bad \xff\xfe and \x00 end", b"a" * 1023 + "é".encode()])
        receiver.respond = lambda _: Reply(500, body=next(bodies))
        sidecars(OUTBOX_RETRY_DELAYS="none")
        sql.webhook(receiver.url(), account="acct_utf8")
        sql.webhook("https://127.0.0.1:1/closed", account="acct_utf8", name="closed")
        emit(sql, "acct_utf8")
        emit(sql, "acct_utf8")
        rows = wait_until(lambda: len(r := attempt_rows(sql)) == 4 and r, what="attempts")
        bodies_seen = sorted(r["response_body"] for r in rows if r["response_body"] is not None)
        assert bodies_seen == ["a" * 1023 + "\ufffd", "bad \ufffd\ufffd and \ufffd end"]
        refused = [r for r in rows if r["response_status"] is None]
        assert len(refused) == 2
        assert all(r["response_body"] is None for r in refused)
        assert all(r["error"] == "connection refused" for r in refused)


class TestDeliveryLog:
    def test_each_attempt_shows_the_request_sent_and_the_answer(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """The API's delivery log gives each attempt its answer (status, body, duration)
        and the request exactly as the receiver got it, headers and body, with signatures
        but never the secret."""
        answers = [Reply(503, body=MAINTENANCE), Reply(200, body=b"thanks")]
        receiver.respond = lambda _: answers.pop(0) if len(answers) > 1 else answers[0]
        sidecar = sidecars(OUTBOX_RETRY_DELAYS="0.1")
        api = new_api(sidecar, sql)
        hook = hook_as(api, sql, receiver.url())
        emit(sql, api.main, {"lead": {"id": 7, "name": "Ada"}})
        got = receiver.wait_for(2)
        wait_until(lambda: view(sql, hook)["last_delivery_status"] == "succeeded")

        page = api("GET", f"/api/v1/webhooks/{hook}/deliveries").json
        (delivery,) = page["deliveries"]
        assert delivery["request_body"].encode() == got[0].body == got[1].body
        first, second = delivery["attempt_log"]
        assert (first["response_status"], first["response_body"]) == (503, MAINTENANCE.decode())
        assert (second["response_status"], second["response_body"]) == (200, "thanks")
        assert isinstance(first["duration_ms"], int)
        for attempt, received in zip((first, second), got, strict=True):
            request = attempt["request"]
            assert request["method"] == "POST" and request["url"] == receiver.url()
            sent = {k: v for k, v in received.headers.items() if k not in _TRANSPORT}
            assert request["headers"] == sent
        assert first["request"]["headers"]["X-Webhook-Attempt"] == "1"
        assert second["request"]["headers"]["X-Webhook-Attempt"] == "2"
        signature = hmac.new(SECRET.encode(), got[0].body, hashlib.sha256).hexdigest()
        assert first["request"]["headers"]["X-Webhook-Signature"] == f"sha256={signature}"
        assert first["request"]["headers"]["User-Agent"] == f"outbox/{__version__}"
        assert SECRET not in json.dumps(page)

        # Once the webhook changes, its old signatures cannot be rebuilt: not shown.
        api("PATCH", f"/api/v1/webhooks/{hook}", {"secret": "whsec_another_secret_0123"})
        later = api("GET", f"/api/v1/webhooks/{hook}/deliveries").json["deliveries"][0]
        headers = later["attempt_log"][0]["request"]["headers"]
        assert headers["X-Webhook-Signature"].startswith("(not shown")
        assert headers["webhook-signature"].startswith("(not shown")
        assert headers["webhook-timestamp"] == first["request"]["headers"]["webhook-timestamp"]

        # While the old secret still signs beside the new one, both signatures show.
        emit(sql, api.main, {"lead": {"id": 8}})
        rotated = receiver.wait_for(3)[2]
        wait_until(lambda: view(sql, hook)["pending"] == 0)
        newest = api("GET", f"/api/v1/webhooks/{hook}/deliveries").json["deliveries"][0]
        shown = newest["attempt_log"][0]["request"]["headers"]
        assert shown["webhook-signature"] == rotated.headers["webhook-signature"]
        assert len(shown["webhook-signature"].split()) == 2

    def test_the_request_body_is_in_the_webhooks_format(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A Slack webhook's log shows the Slack message it sent, not the JSON body."""
        sidecar = sidecars()
        api = new_api(sidecar, sql)
        hook = hook_as(api, sql, receiver.url())
        sql("UPDATE outbox.webhooks SET format = 'slack' WHERE id = %s", (hook,))
        emit(sql, api.main)
        (got,) = receiver.wait_for(1)
        wait_until(lambda: view(sql, hook)["last_delivery_status"] == "succeeded")
        (delivery,) = api("GET", f"/api/v1/webhooks/{hook}/deliveries").json["deliveries"]
        assert delivery["request_body"].encode() == got.body
        assert "blocks" in json.loads(got.body) or "text" in json.loads(got.body)


# Headers the HTTP client adds itself, not part of what the sidecar chose to send.
_TRANSPORT = {"Host", "Content-Length", "Accept"}


class TestAutoDisable:
    @pytest.mark.slow
    def test_an_endpoint_that_keeps_failing_is_disabled_until_enabled(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A webhook whose last success is older than OUTBOX_AUTO_DISABLE_AFTER is disabled
        when a delivery fails for good: its pending deliveries are cancelled, the reason
        (with the last success) shows in the view, the API, `webhooks list` and the
        metrics; enabling clears it, and recover sends the failed delivery again."""
        sidecar = sidecars(OUTBOX_RETRY_DELAYS="0.05,0.05", OUTBOX_AUTO_DISABLE_AFTER="1s")
        api = new_api(sidecar, sql)
        hook = hook_as(api, sql, receiver.url(), name="CRM Sync")
        emit(sql, api.main)
        wait_until(lambda: view(sql, hook)["last_delivery_status"] == "succeeded")
        success_at = sql.one(
            "SELECT last_success_at FROM outbox.webhook_health WHERE webhook_id = %s", (hook,)
        )
        wait_until(
            lambda: sql.one("SELECT now() - %s::timestamptz > interval '1.5 s'", (success_at,)),
            what="the success to be older than the setting",
        )
        receiver.respond = lambda _: Reply(503, body=MAINTENANCE)
        # One delivery that is not due yet: still pending when the webhook is disabled.
        with sql.conn.transaction():
            later = emit(sql, api.main)
            sql(
                "UPDATE outbox.deliveries SET next_attempt_at = now() + interval '1 hour'"
                " WHERE event_id = %s",
                (later,),
            )
        failing = emit(sql, api.main)
        row = wait_until(
            lambda: (r := view(sql, hook))["disabled_reason"] and r, what="the disable"
        )
        stamp = success_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        reason = row["disabled_reason"]
        assert reason.startswith("disabled automatically at ")
        assert reason.endswith(
            f"deliveries kept failing and none succeeded for 1 second (last success: {stamp})"
        )
        assert row["enabled"] is False
        statuses = dict(
            sql(
                "SELECT e.id, d.status FROM outbox.deliveries d"
                " JOIN outbox.events e ON e.id = d.event_id WHERE e.id IN (%s, %s)",
                (later, failing),
            )
        )
        assert statuses == {later: "cancelled", failing: "failed"}

        got = api("GET", f"/api/v1/webhooks/{hook}").json
        assert got["enabled"] is False and got["disabled_reason"] == reason
        listed = outbox("webhooks", "list", "--account", api.main, "--json", env=sidecar.env)
        assert json.loads(listed.stdout)[0]["disabled_reason"] == reason
        assert reason in outbox("webhooks", "list", "--account", api.main, env=sidecar.env).stdout
        metrics = api("GET", "/metrics", anonymous=True).body.decode()
        assert "outbox_webhooks_auto_disabled_total 1.0" in metrics
        assert any(
            line.get("event") == "webhook disabled: it kept failing"
            and line.get("webhook_id") == hook
            for line in sidecar.log_lines()
        )

        receiver.respond = lambda _: Reply(200)
        enabled = api("PATCH", f"/api/v1/webhooks/{hook}", {"enabled": True}).json
        assert enabled["enabled"] is True and enabled["disabled_reason"] is None
        since = (success_at + timedelta(seconds=1)).isoformat()
        recovered = outbox("webhooks", "recover", str(hook), "--since", since, env=sidecar.env)
        assert recovered.returncode == 0, recovered.stderr
        # The failed delivery, and the one the automatic disable cancelled (contract 9).
        assert "re-queued 2 failed" in recovered.stdout
        wait_until(
            lambda: (
                sql.one(
                    "SELECT array_agg(DISTINCT d.status) FROM outbox.deliveries d"
                    " WHERE d.event_id IN (%s, %s)",
                    (failing, later),
                )
                == ["succeeded"]
            ),
            what="the recovered deliveries",
        )

    def test_off_never_disables(self, sql: SQL, receiver: Receiver, sidecars: Start) -> None:
        """With OUTBOX_AUTO_DISABLE_AFTER=off a webhook that never succeeded stays enabled."""
        receiver.respond = lambda _: Reply(503)
        sidecars(OUTBOX_RETRY_DELAYS="none", OUTBOX_AUTO_DISABLE_AFTER="off")
        hook = sql.webhook(receiver.url())
        sql("UPDATE outbox.webhooks SET created_at = now() - interval '30 days'")
        emit(sql, "acct_1")
        wait_until(lambda: view(sql, hook)["last_delivery_status"] == "failed")
        assert view(sql, hook)["enabled"] is True
