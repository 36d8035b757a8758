"""`Bench`, what every section measures with: the run's cluster, receiver, sizes and
repetitions; the template database (outbox schema, payload pool, webhooks, the
references' tables); backlogs loaded through the real schema; `outbox run` started,
drained and stopped with its rate (at the receiver), CPU time, peak RSS and the CPU
time of Postgres; and the two reference clients the sections share (pgbench on the
producer side, bench/http_client.py against the receiver).
"""

from __future__ import annotations

import contextlib
import glob
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from bench import payloads
from bench.common import (
    ALL_CPUS,
    APP_CPUS,
    CONCURRENCY,
    DB_CPUS,
    FAN_ACCOUNTS,
    FAN_OUT,
    PROCS,
    PY,
    ROOT,
    WEBHOOKS,
    cpu_seconds,
    peak_rss_mb,
    rate_of,
    run_command,
    sidecar_env,
)
from bench.services import TEMPLATE, Cluster, Receiver


@dataclass
class Sidecar:
    proc: subprocess.Popen[Any]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


# --- SQL of the benchmark's own objects --------------------------------------------------

BENCH_TABLES_SQL = """
CREATE TABLE bench.domain (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id int NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- The reference: the same event written to a plain table, no trigger.
CREATE TABLE bench.events_plain (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  text NOT NULL,
    event       text NOT NULL,
    data        jsonb NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now()
);
-- The naive design: a plain table whose per-row trigger NOTIFYs.
CREATE TABLE bench.events_naive (LIKE bench.events_plain INCLUDING ALL);
CREATE FUNCTION bench.naive_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_naive', NEW.id::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER events_naive_notify AFTER INSERT ON bench.events_naive
    FOR EACH ROW EXECUTE FUNCTION bench.naive_notify();
"""


@dataclass
class Sizes:
    """How much each section does (`--quick` takes QUICK)."""

    throughput: int = 20_000
    pgbench_seconds: int = 10
    latency_seconds: float = 20.0
    latency_rates: tuple[int, int] = (200, 2000)
    backlog_small: int = 10_000
    backlog_large: int = 1_000_000
    backlog_window: float = 20.0
    two_sidecars: int = 20_000
    retention_backlog: int = 1_000_000
    cost_events: int = 20_000
    limits: int = 20_000


QUICK = Sizes(
    throughput=5_000,
    pgbench_seconds=3,
    latency_seconds=4.0,
    backlog_small=5_000,
    backlog_large=50_000,
    backlog_window=4.0,
    two_sidecars=5_000,
    retention_backlog=50_000,
    cost_events=4_000,
    limits=5_000,
)

# pgbench's variables (-D): a 2 KB domain row and the event's data, the same ~2 KB object.
DOMAIN_BODY = (payloads.data_json(1) * 2)[:2048]
EVENT_DATA = payloads.data_json(42)


def find_pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    if not candidates:
        raise RuntimeError("pgbench not found (apt-get install postgresql-contrib)")
    return candidates[-1]


class Bench:
    """One run's set-up, handed to every section's `measure`."""

    def __init__(
        self, workdir: Path, cluster: Cluster, receiver: Receiver, reps: int, sizes: Sizes
    ) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.receiver = receiver
        self.reps = reps
        self.sizes = sizes
        self._sidecars = 0
        # pgqueuer's batch size: the throughput section's sweep sets the best it found.
        self.pgqueuer_batch = 16

    # -- the template and the backlogs

    def build_template(self, name: str = TEMPLATE, tree: Path = ROOT) -> None:
        """A template database: the outbox schema of the source tree `tree` (its own
        `outbox migrate`), payload pool, webhooks, pgbench tables, pgqueuer."""
        with self.cluster.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.cluster.url(name)
        run_command(
            [PY, "-m", "outbox", "migrate"], env=self.sidecar_env(url), cwd=tree, timeout=120
        )
        run_command([PY, "-m", "bench.pgq_worker", "install", "--dsn", url], timeout=120)
        hooks = [(f"acct_{w}", f"hook {w}", f"/hook/{w}") for w in range(WEBHOOKS)]
        hooks += [
            (f"fan_{a}", f"hook {a}.{i}", f"/hook/{WEBHOOKS + a * FAN_OUT + i}")
            for a in range(FAN_ACCOUNTS)
            for i in range(FAN_OUT)
        ]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(payloads.POOL_SQL)
            conn.execute(BENCH_TABLES_SQL)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO bench.pool (k, data) VALUES (%s, %s::jsonb)",
                    payloads.pool_rows(),
                )
                cur.executemany(
                    "INSERT INTO outbox.webhooks (account_id, name, url, event, secret)"
                    " VALUES (%s, %s, %s, 'lead.scored', %s)",
                    [(a, n, self.receiver.base + p, payloads.SECRET) for a, n, p in hooks],
                )
            row = conn.execute("SELECT bench.data(123456)::text").fetchone()
            if row is None or row[0] != payloads.data_json(123456):
                raise RuntimeError("the SQL payload pool does not print as bench.payloads does")
            conn.execute("VACUUM ANALYZE")

    def sidecar_env(self, url: str) -> dict[str, str]:
        return sidecar_env(
            url,
            self.receiver.ca,
            OUTBOX_LOG_FORMAT="json",
            OUTBOX_CONCURRENCY=str(CONCURRENCY),
        )

    def load_outbox(
        self, url: str, events: int, *, fan: bool = False, chunk: int = 20_000, settle: bool = True
    ) -> int:
        """Insert `events` events through the real schema (fan-out trigger and all)."""
        # (%% is psycopg's escape for the modulo operator.)
        account = f"'fan_' || (g %% {FAN_ACCOUNTS})" if fan else f"'acct_' || (g %% {WEBHOOKS})"
        with psycopg.connect(url, autocommit=True) as conn:
            for first in range(1, events + 1, chunk):
                last = min(first + chunk - 1, events)
                conn.execute(
                    "INSERT INTO outbox.events (account_id, event, data)"
                    f" SELECT {account}, 'lead.scored', bench.data(g)"
                    " FROM generate_series(%s::bigint, %s::bigint) g",
                    (first, last),
                )
            if settle:
                # What autovacuum would have done to a backlog that built up over time.
                conn.execute("VACUUM ANALYZE outbox.events")
                conn.execute("VACUUM ANALYZE outbox.deliveries")
            row = conn.execute(
                "SELECT count(*) FROM outbox.deliveries WHERE status = 'pending'"
            ).fetchone()
        if settle:
            self.cluster.checkpoint()
        return int(row[0]) if row else 0

    # -- `outbox run`

    def start_sidecar(
        self, url: str, *, cpus: set[int] | None = None, tree: Path = ROOT
    ) -> Sidecar:
        """`outbox run` of the source tree `tree` (bench.ab and the cost section's
        baseline run others): `python -m` puts its working directory first on
        sys.path, so the tree is its cwd."""
        self._sidecars += 1
        log_path = self.workdir / f"sidecar{self._sidecars}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop_sidecar()
        proc = PROCS.start(
            [PY, "-m", "outbox", "run"],
            cpus=cpus,
            cwd=tree,
            env=self.sidecar_env(url),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            with open(log_path, "rb") as f:
                if b"dispatcher started" in f.read(64 * 1024):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                PROCS.stop(proc, signal.SIGKILL)
                log_file.close()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"outbox run did not start (exit {proc.returncode}): {tail}")
            time.sleep(0.01)
        return Sidecar(proc, log_path, log_file)

    def stop_sidecar(self, sidecar: Sidecar) -> None:
        code = PROCS.stop(sidecar.proc, signal.SIGTERM, timeout=60)
        sidecar.log_file.close()
        if code != 0:
            tail = sidecar.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"outbox run exited {code}: {tail}")

    def drain(
        self,
        url: str,
        expected: int,
        *,
        sidecars: int = 1,
        cpus: set[int] | None = None,
        window: float | None = None,
        tree: Path = ROOT,
    ) -> dict[str, Any]:
        """Start `outbox run` (of `tree`) on a loaded backlog and measure at the receiver."""
        self.receiver.reset()
        db_cpu = self.cluster.cpu_seconds()
        wal = self.cluster.wal_lsn()
        started = [self.start_sidecar(url, cpus=cpus, tree=tree) for _ in range(sidecars)]
        try:
            alive = [s.proc for s in started]
            if window is None:
                got = self.receiver.wait_for(
                    expected, 120 + expected / 500, alive=alive, quiet_for=15
                )
            else:
                self.receiver.wait_for(1, 30, alive=alive)
                time.sleep(window + 0.5)
                got = self.receiver.count()
            rss = [peak_rss_mb(s.pid) for s in started]
            cpu = [cpu_seconds(s.pid) for s in started]
        finally:
            for sidecar in started:
                self.stop_sidecar(sidecar)
        db_cpu = self.cluster.cpu_seconds() - db_cpu
        wal = self.cluster.wal_lsn() - wal
        ids, times = self.receiver.records()
        if window is None:
            if got < expected:
                raise RuntimeError(f"only {got} of {expected} deliveries arrived")
            rate = rate_of(times)
        else:
            first = min(times)
            rate = sum(1 for t in times if t <= first + window) / window
        attempts = [s.log_path.read_bytes().count(b'"event": "attempt"') for s in started]
        return {
            "rate": rate,
            "received": len(ids),
            "unique": len(set(ids)),
            "ids": ids,
            "rss_mb": rss,
            "cpu_s": cpu,
            "db_cpu_s": db_cpu,
            "wal_bytes": wal,
            "attempts_logged": attempts,
        }

    def check_outbox(self, url: str) -> dict[str, int]:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
                " count(*) FILTER (WHERE status = 'pending'),"
                " count(*) FILTER (WHERE attempts > 1),"
                " (SELECT count(*) FROM outbox.delivery_attempts)"
                " FROM outbox.deliveries"
            ).fetchone()
        assert row is not None
        return {
            "succeeded": row[0],
            "pending": row[1],
            "attempted_twice": row[2],
            "attempt_rows": row[3],
        }

    # -- the references' clients

    def pgbench(
        self,
        dbname: str,
        script: Path,
        clients: int,
        seconds: float,
        *extra: str,
        transactions: int | None = None,
    ) -> str:
        """pgbench on the producer side (DB_CPUS when pinned); its output. It runs
        `seconds`, or `transactions` per client when given (then `seconds` is only
        its time limit)."""
        assert self.cluster.server is not None
        server = self.cluster.server
        cmd = [find_pgbench(), "-n", "-M", "prepared", "-c", str(clients), "-j", "2"]
        length = ["-T", str(int(seconds))] if transactions is None else ["-t", str(transactions)]
        cmd += [*length, "-f", str(script), *extra]
        cmd += ["-D", f"body={DOMAIN_BODY}", "-D", f"data={EVENT_DATA}"]
        cmd += ["-h", server.host, "-p", str(server.port), "-U", server.user, dbname]
        return run_command(cmd, cpus=DB_CPUS, timeout=seconds + 120)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Postgres (new backends inherit it) on DB_CPUS, the receiver on APP_CPUS; then
        both back on every CPU."""
        self.cluster.pin(DB_CPUS)
        self.receiver.pin(APP_CPUS)
        try:
            yield
        finally:
            self.cluster.pin(ALL_CPUS)
            self.receiver.pin(ALL_CPUS)

    def http_client(self, *args: str, cpus: set[int] | None = None) -> str:
        """bench/http_client.py against the receiver; its output."""
        base = [PY, "-m", "bench.http_client", "--base", self.receiver.base]
        return run_command([*base, "--ca", self.receiver.ca, *args], cpus=cpus)
