"""Operational events over HTTP (contract 17) with real `outbox run` processes: what the
operator's endpoint gets, exactly once per change of state across two sidecars, signed
as deliveries are; and an endpoint that is down delays no delivery and loses nothing."""

from __future__ import annotations

import http.server
import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import standardwebhooks

from outbox.signing import signature
from tests.conftest import SQL, Sidecar, run_outbox, wait_until
from tests.receiver import Received, Receiver, Reply

NOTIFY_SECRET = "whsec_operator_secret_01"


def notify_settings(receiver: Receiver) -> dict[str, str]:
    return {
        "OUTBOX_NOTIFY_URL": receiver.url("/notify"),
        "OUTBOX_NOTIFY_SECRET": NOTIFY_SECRET,
    }


def by_id(requests: list[Received]) -> dict[str, dict[str, Any]]:
    """The notifications received, by X-Webhook-Id (a retry may repeat one)."""
    return {r.headers["X-Webhook-Id"]: json.loads(r.body) for r in requests}


def failing_then(status: Callable[[], int]) -> Callable[[Received], Reply]:
    return lambda got: Reply(status=status() if got.path == "/hook" else 200)


class TestEachKindOnce:
    def test_two_sidecars_tell_one_streak_once(
        self, sql: SQL, receiver: Receiver, sidecars: Callable[..., Sidecar]
    ) -> None:
        """Ten deliveries fail for good across two sidecars: one webhook.failing, ten
        delivery.failed; the next success one webhook.recovered. Each POST verifies with
        standardwebhooks and X-Webhook-Signature and carries the webhook's details."""
        hook_status = [503]
        receiver.respond = failing_then(lambda: hook_status[0])
        hook = sql.webhook(receiver.url("/hook"), name="CRM")
        sidecars(**notify_settings(receiver))
        sidecars(**notify_settings(receiver))
        emitted = [sql.emit() for _ in range(10)]
        wait_until(
            lambda: (
                sql.one("SELECT count(*) FROM outbox.deliveries WHERE status = 'failed'")
                == len(emitted)
            ),
            timeout=60,
            what="every delivery failed for good",
        )
        hook_status[0] = 200
        sql.emit()
        wait_until(
            lambda: (
                sql.one("SELECT count(*) FROM outbox.notifications WHERE sent_at IS NULL") == 0
                and sql.one("SELECT count(*) FROM outbox.notifications") == 12
            ),
            timeout=30,
            what="twelve notifications sent",
        )
        kinds = Counter(kind for (kind,) in sql("SELECT kind FROM outbox.notifications"))
        assert kinds == {"webhook.failing": 1, "delivery.failed": 10, "webhook.recovered": 1}
        got = receiver.received("/notify")
        received = by_id(got)
        assert Counter(body["event"] for body in received.values()) == kinds
        for request in got:
            headers = request.headers
            assert headers["X-Webhook-Event"] == json.loads(request.body)["event"]
            assert headers["X-Webhook-Signature"] == signature(NOTIFY_SECRET, request.body)
            standardwebhooks.Webhook(NOTIFY_SECRET.encode()).verify(request.body, headers)
        bodies = list(received.values())
        assert all(set(body) == {"event", "timestamp", "data"} for body in bodies)
        details = {"account_id": "acct_1", "webhook_id": hook, "webhook_name": "CRM",
                   "url": receiver.url("/hook"), "webhook_event": "lead.scored"}  # fmt: skip
        for body in bodies:
            assert body["data"].items() >= details.items()
        failed = [b["data"] for b in bodies if b["event"] == "delivery.failed"]
        assert {d["reason"] for d in failed} == {"HTTP 503"}
        assert len({d["delivery_id"] for d in failed}) == 10
        (recovered,) = [b["data"] for b in bodies if b["event"] == "webhook.recovered"]
        assert recovered["reason"] is None

    def test_an_automatic_disable_is_told(
        self, sql: SQL, receiver: Receiver, sidecars: Callable[..., Sidecar]
    ) -> None:
        """A webhook disabled by the product itself gives webhook.disabled with its
        disabled_reason; test sends give nothing."""
        receiver.respond = lambda got: Reply(status=503 if got.path == "/hook" else 200)
        hook = sql.webhook(receiver.url("/hook"))
        sql("UPDATE outbox.webhooks SET created_at = now() - interval '1 hour'")
        sidecar = sidecars(OUTBOX_AUTO_DISABLE_AFTER="1m", **notify_settings(receiver))
        sidecars(OUTBOX_AUTO_DISABLE_AFTER="1m", **notify_settings(receiver))
        sql.emit()
        wait_until(
            lambda: [
                b
                for b in by_id(receiver.received("/notify")).values()
                if b["event"] == "webhook.disabled"
            ],
            timeout=60,
            what="webhook.disabled",
        )
        reason = sql.one("SELECT disabled_reason FROM outbox.webhooks WHERE id = %s", (hook,))
        (disabled,) = [b for b in by_id(receiver.received("/notify")).values()
                       if b["event"] == "webhook.disabled"]  # fmt: skip
        assert disabled["data"]["disabled_reason"] == reason
        assert disabled["data"]["reason"] == "HTTP 503"
        kinds = Counter(kind for (kind,) in sql("SELECT kind FROM outbox.notifications"))
        assert kinds == {"webhook.failing": 1, "delivery.failed": 1, "webhook.disabled": 1}
        before = sql.one("SELECT count(*) FROM outbox.notifications")
        other = sql.webhook(receiver.url("/hook"), name="test me")
        tested = run_outbox(sidecar.env, "webhooks", "test", str(other))
        assert tested.returncode == 1, tested.stderr  # the endpoint answered 503
        assert sql.one("SELECT count(*) FROM outbox.notifications") == before


class TestEndpointDown:
    def test_deliveries_go_on_and_every_notification_comes_later(
        self, sql: SQL, receiver: Receiver, sidecars: Callable[..., Sidecar]
    ) -> None:
        """While the notification endpoint answers 503, a healthy webhook gets all its
        deliveries and a failing one its retries; once it is back, every notification
        the database wrote reaches it."""
        notify_up = [False]

        def respond(got: Received) -> Reply:
            if got.path == "/notify":
                return Reply(status=200 if notify_up[0] else 503)
            return Reply(status=503 if got.path == "/bad" else 200)

        receiver.respond = respond
        sql.webhook(receiver.url("/good"), name="good")
        sql.webhook(receiver.url("/bad"), name="bad")
        sidecars(**notify_settings(receiver))
        sidecars(**notify_settings(receiver))
        for _ in range(5):
            sql.emit()
        receiver.wait_for(5, "/good", timeout=30)
        wait_until(
            lambda: sql.one("SELECT count(*) FROM outbox.deliveries WHERE status = 'failed'") == 5,
            timeout=60,
            what="the bad webhook's deliveries failed for good",
        )
        wait_until(
            lambda: sql.one("SELECT min(attempts) FROM outbox.notifications") >= 2,
            timeout=30,
            what="every notification tried twice",
        )
        assert sql.one("SELECT count(*) FROM outbox.notifications WHERE sent_at IS NOT NULL") == 0
        assert len(receiver.received("/good")) == 5
        notify_up[0] = True
        wait_until(
            lambda: sql.one("SELECT count(*) FROM outbox.notifications WHERE sent_at IS NULL") == 0,
            timeout=60,
            what="every notification sent",
        )
        ids = {str(i) for (i,) in sql("SELECT id FROM outbox.notifications")}
        answered = {r.headers["X-Webhook-Id"] for r in receiver.received("/notify")}
        assert ids <= answered and len(ids) == 6  # one failing, five delivery.failed


class PlainHttp:
    """A plain-http endpoint on loopback that records what is POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[tuple[dict[str, str], bytes]] = []
        seen = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/outbox-events"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TestOperatorsEndpoint:
    def test_plain_http_on_a_private_address_with_the_guard_on(
        self, sql: SQL, receiver: Receiver, sidecars: Callable[..., Sidecar]
    ) -> None:
        """With private targets refused for deliveries, the operator's own endpoint on
        loopback over plain http still gets the events, with the full reason."""
        endpoint = PlainHttp()
        try:
            sql.webhook(receiver.url("/hook"))
            sidecars(
                OUTBOX_ALLOW_PRIVATE_TARGETS="false",
                OUTBOX_RETRY_DELAYS="",
                OUTBOX_NOTIFY_URL=endpoint.url,
                OUTBOX_NOTIFY_SECRET=NOTIFY_SECRET,
            )
            sql.emit()
            wait_until(lambda: len(endpoint.bodies) >= 2, timeout=30, what="two events")
        finally:
            endpoint.stop()
        assert receiver.received() == []  # the delivery itself was blocked
        events = {}
        for headers, body in endpoint.bodies:
            standardwebhooks.Webhook(NOTIFY_SECRET.encode()).verify(body, headers)
            note = json.loads(body)
            events[note["event"]] = note["data"]
        assert set(events) == {"webhook.failing", "delivery.failed"}
        reason = "blocked: 127.0.0.1 is not a public address"
        assert events["delivery.failed"]["reason"] == reason
