"""End to end: a running sidecar deletes old finished rows by itself, and keeps pending ones."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import SQL, Sidecar, wait_until
from tests.receiver import Receiver, Reply

Start = Callable[..., Sidecar]


class TestBackgroundRetention:
    def test_old_finished_rows_disappear_while_pending_ones_stay(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """With OUTBOX_RETENTION=1s, delivered events go with their deliveries and
        attempts soon after; a delivery waiting for its retry stays, with its event."""
        receiver.respond = lambda r: Reply(503 if r.path == "/down" else 200)
        sql.webhook(receiver.url("/up"), event="lead.scored")
        sql.webhook(receiver.url("/down"), event="lead.created")
        sidecar = sidecars(OUTBOX_RETENTION="1s", OUTBOX_RETRY_DELAYS="600")
        for _ in range(5):
            sql.emit(event="lead.scored")
        waiting = sql.emit(event="lead.created")
        receiver.wait_for(5, "/up")
        receiver.wait_for(1, "/down")

        def pruned(what: str) -> int:
            return sum(line[what] for line in sidecar.log_lines() if line.get("event") == "pruned")

        wait_until(lambda: pruned("events") == 5, what="the delivered events to be pruned")
        assert (pruned("deliveries"), pruned("attempts")) == (5, 5)
        assert sql("SELECT event_id, status, attempts FROM outbox.deliveries") == [
            (waiting, "pending", 1)
        ]
        assert sql("SELECT id FROM outbox.events") == [(waiting,)]
        assert sql.one("SELECT count(*) FROM outbox.delivery_attempts") == 1
        assert sidecar.stop() == 0

    def test_retention_off_keeps_everything(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """With OUTBOX_RETENTION=off nothing is deleted, however old."""
        sql.webhook(receiver.url())
        sql.emit()
        sql("UPDATE outbox.events SET occurred_at = now() - interval '400 days'")
        sidecar = sidecars(OUTBOX_RETENTION="off")
        receiver.wait_for(1)
        wait_until(
            lambda: sql.one("SELECT status FROM outbox.deliveries") == "succeeded",
            what="the delivery to be recorded",
        )
        sql("UPDATE outbox.deliveries SET finished_at = now() - interval '400 days'")
        assert sidecar.stop() == 0
        assert sql.one("SELECT count(*) FROM outbox.events") == 1
        assert not [line for line in sidecar.log_lines() if line.get("event") == "pruned"]
