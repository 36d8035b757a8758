"""Operating outbox: the gauges the alerts read.

Real `outbox run` processes against real Postgres.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable

from tests.conftest import (
    SQL,
    Sidecar,
    wait_until,
)
from tests.receiver import BlackHole

Start = Callable[..., Sidecar]


def get(port: int, path: str) -> tuple[int, bytes] | None:
    """The answer to GET ``path``, or None when nothing answers on the port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


def samples(port: int) -> dict[str, float]:
    answer = get(port, "/metrics")
    assert answer is not None and answer[0] == 200
    values = {}
    for line in answer[1].decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class TestBacklogGauges:
    def test_due_deliveries_and_how_long_the_oldest_has_waited(
        self, sql: SQL, black_hole: BlackHole, sidecars: Start
    ) -> None:
        """Deliveries due but waiting for a dispatcher (here: its one slot is taken by
        an attempt that hangs) show in outbox_due_deliveries, and the one due longest in
        outbox_oldest_due_age_seconds; the one in flight is pending but not due."""
        sql.webhook(black_hole.url())
        sidecar = sidecars(OUTBOX_CONCURRENCY="1", OUTBOX_HTTP_TIMEOUT="120")
        for _ in range(3):
            sql.emit()
        wait_until(lambda: black_hole.connections() == 1, what="the attempt in flight")
        assert wait_until(lambda: samples(sidecar.api_port)["outbox_dispatcher_up"] == 1)
        sql(
            "UPDATE outbox.deliveries SET next_attempt_at = now() - interval '90 seconds'"
            " WHERE status = 'pending' AND lease IS NULL"
        )
        values = wait_until(
            lambda: (m := samples(sidecar.api_port))["outbox_due_deliveries"] == 2 and m,
            what="the backlog gauges' next read",
        )
        assert values["outbox_pending_deliveries"] == 3
        assert 90 <= values["outbox_oldest_due_age_seconds"] < 120
        assert black_hole.connections() == 1

    def test_nothing_due_reads_zero(self, sql: SQL, sidecars: Start) -> None:
        """A retry scheduled for later is pending, not due."""
        hook = sql.webhook("https://example.com/h", enabled=False)
        event = sql.emit()
        sql(
            "INSERT INTO outbox.deliveries (event_id, webhook_id, next_attempt_at)"
            " VALUES (%s, %s, now() + interval '1 hour')",
            (event, hook),
        )
        sidecar = sidecars()
        values = wait_until(
            lambda: (m := samples(sidecar.api_port))["outbox_pending_deliveries"] == 1 and m,
            what="the backlog gauges' first read",
        )
        assert values["outbox_due_deliveries"] == 0
        assert values["outbox_oldest_due_age_seconds"] == 0
