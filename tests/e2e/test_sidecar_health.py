"""The running sidecar in production: probes, cheap metrics, parts that fail, schema fence.

Every test runs real `outbox run` processes. Failures are made by the database where it
can make them (a trigger that raises, a table locked, a database refusing connections);
OUTBOX_TEST_FAULTS only for the parts whose queries cannot fail otherwise.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from outbox import db
from tests.conftest import (
    ROOT,
    SQL,
    Sidecar,
    as_sidecar_role,
    doorbell_holders,
    login_url,
    run_outbox,
    sidecar_environment,
    wait_until,
)
from tests.receiver import Receiver, Reply

Start = Callable[..., Sidecar]

# The named query that reads the backlog, as Postgres shows it in pg_stat_activity.
PENDING_STATS = db.query("pending_stats").splitlines()[-3]


def get(sidecar: Sidecar, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.api_port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def probe(sidecar: Sidecar, path: str) -> tuple[int, Any]:
    status, body = get(sidecar, path)
    return status, json.loads(body)


def gauges(sidecar: Sidecar) -> dict[str, float]:
    status, body = get(sidecar, "/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def failures(sidecar: Sidecar, part: str) -> list[dict[str, Any]]:
    """The part's logged failures (each with its traceback)."""
    return [
        line
        for line in sidecar.log_lines()
        if line.get("event") == "part failed; starting it again" and line.get("part") == part
    ]


def statuses(sql: SQL) -> dict[str, int]:
    return dict(sql("SELECT status, count(*) FROM outbox.deliveries GROUP BY status"))


def emit_many(sql: SQL, count: int) -> None:
    sql(
        "INSERT INTO outbox.events (account_id, event, data)"
        " SELECT 'acct_1', 'lead.scored', jsonb_build_object('n', n)"
        " FROM generate_series(1, %s) AS n",
        (count,),
    )


def delivered_once_each(sql: SQL, receiver: Receiver, total: int) -> None:
    """Every delivery succeeded, was sent exactly once, and its attempt is recorded."""
    wait_until(
        lambda: statuses(sql) == {"succeeded": total},
        timeout=60,
        what=f"{total} succeeded deliveries (now {statuses(sql)})",
    )
    ids = Counter(r.headers["X-Webhook-Id"] for r in receiver.received())
    assert len(ids) == total and max(ids.values()) == 1, ids
    assert sql.one("SELECT count(*) FROM outbox.delivery_attempts") == total


@contextmanager
def raising_trigger(sql: SQL, table: str, when: str) -> Iterator[None]:
    """A trigger on ``table`` that fails every write matching ``when`` with an error
    that is not a lost connection, until the block ends."""
    sql(
        "CREATE FUNCTION public.injected_fault() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN RAISE EXCEPTION 'injected fault'; END$$"
    )
    sql(
        f"CREATE TRIGGER injected_fault BEFORE INSERT OR UPDATE ON {table}"
        f" FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION public.injected_fault()"
    )
    try:
        yield
    finally:
        sql(f"DROP TRIGGER injected_fault ON {table}")
        sql("DROP FUNCTION public.injected_fault()")


@contextmanager
def refusing_connections(sql: SQL) -> Iterator[None]:
    """The test's database refuses new connections until the block ends (the sidecar's
    are dropped); said from another database, since none may say it of its own."""
    dbname = sql.one("SELECT current_database()")
    admin = psycopg.connect(make_conninfo(sql.url, dbname="postgres"), autocommit=True)
    try:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'outbox' AND datname = current_database()"
        )
        yield
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()


def run_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_outbox(env, "run")


class TestProbes:
    def test_no_error_text_and_liveness_does_not_hang_on_the_database(
        self, sql: SQL, sidecars: Start
    ) -> None:
        """While the database refuses connections, /healthz stays 200 (the dispatcher is
        alive, waiting for it) and /readyz answers 503; neither shows the error."""
        sidecar = sidecars()
        assert probe(sidecar, "/healthz") == (200, {"status": "ok"})
        assert probe(sidecar, "/readyz") == (200, {"status": "ok"})
        with refusing_connections(sql):
            assert wait_until(
                lambda: probe(sidecar, "/readyz")[0] == 503, what="/readyz to see the outage"
            )
            assert probe(sidecar, "/readyz") == (503, {"status": "unavailable"})
            assert probe(sidecar, "/healthz") == (200, {"status": "ok"})
            assert b"accepting connections" not in get(sidecar, "/metrics")[1]
        wait_until(lambda: probe(sidecar, "/readyz")[0] == 200, what="/readyz to recover")

    def test_readyz_answers_503_while_the_schema_is_not_the_one_it_knows(
        self, sql: SQL, sidecars: Start
    ) -> None:
        """A schema newer than this version: not ready (but alive), until it is again."""
        sidecar = sidecars(OUTBOX_SCHEMA_CHECK_INTERVAL="3600")
        newer = db.expected_version() + 1
        sql("INSERT INTO outbox.schema_migrations (version, name) VALUES (%s, 'x')", (newer,))
        assert probe(sidecar, "/readyz") == (503, {"status": "unavailable"})
        assert probe(sidecar, "/healthz") == (200, {"status": "ok"})
        sql("DELETE FROM outbox.schema_migrations WHERE version = %s", (newer,))
        assert probe(sidecar, "/readyz") == (200, {"status": "ok"})


class TestMetricsLoad:
    @pytest.mark.slow
    def test_scrapes_never_query_the_backlog(self, sql: SQL, sidecars: Start) -> None:
        """With the deliveries table locked, 100 scrapes from 10 clients all answer with
        the last known backlog, and at most one backlog query (the sidecar's own, every
        few seconds) is ever waiting on the lock."""
        sidecar = sidecars()
        hook = sql.webhook("https://example.com/h", enabled=False)
        event = sql.emit()
        sql(
            "INSERT INTO outbox.deliveries (event_id, webhook_id, next_attempt_at)"
            " VALUES (%s, %s, now() + interval '1 hour')",
            (event, hook),
        )
        wait_until(lambda: gauges(sidecar)["outbox_pending_deliveries"] == 1, what="the first read")
        locker = psycopg.connect(sql.url)
        waiting: list[int] = []
        answers: list[float] = []

        def scrape() -> None:
            for _ in range(10):
                answers.append(gauges(sidecar)["outbox_pending_deliveries"])
                waiting.append(
                    sql.one(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                        " AND query LIKE %s",
                        (f"%{PENDING_STATS}%",),
                    )
                )

        try:
            locker.execute("LOCK TABLE outbox.deliveries IN ACCESS EXCLUSIVE MODE")
            clients = [threading.Thread(target=scrape) for _ in range(10)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
        finally:
            locker.rollback()
            locker.close()
        assert answers == [1.0] * 100
        assert max(waiting) <= 1, waiting


class TestParts:
    def test_the_recorder_failing_loses_nothing(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Results that cannot be written (a trigger raises) are kept, logged with the
        traceback, and written once the fault is gone: each delivery sent once."""
        for n in range(3):
            sql.webhook(receiver.url(f"/hook{n}"))
        sidecar = sidecars()
        with raising_trigger(sql, "outbox.delivery_attempts", "true"):
            emit_many(sql, 10)
            receiver.wait_for(30)
            wait_until(lambda: len(failures(sidecar, "record")) >= 2, what="failed writes")
            assert statuses(sql) == {"pending": 30}
        delivered_once_each(sql, receiver, 30)
        assert "injected fault" in failures(sidecar, "record")[0]["exception"]

    def test_the_loop_failing_starts_again(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Claims that fail (a trigger raises) are retried; once the fault is gone the
        deliveries go out, each once."""
        sql.webhook(receiver.url())
        sidecar = sidecars()
        with raising_trigger(sql, "outbox.deliveries", "NEW.lease IS NOT NULL"):
            emit_many(sql, 10)
            wait_until(lambda: len(failures(sidecar, "loop")) >= 2, what="failed claims")
            assert receiver.received() == []
        delivered_once_each(sql, receiver, 10)

    def test_every_part_that_fails_is_started_again(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Listener, doorbell, recorder, loop, schema watch, backlog reader and the
        event loop's lag watch each fail at their first starts: each failure is logged
        with its traceback, and then the listener listens, the doorbell is held, and
        deliveries and gauges work."""
        parts = ("listen", "doorbell", "record", "loop", "schema", "backlog", "lag")
        sidecar = sidecars(OUTBOX_TEST_FAULTS=",".join(f"{part}=2" for part in parts))
        for part in parts:
            wait_until(lambda p=part: len(failures(sidecar, p)) == 2, what=f"{part} failures")
            assert "InjectedFault" in failures(sidecar, part)[0]["exception"]
        sql.webhook(receiver.url())
        emit_many(sql, 5)
        delivered_once_each(sql, receiver, 5)
        wait_until(
            lambda: (
                sql.one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND query LIKE '%LISTEN outbox_wake;'"
                )
                == 1
            ),
            what="the listener",
        )
        wait_until(lambda: doorbell_holders(sql) == 1, what="the doorbell")
        assert probe(sidecar, "/healthz") == (200, {"status": "ok"})
        assert sidecar.stop() == 0

    @pytest.mark.slow
    def test_a_part_that_keeps_failing_stops_the_sidecar_with_exit_1(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A recorder that cannot write for a whole lease: the sidecar stops claiming,
        says so, and exits 1, rather than send everything again and again."""
        sql.webhook(receiver.url())
        sidecar = sidecars()
        with raising_trigger(sql, "outbox.delivery_attempts", "true"):
            emit_many(sql, 3)
            assert sidecar.wait(timeout=90) == 1
        events = [line.get("event") for line in sidecar.log_lines()]
        assert "part keeps failing; stopping the sidecar" in events
        assert "results not recorded; those deliveries are retried when their lease ends" in (
            events
        )


class TestSchemaFence:
    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (
                "DROP SCHEMA outbox CASCADE",
                "outbox: the database has no outbox schema: run `outbox migrate`",
            ),
            (
                "DELETE FROM outbox.schema_migrations"
                " WHERE version = (SELECT max(version) FROM outbox.schema_migrations)",
                "outbox: the outbox schema is at version {older} and this outbox needs"
                " {expected}: run `outbox migrate`",
            ),
            (
                "INSERT INTO outbox.schema_migrations (version, name) VALUES ({newer}, 'x')",
                "outbox: the outbox schema is at version {newer}, newer than this outbox"
                " knows ({expected}): upgrade outbox",
            ),
        ],
        ids=["missing", "older", "newer"],
    )
    def test_run_refuses_another_schema_with_one_line_and_exit_2(
        self, sql: SQL, sidecar_env: dict[str, str], change: str, message: str
    ) -> None:
        expected = db.expected_version()
        versions = {"older": expected - 1, "newer": expected + 1, "expected": expected}
        sql(change.format(**versions))
        url = as_sidecar_role(sidecar_env["OUTBOX_DATABASE_URL"])
        result = run_once(sidecar_env | {"OUTBOX_DATABASE_URL": url, "OUTBOX_API_LISTEN": "off"})
        assert result.returncode == 2
        assert result.stderr.splitlines() == [message.format(**versions)]

    def test_run_refuses_a_login_without_the_sidecar_role(
        self, sql: SQL, sidecar_env: dict[str, str]
    ) -> None:
        """A login that may not even read the schema version is told which role it needs."""
        role = f"outbox_nobody_{uuid.uuid4().hex[:8]}"
        sql(f"CREATE ROLE {role} LOGIN")
        try:
            url = login_url(sidecar_env["OUTBOX_DATABASE_URL"], role)
            result = run_once(sidecar_env | {"OUTBOX_DATABASE_URL": url})
        finally:
            sql(f"DROP ROLE {role}")
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "outbox: this login may not read outbox.schema_migrations: log in as a role"
            " granted outbox_sidecar (`outbox migrate` grants it what outbox run needs)"
        ]

    def test_a_migrate_under_a_running_sidecar_stops_it_with_exit_3(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """A newer version's migration lands: the sidecar stops claiming, finishes and
        records the attempts in flight, and exits 3."""
        receiver.respond = lambda _: Reply(200, delay=1)
        sql.webhook(receiver.url())
        sidecar = sidecars(OUTBOX_CONCURRENCY="16", OUTBOX_SCHEMA_CHECK_INTERVAL="0.2")
        emit_many(sql, 20)
        in_flight = receiver.wait_for(2)
        newer = db.expected_version() + 1
        sql("INSERT INTO outbox.schema_migrations (version, name) VALUES (%s, 'x')", (newer,))
        assert sidecar.wait(timeout=30) == 3
        sent = len(receiver.received())
        assert sent >= len(in_flight)
        assert statuses(sql).get("succeeded") == sent
        assert sql.one("SELECT count(*) FROM outbox.deliveries WHERE lease IS NOT NULL") == 0
        changed = [
            line
            for line in sidecar.log_lines()
            if line.get("event", "").startswith("the outbox schema changed")
        ]
        assert changed and changed[0]["schema_version"] == newer

    def test_a_sidecar_started_before_the_database_answers_waits_for_it(
        self, sql: SQL, database_url: str, ca_file: str, tmp_path: Any
    ) -> None:
        """The schema check at start waits for a database that does not answer yet,
        like the dispatcher does, rather than give up."""
        env = sidecar_environment(as_sidecar_role(database_url), ca_file, OUTBOX_API_LISTEN="off")
        log_path = tmp_path / "waiting.log"
        with refusing_connections(sql), open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "outbox", "run"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            wait_until(
                lambda: "database unavailable, retrying" in log_path.read_text(),
                what="a retry",
            )
            assert proc.poll() is None
        try:
            wait_until(lambda: "dispatcher started" in log_path.read_text(), what="the start")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_fault_setting_is_for_tests_and_checked() -> None:
    """A malformed OUTBOX_TEST_FAULTS is refused like any other setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    result = run_once(env | {"OUTBOX_TEST_FAULTS": "listen"})
    assert result.returncode == 2
    assert result.stderr.strip() == "outbox: OUTBOX_TEST_FAULTS: 'listen' is not PART=COUNT"
