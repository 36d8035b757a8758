"""Operating outbox: the gauges the alerts read, the metrics the alerts and the dashboard
name, and the app's pod through an upgrade.

Real `outbox run` processes against real Postgres. The upgrade tests read the sidecar
container of deploy/kubernetes/deployment.yaml (its settings and its probes) and call
what the kubelet would call, before and after a migrate of a newer schema.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox import db
from tests.conftest import (
    ROOT,
    SQL,
    Sidecar,
    as_sidecar_role,
    free_port,
    sidecar_environment,
    wait_until,
)
from tests.deploy.test_alerts import rules
from tests.deploy.test_dashboard import dashboard_metrics, named_metrics
from tests.deploy.test_kubernetes import outbox_container
from tests.receiver import BlackHole, Receiver

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
        # The first read after the update: one before it (the gauges keep their values
        # for seconds) may show two due too, while the third was not yet emitted.
        values = wait_until(
            lambda: (m := samples(sidecar.api_port))["outbox_oldest_due_age_seconds"] >= 90 and m,
            what="the backlog gauges' next read",
        )
        assert values["outbox_due_deliveries"] == 2
        assert values["outbox_pending_deliveries"] == 3
        assert values["outbox_oldest_due_age_seconds"] < 120
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


# Prometheus' own series for every target.
SCRAPE_SERIES = {"up"}


def exposed(port: int) -> set[str]:
    """The names of every series a live /metrics has, as PromQL names them."""
    return {name.partition("{")[0] for name in samples(port)}


class TestMetricNames:
    def test_alerts_and_dashboard_name_only_metrics_a_sidecar_exposes(
        self, sidecars: Start
    ) -> None:
        """A rule on a misspelt metric would never fire, and its unit cases (written
        with the same spelling) would still pass; a panel would stay empty."""
        have = exposed(sidecars().api_port)
        for rule in rules():
            missing = named_metrics(rule["expr"]) - have - SCRAPE_SERIES
            assert not missing, (rule["alert"], missing)
        missing = dashboard_metrics() - have - SCRAPE_SERIES
        assert not missing, missing


# The outbox container beside the app, as the manifest runs it.
APP_SIDECAR = outbox_container("example-app")
WAITING = (
    "waiting for the schema this version knows (OUTBOX_SCHEMA_MISMATCH=wait): delivering nothing"
)


class PodSidecar(Sidecar):
    """`outbox run` with the manifest container's settings, started as the kubelet
    would: without waiting for it to deliver (it may be waiting for its schema)."""

    def start(self) -> PodSidecar:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        env = self.env | {"OUTBOX_DATABASE_URL": as_sidecar_role(self.env["OUTBOX_DATABASE_URL"])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", *APP_SIDECAR.get("args", ["run"])],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.probe("startupProbe") == 200, what="the startup probe")
        return self

    def probe(self, name: str) -> int | None:
        """What the container's probe ``name`` gets: its path on its port (the
        manifest's named port is the container's, here the one this process listens on)."""
        answer = get(self.api_port, APP_SIDECAR[name]["httpGet"]["path"])
        return None if answer is None else answer[0]

    def container_ready(self) -> bool:
        """As the kubelet counts it: running, its readiness probe (if it has one)
        passing, and its liveness probe passing (else it is restarted, not running)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return False
        probes = [p for p in ("readinessProbe", "livenessProbe") if p in APP_SIDECAR]
        return all(self.probe(p) == 200 for p in probes)

    def waiting(self) -> int:
        return sum(1 for line in self.log_lines() if line.get("event") == WAITING)


@pytest.fixture
def pod_sidecars(
    database_url: str, ca_file: str, tmp_path: Path
) -> Iterator[Callable[[], PodSidecar]]:
    manifest_env = {e["name"]: e["value"] for e in APP_SIDECAR["env"] if "value" in e}
    started: list[PodSidecar] = []

    def start() -> PodSidecar:
        env = sidecar_environment(
            database_url,
            ca_file,
            OUTBOX_API_LISTEN=f"127.0.0.1:{free_port()}",
            # Seconds, not the default half minute, for the test's sake.
            OUTBOX_SCHEMA_CHECK_INTERVAL="0.2",
        )
        env |= manifest_env
        sidecar = PodSidecar(env, tmp_path / f"pod{len(started)}.log").start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            sidecar.proc.kill()
            sidecar.wait()


def schema_is(sql: SQL, change: str) -> int:
    """Move the recorded schema version as a migrate would; the version it is then."""
    expected = db.expected_version()
    if change == "newer":
        sql(
            "INSERT INTO outbox.schema_migrations (version, name) VALUES (%s, 'x')", (expected + 1,)
        )
    elif change == "older":
        sql("DELETE FROM outbox.schema_migrations WHERE version = %s", (expected,))
    elif change == "current":
        sql("DELETE FROM outbox.schema_migrations WHERE version > %s", (expected,))
        sql(
            "INSERT INTO outbox.schema_migrations (version, name) VALUES (%s, 'x')"
            " ON CONFLICT DO NOTHING",
            (expected,),
        )
    return int(sql.one("SELECT max(version) FROM outbox.schema_migrations"))


def attempts(sql: SQL, event: int) -> Any:
    return sql.one("SELECT attempts FROM outbox.deliveries WHERE event_id = %s", (event,))


class Prober:
    """A kubelet that probes without pause, on a thread: every answer ``path`` got."""

    def __init__(self, port: int, path: str) -> None:
        self.answers: list[int | str | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, args=(port, path), daemon=True)
        self._thread.start()

    def _probe(self, port: int, path: str) -> None:
        while not self._stop.is_set():
            try:
                answer = get(port, path)
            except (OSError, http.client.HTTPException) as exc:
                self.answers.append(repr(exc))
            else:
                self.answers.append(None if answer is None else answer[0])

    def stop(self) -> list[int | str | None]:
        self._stop.set()
        self._thread.join()
        return self.answers


class TestAppPodThroughAnUpgrade:
    def test_its_probes_are_answered_throughout_the_waits_and_the_migrates(
        self, sql: SQL, receiver: Receiver, pod_sidecars: Callable[[], PodSidecar]
    ) -> None:
        """Started before its migrate, delivering after it, waiting again after a newer
        one: the port the kubelet probes never refuses a connection in between (the
        waiting sidecar's listener hands over to the delivering one's and back)."""
        sql.webhook(receiver.url())
        schema_is(sql, "older")
        sidecar = pod_sidecars()
        prober = Prober(sidecar.api_port, "/healthz")
        wait_until(lambda: sidecar.waiting() == 1, what="the sidecar to wait")
        schema_is(sql, "current")
        sql.emit()
        receiver.wait_for(1)
        schema_is(sql, "newer")
        wait_until(lambda: sidecar.waiting() == 2, what="the sidecar to wait again")
        answers = prober.stop()
        assert [a for a in answers if a != 200] == []
        assert sidecar.container_ready()

    def test_a_newer_schema_migrated_under_it_leaves_the_pod_ready(
        self, sql: SQL, receiver: Receiver, pod_sidecars: Callable[[], PodSidecar]
    ) -> None:
        """Migrate a newer version while the old sidecar runs: it stops delivering
        (the fence holds) but its container stays ready, also once restarted on the
        same version (a crash, an OOM kill), until a rollout replaces it. Waiting, it
        reports no stale backlog that would keep an alert up."""
        hook = sql.webhook(receiver.url())
        # A delivery due for 90 s that a transaction holds, so no claim takes it.
        other = sql.emit(account="acct_2")
        held_id = sql.one(
            "INSERT INTO outbox.deliveries (event_id, webhook_id, next_attempt_at)"
            " VALUES (%s, %s, now() - interval '90 seconds') RETURNING id",
            (other, hook),
        )
        with psycopg.connect(sql.url) as held:
            held.execute("SELECT 1 FROM outbox.deliveries WHERE id = %s FOR UPDATE", (held_id,))
            sidecar = pod_sidecars()
            assert sidecar.container_ready()
            sql.emit()
            receiver.wait_for(1)
            wait_until(
                lambda: samples(sidecar.api_port)["outbox_oldest_due_age_seconds"] >= 90,
                what="the held delivery in the backlog gauges",
            )

            assert schema_is(sql, "newer") == db.expected_version() + 1
            wait_until(lambda: sidecar.waiting() == 1, what="the sidecar to notice")
            assert sidecar.container_ready()
            assert get(sidecar.api_port, "/readyz") == (503, b'{"status": "unavailable"}')
            waiting = samples(sidecar.api_port)
            assert waiting["outbox_dispatcher_up"] == 0
            assert waiting["outbox_oldest_due_age_seconds"] == 0

            event = sql.emit()
            sidecar.signal(signal.SIGKILL)
            sidecar.wait()
            restarted = pod_sidecars()
            wait_until(lambda: restarted.waiting() == 1, what="the restarted sidecar to wait")
            assert restarted.container_ready()
            assert attempts(sql, event) == 0
            assert len(receiver.received()) == 1

            restarted.signal(signal.SIGTERM)
            assert restarted.wait() == 0

    def test_a_pod_started_before_the_migrate_is_ready_and_delivers_after_it(
        self, sql: SQL, receiver: Receiver, pod_sidecars: Callable[[], PodSidecar]
    ) -> None:
        """A new pod rolled out before its migrate: ready at once, delivering nothing
        (and its API answering 503, not reading a schema it does not know) until the
        schema is the one it knows, then delivering what waited."""
        sql.webhook(receiver.url())
        schema_is(sql, "older")
        event = sql.emit()
        sidecar = pod_sidecars()
        wait_until(lambda: sidecar.waiting() == 1, what="the sidecar to wait")
        assert sidecar.container_ready()
        assert attempts(sql, event) == 0
        status, body = get(sidecar.api_port, "/api/v1/webhooks") or (None, b"")
        assert status == 503 and b"waiting for the database schema" in body

        schema_is(sql, "current")
        (delivery,) = receiver.wait_for(1)
        assert delivery.headers["X-Webhook-Event"] == "lead.scored"
        assert sidecar.container_ready()
        status, body = get(sidecar.api_port, "/api/v1/webhooks") or (None, b"")
        assert status == 401 and b"unauthorized" in body
        assert wait_until(lambda: get(sidecar.api_port, "/readyz") == (200, b'{"status": "ok"}'))
