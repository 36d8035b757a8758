"""Several dispatchers, crashes, lost connections, restarts and signals."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from outbox import db
from tests.conftest import ROOT, SQL, Sidecar, wait_until
from tests.receiver import Receiver, Reply
from tools import localpg

Start = Callable[..., Sidecar]


def statuses(sql: SQL) -> dict[str, int]:
    return dict(sql("SELECT status, count(*) FROM outbox.deliveries GROUP BY status"))


def all_succeeded(sql: SQL, total: int, timeout: float = 60) -> None:
    wait_until(
        lambda: statuses(sql) == {"succeeded": total},
        timeout=timeout,
        what=f"{total} succeeded deliveries (now {statuses(sql)})",
    )


def emit_many(sql: SQL, count: int, account: str = "acct_1") -> None:
    sql(
        "INSERT INTO outbox.events (account_id, event, data)"
        " SELECT %s, 'lead.scored', jsonb_build_object('n', n)"
        " FROM generate_series(1, %s) AS n",
        (account, count),
    )


class TestSeveralDispatchers:
    @pytest.mark.slow
    def test_three_dispatchers_share_thousands_without_duplicates(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Three processes on one database deliver each of 3,000 deliveries exactly once."""
        for n in range(10):
            sql.webhook(receiver.url(f"/hook{n}"))
        # Exactly once needs every attempt to succeed the first time: the tests' 2 s
        # timeout, on a loaded machine, makes a slow answer a retry the receiver sees twice.
        runners = [sidecars(OUTBOX_HTTP_TIMEOUT="20") for _ in range(3)]
        emit_many(sql, 300)
        all_succeeded(sql, 3000)
        ids = Counter(r.headers["X-Webhook-Id"] for r in receiver.received())
        assert len(ids) == 3000
        assert ids.most_common(1)[0][1] == 1, "a delivery was sent twice"
        for runner in runners:
            assert runner.stop() == 0
        workers = [
            sum(1 for line in r.log_lines() if line.get("event") == "attempt") for r in runners
        ]
        assert sum(workers) == 3000
        assert sum(1 for n in workers if n) >= 2, f"one dispatcher did everything: {workers}"


class TestCrashes:
    @pytest.mark.slow
    def test_kill_9_mid_flight_loses_nothing(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Deliveries a killed dispatcher held are attempted again by another within 30 s."""
        receiver.respond = lambda _: Reply(200, delay=2)
        for n in range(4):
            sql.webhook(receiver.url(f"/hook{n}"))
        victim = sidecars(OUTBOX_HTTP_TIMEOUT="10")  # default lease
        emit_many(sql, 5)
        receiver.wait_for(4)  # attempts in flight
        victim.signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        receiver.respond = lambda _: Reply(200)
        sidecars()
        all_succeeded(sql, 20, timeout=40)
        assert time.monotonic() - killed_at < 30
        delivered = {r.headers["X-Webhook-Id"] for r in receiver.received()}
        assert len(delivered) == 20

    @pytest.mark.slow
    def test_terminated_database_connections_lose_nothing(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """pg_terminate_backend on every dispatcher connection, repeatedly: all delivered once."""
        receiver.respond = lambda _: Reply(200, delay=0.05)
        for n in range(5):
            sql.webhook(receiver.url(f"/hook{n}"))
        sidecars()
        backends = (
            "FROM pg_stat_activity WHERE application_name = 'outbox'"
            " AND datname = current_database()"
        )
        for _ in range(4):
            emit_many(sql, 20)
            time.sleep(0.1)
            # Every connection (claims, results, listener, doorbell) comes back first.
            wait_until(lambda: sql.one(f"SELECT count(*) {backends}") >= 3, what="reconnect")
            sql(f"SELECT pg_terminate_backend(pid) {backends}")
        all_succeeded(sql, 400)
        ids = Counter(r.headers["X-Webhook-Id"] for r in receiver.received())
        assert len(ids) == 400 and ids.most_common(1)[0][1] == 1
        # The dispatcher is still alive and listening: a new event is still delivered.
        sql.emit(data={"after": True})
        wait_until(
            lambda: any(json.loads(r.body)["data"] == {"after": True} for r in receiver.received())
        )


class TestSignals:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_stop_finishes_in_flight_attempts_and_exits_0(
        self, sql: SQL, receiver: Receiver, sidecars: Start, sig: int
    ) -> None:
        """On SIGTERM/SIGINT: no new claims, in-flight attempts finish and are recorded, exit 0."""
        receiver.respond = lambda _: Reply(200, delay=1)
        sql.webhook(receiver.url())
        sidecar = sidecars(OUTBOX_CONCURRENCY="16")
        emit_many(sql, 20)
        in_flight = receiver.wait_for(2)
        sidecar.signal(sig)
        assert sidecar.wait(timeout=15) == 0
        sent = len(receiver.received())
        assert sent >= len(in_flight)
        assert statuses(sql).get("succeeded") == sent
        assert sql.one("SELECT count(*) FROM outbox.deliveries WHERE lease IS NOT NULL") == 0
        assert (
            sql.one(
                "SELECT count(*) FROM outbox.deliveries"
                " WHERE status = 'pending'"
                " AND greatest(next_attempt_at, leased_until) > now()"
            )
            == 0
        )


@pytest.fixture(scope="module")
def private_pg() -> Iterator[localpg.Server]:
    """A cluster of our own, which these tests may restart and add roles to."""
    datadir = Path("/tmp") / f"outbox-private-{os.getpid()}"
    datadir.mkdir(mode=0o755)
    saved = os.environ.get("OUTBOX_LOCALPG_DIR")
    os.environ["OUTBOX_LOCALPG_DIR"] = str(datadir / "pgdata")
    try:
        yield localpg.server(force_private=True)
    finally:
        localpg.stop_private()
        if saved is None:
            del os.environ["OUTBOX_LOCALPG_DIR"]
        else:
            os.environ["OUTBOX_LOCALPG_DIR"] = saved
        shutil.rmtree(datadir, ignore_errors=True)


class TestPrivateCluster:
    def test_migrate_without_the_right_to_create_roles_says_so_and_goes_on(
        self, private_pg: localpg.Server
    ) -> None:
        """A migrating user who may not create roles gets the schema and a clear warning."""
        admin = SQL(private_pg.url("postgres"))
        # First in this class: nothing has created the cluster-wide role yet.
        assert admin.one("SELECT count(*) FROM pg_roles WHERE rolname = 'outbox_producer'") == 0
        admin("CREATE ROLE app_owner LOGIN CREATEDB NOCREATEROLE")
        admin("CREATE DATABASE app OWNER app_owner")
        admin.conn.close()
        url = f"postgresql://app_owner@{private_pg.host}:{private_pg.port}/app"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        result = subprocess.run(
            [sys.executable, "-m", "outbox", "migrate"],
            capture_output=True,
            text=True,
            env=env | {"OUTBOX_DATABASE_URL": url, "OUTBOX_LOG_FORMAT": "json"},
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "cannot create role outbox_producer" in result.stderr
        app = SQL(url)
        assert app.one("SELECT count(*) FROM pg_roles WHERE rolname = 'outbox_producer'") == 0
        assert app.one("SELECT outbox.emit('acct_1', 'lead.created', '{}')") == 1
        app.conn.close()

    @pytest.mark.slow
    def test_dispatcher_survives_a_database_restart(
        self, private_pg: localpg.Server, receiver: Receiver, sidecars: Start
    ) -> None:
        """The cluster is restarted under a running dispatcher; everything arrives."""
        url = localpg.ensure_database(private_pg, "restart")
        asyncio.run(db.migrate(url))
        sql = SQL(url)
        sql.webhook(receiver.url())
        sidecars(OUTBOX_DATABASE_URL=url)
        emit_many(sql, 10)
        receiver.wait_for(10)
        sql.conn.close()
        localpg.stop_private()
        time.sleep(1)
        assert localpg.server(force_private=True).port == private_pg.port
        sql = SQL(url)
        emit_many(sql, 10)
        all_succeeded(sql, 20)
        sql.conn.close()
