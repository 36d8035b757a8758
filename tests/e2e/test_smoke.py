from __future__ import annotations

from tests.conftest import SQL, wait_until
from tests.receiver import Receiver


def test_one_delivery(sql: SQL, receiver: Receiver, sidecars) -> None:  # type: ignore[no-untyped-def]
    hook = sql.webhook(receiver.url())
    sidecars()
    sql.emit()
    got = receiver.wait_for(1)
    print(got[0])
    wait_until(lambda: sql.one("SELECT status FROM outbox.deliveries") == "succeeded")
    print(sql("SELECT * FROM outbox.webhook_status WHERE id = %s", (hook,)))
