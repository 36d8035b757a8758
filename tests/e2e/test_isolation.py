"""No tenant stalls another: the sidecar's one event loop stays free (contract 7, 21).

Against real `outbox run` / `outbox serve` processes, a real database and a real HTTPS
receiver. The attack of the audit of 2026-12-05: one account's Slack webhook with a
hundred events at the size limit, its delivery log fetched several times at once,
while another account's receiver takes a second to answer.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from outbox import formats
from tests.conftest import SQL, Sidecar, wait_until
from tests.e2e.test_api import make_token
from tests.receiver import Receiver, Reply

HUGE_EVENTS = 100
# The longest /healthz may take to answer during the attack: a liveness probe's budget.
PROBE_BUDGET = 1.0


def get(port: int, path: str, token: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def huge_data() -> str:
    """An event's data at the size limit, its bulk in the lead's name: the costliest
    shape to render as a chat message before rendering read only what it shows."""
    name = "x" * (formats.TEXT_READ * 30)
    return json.dumps({"lead": {"id": 1, "name": name}, "score": {"overall": 87}})


def metric(port: int, name: str) -> float:
    status, body = get(port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class TestOneTenantCannotStallAnother:
    def test_the_delivery_log_of_huge_events_leaves_the_loop_free(
        self, sidecars: Callable[..., Sidecar], sql: SQL, receiver: Receiver
    ) -> None:
        """A's log of 100 events at the size limit, each sent four times in Slack's
        format, fetched four times at once: /healthz answers within a second
        throughout, and B's deliveries, whose receiver takes a second, never time out."""
        receiver.respond = lambda r: Reply(delay=1.0) if r.path == "/b" else Reply(status=500)
        hook_a = sql.webhook(receiver.url("/a"), account="acct_a")
        sql("UPDATE outbox.webhooks SET format = 'slack' WHERE id = %s", (hook_a,))
        hook_b = sql.webhook(receiver.url("/b"), account="acct_b")
        data = huge_data()
        for _ in range(HUGE_EVENTS):
            sql("SELECT outbox.emit('acct_a', 'lead.scored', %s::jsonb)", (data,))
        sidecar = sidecars(OUTBOX_RETRY_DELAYS="0.05,0.05,0.05", OUTBOX_HTTP_TIMEOUT="3")
        token = make_token(sql, "acct_a")
        wait_until(
            lambda: (
                sql.one(
                    "SELECT count(*) FROM outbox.deliveries"
                    " WHERE webhook_id = %s AND status = 'failed'",
                    (hook_a,),
                )
                == HUGE_EVENTS
            ),
            timeout=120,
            what="A's deliveries to fail after four attempts each",
        )
        metric(sidecar.api_port, "outbox_event_loop_lag_seconds")  # starts a new interval

        probes: list[float] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                start = time.monotonic()
                status, _ = get(sidecar.api_port, "/healthz", timeout=30)
                probes.append(time.monotonic() - start)
                assert status == 200
                time.sleep(0.05)

        logs: list[dict[str, Any]] = []

        refused: list[int] = []

        def fetch_log() -> None:
            # Two logs of an account are read at once at most: the others are told to
            # come back in a second, and do.
            done_here = 0
            while done_here < 2:
                path = f"/api/v1/webhooks/{hook_a}/deliveries?limit=100"
                status, body = get(sidecar.api_port, path, token)
                if status == 429:
                    refused.append(status)
                    time.sleep(1)
                    continue
                assert status == 200, body
                logs.append(json.loads(body))
                done_here += 1

        prober = threading.Thread(target=probe)
        prober.start()
        for _ in range(5):
            sql.emit("acct_b")
        fetchers = [threading.Thread(target=fetch_log) for _ in range(4)]
        for thread in fetchers:
            thread.start()
        for thread in fetchers:
            thread.join(120)
        wait_until(
            lambda: (
                sql.one(
                    "SELECT count(*) FROM outbox.deliveries WHERE webhook_id = %s"
                    " AND status <> 'pending'",
                    (hook_b,),
                )
                == 5
            ),
            timeout=60,
            what="B's deliveries to finish",
        )
        done.set()
        prober.join(60)
        lag = metric(sidecar.api_port, "outbox_event_loop_lag_seconds")

        assert len(logs) == 8
        for page in logs:
            assert len(page["deliveries"]) == HUGE_EVENTS
            for delivery in page["deliveries"]:
                assert len(delivery["attempt_log"]) == 4
                assert delivery["request_body_truncated"] is False  # a Slack message is small
        assert probes and max(probes) < PROBE_BUDGET, (max(probes), lag)
        errors = sql(
            "SELECT a.error FROM outbox.delivery_attempts a"
            " JOIN outbox.deliveries d ON d.id = a.delivery_id WHERE d.webhook_id = %s",
            (hook_b,),
        )
        assert errors == [(None,)] * 5, errors
        assert 0 <= lag < PROBE_BUDGET

    def test_a_json_log_shows_the_start_of_each_body_and_the_whole_on_request(
        self, sidecars: Callable[..., Sidecar], sql: SQL, receiver: Receiver
    ) -> None:
        """A body over 8 KiB shows its start in the log, says so, and is one request
        away, exactly as the receiver got it; another account cannot fetch it."""
        hook = sql.webhook(receiver.url(), account="acct_a")
        event = sql("SELECT outbox.emit('acct_a', 'lead.scored', %s::jsonb)", (huge_data(),))
        assert event
        sidecar = sidecars()
        got = receiver.wait_for(1)[0].body
        token, other = make_token(sql, "acct_a"), make_token(sql, "acct_b")
        wait_until(
            lambda: (
                sql.one("SELECT status FROM outbox.deliveries WHERE webhook_id = %s", (hook,))
                == "succeeded"
            ),
            what="the delivery to succeed",
        )
        status, body = get(sidecar.api_port, f"/api/v1/webhooks/{hook}/deliveries", token)
        assert status == 200
        (delivery,) = json.loads(body)["deliveries"]
        assert delivery["request_body_truncated"] is True
        assert delivery["request_body_size"] == len(got)
        shown = delivery["request_body"].encode()
        assert 0 < len(shown) <= 8192 and got.startswith(shown)

        path = f"/api/v1/deliveries/{delivery['id']}/request-body"
        assert get(sidecar.api_port, path, token) == (200, got)
        assert get(sidecar.api_port, path, other)[0] == 404


class TestServeAndDeliverOnly:
    def test_serve_answers_tenants_and_delivers_nothing_deliver_only_the_reverse(
        self, sidecars: Callable[..., Sidecar], sql: SQL, receiver: Receiver
    ) -> None:
        """`outbox serve` is the API without deliveries; `outbox run --deliver-only`
        delivers, and its listener answers only the probes and /metrics."""
        hook = sql.webhook(receiver.url(), account="acct_a")
        token = make_token(sql, "acct_a")
        serve = sidecars("serve")
        status, body = get(serve.api_port, "/api/v1/webhooks", token)
        assert status == 200 and [w["id"] for w in json.loads(body)["webhooks"]] == [hook]
        assert get(serve.api_port, "/readyz")[0] == 200
        assert "outbox_event_loop_lag_seconds" in get(serve.api_port, "/metrics")[1].decode()
        sql.emit("acct_a")
        # Given the time a sidecar takes to deliver an event, serve has not delivered it.
        time.sleep(1.0)
        assert receiver.received() == []
        assert "dispatcher started" not in serve.log()

        deliver = sidecars("run", "--deliver-only")
        receiver.wait_for(1)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert get(deliver.api_port, path)[0] == 200, path
        for path in ("/api/v1/webhooks", "/api/v1/openapi.json", "/settings/webhooks"):
            assert get(deliver.api_port, path, token)[0] == 404, path
        assert serve.stop() == 0
        assert deliver.stop() == 0
