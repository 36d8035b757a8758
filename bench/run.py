"""`make bench`: the benchmark suite of issue #5 (see bench/README.md).

    python -m bench.run [--reps 3] [--only throughput,overhead,...] [--no-profile] [--quick]

Starts a private PostgreSQL 15 cluster (fsync on, default settings) in a temporary
directory, an HTTPS receiver in a process of its own, and then, section by section,
`outbox run` and its references. Writes bench/results/<date>.json and appends a table to
bench/RESULTS.md. Every process it starts, and the cluster, is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from bench import payloads
from outbox import __version__ as outbox_version
from outbox import localpg

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
PY = sys.executable

CPUS = sorted(os.sched_getaffinity(0))
# Producer side (Postgres, pgbench, producers) and delivery side (sidecar, receiver).
DB_CPUS = {CPUS[0]}
APP_CPUS = {CPUS[1]} if len(CPUS) > 1 else {CPUS[0]}
ALL_CPUS = set(CPUS)

CONCURRENCY = 64
WEBHOOKS = 100  # acct_0 .. acct_99, one webhook each, at /hook/<n>
FAN_ACCOUNTS = 10  # fan_0 .. fan_9, ten webhooks each, at /hook/100 ..
FAN_OUT = 10

SUMMARY_KEYS = (
    "throughput_per_s",
    "http_limit_per_s",
    "pgqueuer_per_s",
    "ratio_vs_http_limit",
    "ratio_vs_pgqueuer",
    "producer_overhead_ratio",
    "naive_notify_ratio",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_2k_p99_ms",
    "drain_ratio_1m_vs_10k",
    "rss_peak_mb",
    "two_sidecars_per_s",
    "duplicates",
)


def say(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


# --- statistics ------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the raw values of a repeated measurement."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(p / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def rate_of(times: Sequence[float]) -> float:
    """Requests per second between the first and the last arrival."""
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (max(times) - min(times))


# --- processes -------------------------------------------------------------------------


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (what `taskset -a -p` does)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpus)


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Every child we start, so that all of them can be stopped on the way out."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[Any]] = []

    def start(
        self, cmd: Sequence[str], *, cpus: set[int] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        if cpus is not None:
            # taskset execs the command: the pid we get is the command's own.
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        kwargs.setdefault("cwd", ROOT)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(cmd), **kwargs)
        self.live.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 60
    ) -> int:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ValueError):
            self.live.remove(proc)
        return proc.returncode

    def cleanup(self) -> None:
        for proc in list(self.live):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        self.live.clear()


PROCS = Processes()


def sidecar_env(url: str, ca_file: str, **settings: str) -> dict[str, str]:
    """`outbox run`'s environment: none of ours, the bench's database and receiver (a
    private address, its CA), no admin API; then ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        OUTBOX_DATABASE_URL=url,
        OUTBOX_CA_FILE=ca_file,
        OUTBOX_ALLOW_PRIVATE_TARGETS="true",
        OUTBOX_API_LISTEN="off",
    )
    env.update(settings)
    return env


def run(
    cmd: Sequence[str],
    *,
    cpus: set[int] | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command to completion; its stdout, or an error with its stderr."""
    proc = PROCS.start(
        cmd, cpus=cpus, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        PROCS.stop(proc, signal.SIGKILL)
        raise RuntimeError(f"{' '.join(cmd[:4])} ... timed out after {timeout:g} s") from None
    finally:
        with contextlib.suppress(ValueError):
            PROCS.live.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {err.strip()}")
    return str(out)


# --- the cluster -----------------------------------------------------------------------


class Cluster:
    """A private PostgreSQL cluster (outbox.localpg), fsync on, default settings."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir
        self.server: localpg.Server | None = None

    def start(self) -> None:
        os.environ["OUTBOX_LOCALPG_DIR"] = str(self.datadir)
        self.server = localpg.server(force_private=True)

    def url(self, dbname: str) -> str:
        assert self.server is not None
        return self.server.url(dbname)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def pin(self, cpus: set[int]) -> None:
        """Pin the postmaster and every Postgres process; new backends inherit it."""
        postmaster = int((self.datadir / "postmaster.pid").read_text().split()[0])
        for pid in [postmaster, *descendants(postmaster)]:
            set_affinity(pid, cpus)

    def create(self, name: str, template: str = "bench_tpl") -> str:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def cpu_seconds(self) -> float:
        """CPU time of every Postgres process so far, exited backends included."""
        postmaster = int((self.datadir / "postmaster.pid").read_text().split()[0])
        with open(f"/proc/{postmaster}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        total = ticks / os.sysconf("SC_CLK_TCK")
        for pid in descendants(postmaster):
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def checkpoint(self) -> None:
        with self.admin() as conn:
            conn.execute("CHECKPOINT")

    def setting(self, name: str) -> str:
        with self.admin() as conn:
            row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        return str(row[0]) if row else ""

    def stop(self) -> None:
        localpg.stop_private(self.datadir)


@contextlib.contextmanager
def database(cluster: Cluster, name: str) -> Iterator[str]:
    url = cluster.create(name)
    try:
        yield url
    finally:
        cluster.drop(name)


# --- the receiver ----------------------------------------------------------------------


class Receiver:
    """bench/receiver.py in its own process, driven over its stdin/stdout."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tls = workdir / "tls"
        self._err = open(workdir / "receiver.err", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = PROCS.start(
            [PY, "-m", "bench.receiver", "--dir", str(self.tls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"receiver did not start: {line} {self.errors()}")
        self.port = int(line[1])
        self.base = f"https://127.0.0.1:{self.port}"
        self.ca = str(self.tls / "ca.pem")
        self._dumps = 0

    def errors(self) -> str:
        return (self.workdir / "receiver.err").read_text(errors="replace")[-2000:]

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"receiver died: {self.errors()}")
        return answer

    def count(self) -> int:
        return int(self.command("count"))

    def reset(self) -> None:
        self.command("reset")

    def pin(self, cpus: set[int]) -> None:
        set_affinity(self.proc.pid, cpus)

    def wait_for(
        self,
        count: int,
        timeout: float,
        alive: Sequence[subprocess.Popen[Any]] = (),
        quiet_for: float | None = None,
    ) -> int:
        """Wait until `count` requests arrived (or none for `quiet_for` s); the count."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            got = self.count()
            now = time.monotonic()
            if got >= count or now > deadline:
                return got
            if got != last:
                last, last_change = got, now
            elif quiet_for is not None and now - last_change > quiet_for:
                return got
            for proc in alive:
                if proc.poll() is not None:
                    return self.count()
            time.sleep(0.02)

    def records(self) -> tuple[array[int], array[float]]:
        self._dumps += 1
        path = str(self.workdir / f"dump{self._dumps}")
        self.command(f"dump {path}")
        ids: array[int] = array("q")
        times: array[float] = array("d")
        with open(path + ".ids", "rb") as f:
            ids.frombytes(f.read())
        with open(path + ".t", "rb") as f:
            times.frombytes(f.read())
        os.unlink(path + ".ids")
        os.unlink(path + ".t")
        return ids, times

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.command("quit")
        PROCS.stop(self.proc, timeout=5)
        self._err.close()


# --- the sidecar -----------------------------------------------------------------------


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

# pgbench scripts: one domain row plus the event, in one transaction.
PGBENCH_SCRIPT = """\\set aid random(0, 99)
BEGIN;
INSERT INTO bench.domain (account_id, body) VALUES (:aid, :body);
INSERT INTO {table} (account_id, event, data) VALUES ('acct_' || :aid::text, 'lead.scored', :data);
END;
"""
# Latency producers: one event per transaction; the account (so the webhook) is the client's.
LATENCY_SCRIPT = """INSERT INTO outbox.events (account_id, event, data)
    VALUES ('acct_' || :client_id::text, 'lead.scored', :data);
"""
PGBENCH_TABLES = {
    "a": "bench.events_plain",
    "b": "outbox.events",
    "c": "bench.events_naive",
    "d": "outbox.events",
}
PGBENCH_CASES = {
    "a": "plain INSERT of the event (reference)",
    "b": "outbox INSERT, fan-out to 1 webhook, `outbox run` delivering",
    "c": "naive per-row NOTIFY trigger",
    "d": "outbox INSERT, no sidecar attached (diagnostic: the schema's own cost)",
}


def rotate(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def find_pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    if not candidates:
        raise RuntimeError("pgbench not found (apt-get install postgresql-contrib)")
    return candidates[-1]


def _pgbench_commit_times(prefix: Path) -> dict[int, list[float]]:
    """Per client, the commit times (s) of its transactions in order, from `pgbench -l`.

    Log lines: client_id transaction_no time script_no time_epoch time_us [schedule_lag];
    time_epoch.time_us is when the transaction completed.
    """
    found: dict[int, list[tuple[int, float]]] = {}
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as f:
            for line in f:
                fields = line.split()
                client, number = int(fields[0]), int(fields[1])
                found.setdefault(client, []).append((number, int(fields[4]) + int(fields[5]) / 1e6))
    return {client: [t for _, t in sorted(v)] for client, v in found.items()}


def find_pyspy() -> str | None:
    local = Path(PY).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


# --- the suite -------------------------------------------------------------------------


@dataclass
class Sizes:
    throughput: int = 20_000
    pgbench_seconds: int = 10
    latency_seconds: float = 20.0
    latency_rates: tuple[int, int] = (200, 2000)
    backlog_small: int = 10_000
    backlog_large: int = 1_000_000
    backlog_window: float = 20.0
    two_sidecars: int = 20_000


QUICK = Sizes(
    throughput=5_000,
    pgbench_seconds=3,
    latency_seconds=4.0,
    backlog_small=5_000,
    backlog_large=50_000,
    backlog_window=4.0,
    two_sidecars=5_000,
)


class Bench:
    def __init__(
        self, workdir: Path, cluster: Cluster, receiver: Receiver, reps: int, sizes: Sizes
    ) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.receiver = receiver
        self.reps = reps
        self.sizes = sizes
        self.details: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self._sidecars = 0
        # The source tree `outbox run` runs from (bench.ab switches it). `python -m` puts
        # its working directory first on sys.path, so the tree is its cwd.
        self.sidecar_tree = ROOT

    # -- setup

    def build_template(self) -> None:
        """bench_tpl: outbox schema, payload pool, webhooks, pgbench tables, pgqueuer."""
        with self.cluster.admin() as conn:
            conn.execute('DROP DATABASE IF EXISTS "bench_tpl" WITH (FORCE)')
            conn.execute('CREATE DATABASE "bench_tpl"')
        url = self.cluster.url("bench_tpl")
        run([PY, "-m", "outbox", "migrate"], env=self.sidecar_env(url), timeout=120)
        run([PY, "-m", "bench.pgq_worker", "install", "--dsn", url], timeout=120)
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

    def start_sidecar(self, url: str, *, cpus: set[int] | None = None) -> Sidecar:
        self._sidecars += 1
        log_path = self.workdir / f"sidecar{self._sidecars}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop_sidecar()
        proc = PROCS.start(
            [PY, "-m", "outbox", "run"],
            cpus=cpus,
            cwd=self.sidecar_tree,
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
    ) -> dict[str, Any]:
        """Start `outbox run` on a loaded backlog and measure at the receiver."""
        self.receiver.reset()
        db_cpu = self.cluster.cpu_seconds()
        started = [self.start_sidecar(url, cpus=cpus) for _ in range(sidecars)]
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

    # -- 1. throughput

    def http_limit(self, count: int) -> dict[str, Any]:
        self.receiver.reset()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = run(
            [
                PY,
                "-m",
                "bench.http_client",
                "--base",
                self.receiver.base,
                "--ca",
                self.receiver.ca,
                "--count",
                str(count),
                "--concurrency",
                str(CONCURRENCY),
                "--webhooks",
                str(WEBHOOKS),
            ]
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        ids, times = self.receiver.records()
        if len(ids) < count:
            raise RuntimeError(f"bare client: only {len(ids)} of {count} arrived")
        return {"rate": rate_of(times), "client_seconds": float(out.strip()), "cpu_s": cpu}

    def pgqueuer_once(self, count: int, batch: int, name: str) -> dict[str, Any]:
        with database(self.cluster, name) as url:
            run([PY, "-m", "bench.pgq_worker", "load", "--dsn", url, "--count", str(count)])
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE pgqueuer")
            self.cluster.checkpoint()
            self.receiver.reset()
            db_cpu = self.cluster.cpu_seconds()
            log_path = self.workdir / f"{name}.log"
            with open(log_path, "wb") as log_file:
                proc = PROCS.start(
                    [
                        PY,
                        "-m",
                        "bench.pgq_worker",
                        "work",
                        "--dsn",
                        url,
                        "--base",
                        self.receiver.base,
                        "--ca",
                        self.receiver.ca,
                        "--batch",
                        str(batch),
                        "--concurrency",
                        str(CONCURRENCY),
                    ],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
                got = self.receiver.wait_for(count, 120 + count / 200, alive=[proc], quiet_for=15)
                alive = proc.poll() is None
                rss = peak_rss_mb(proc.pid) if alive else float("nan")
                cpu = cpu_seconds(proc.pid) if alive else float("nan")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)  # drain mode: it exits once the queue is empty
                code = PROCS.stop(proc)
            _, times = self.receiver.records()
            if got < count or code != 0:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"pgqueuer: {got} of {count} arrived, exit {code}: {tail}")
            db_cpu = self.cluster.cpu_seconds() - db_cpu
            return {"rate": rate_of(times), "rss_mb": rss, "cpu_s": cpu, "db_cpu_s": db_cpu}

    def throughput(self) -> None:
        n = self.sizes.throughput
        say(f"1. throughput: {n} deliveries, 2 KB, signed, {WEBHOOKS} webhooks; no pinning")
        sweep: dict[int, float] = {}
        for batch in (8, 16, 32):
            sweep[batch] = self.pgqueuer_once(n, batch, f"pgq_sweep_{batch}")["rate"]
            say(f"   pgqueuer batch {batch}: {sweep[batch]:,.0f}/s (batch-size sweep)")
        best = max(sweep, key=lambda b: sweep[b])
        outbox: list[float] = []
        limit: list[float] = []
        pgq: list[float] = []
        rss: list[float] = []
        cpu: list[float] = []
        db_cpu: list[float] = []
        pgq_cpu: list[float] = []
        pgq_db_cpu: list[float] = []
        client_cpu: list[float] = []
        checks = []
        for rep in range(self.reps):
            for case in rotate(["outbox", "http", "pgqueuer"], rep):
                if case == "outbox":
                    with database(self.cluster, f"tp_outbox_{rep}") as url:
                        pending = self.load_outbox(url, n)
                        assert pending == n, pending
                        r = self.drain(url, n)
                        checks.append(self.check_outbox(url))
                    outbox.append(r["rate"])
                    rss.extend(r["rss_mb"])
                    cpu.append(r["cpu_s"][0] / n * 1e6)
                    db_cpu.append(r["db_cpu_s"] / n * 1e6)
                    say(f"   rep {rep + 1}: outbox run   {r['rate']:,.0f}/s")
                elif case == "http":
                    r = self.http_limit(n)
                    limit.append(r["rate"])
                    client_cpu.append(r["cpu_s"] / n * 1e6)
                    say(f"   rep {rep + 1}: HTTP limit   {limit[-1]:,.0f}/s")
                else:
                    r = self.pgqueuer_once(n, best, f"tp_pgq_{rep}")
                    pgq.append(r["rate"])
                    pgq_cpu.append(r["cpu_s"] / n * 1e6)
                    pgq_db_cpu.append(r["db_cpu_s"] / n * 1e6)
                    say(f"   rep {rep + 1}: pgqueuer b{best} {pgq[-1]:,.0f}/s")
        self.details["throughput"] = {
            "deliveries": n,
            "outbox_per_s": stats(outbox),
            "http_limit_per_s": stats(limit),
            "pgqueuer_per_s": stats(pgq),
            "pgqueuer_batch": best,
            "pgqueuer_batch_sweep": {str(b): r for b, r in sweep.items()},
            "ratio_vs_http_limit": stats([o / h for o, h in zip(outbox, limit, strict=True)]),
            "ratio_vs_pgqueuer": stats([o / p for o, p in zip(outbox, pgq, strict=True)]),
            "sidecar_rss_mb": stats(rss),
            "sidecar_cpu_us_per_delivery": stats(cpu),
            "postgres_cpu_us_per_delivery": stats(db_cpu),
            "http_client_cpu_us_per_request": stats(client_cpu),
            "pgqueuer_worker_cpu_us_per_delivery": stats(pgq_cpu),
            "pgqueuer_postgres_cpu_us_per_delivery": stats(pgq_db_cpu),
            "outbox_checks": checks,
        }

    # -- 2. producer overhead

    def pgbench_case(self, case: str, rep: int) -> dict[str, Any]:
        script = self.workdir / f"pgbench_{case}.sql"
        script.write_text(PGBENCH_SCRIPT.format(table=PGBENCH_TABLES[case]))
        name = f"po_{case}_{rep}"
        result: dict[str, Any] = {}
        with database(self.cluster, name) as url:
            sidecar = listener = None
            if case in ("b", "c"):
                # (c): the naive design's consumer. (b): counts the wake-ups producers send
                # (the sidecar listens on the same channel on its own connection).
                channel = "outbox_wake" if case == "b" else "bench_naive"
                listener = PROCS.start(
                    [PY, "-m", "bench.naive_listener", "--dsn", url, "--channel", channel],
                    cpus=APP_CPUS,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert listener.stdout is not None
                if listener.stdout.readline().strip() != "ready":
                    raise RuntimeError("listener did not start")
            if case == "b":
                self.receiver.reset()
                sidecar = self.start_sidecar(url, cpus=APP_CPUS)
            self.cluster.checkpoint()
            time.sleep(0.5)
            try:
                out = self.pgbench(name, script, 8, self.sizes.pgbench_seconds)
                match = re.search(r"tps = ([0-9.]+) \(without initial", out)
                if not match:
                    raise RuntimeError(f"pgbench printed no tps: {out[-500:]}")
                result["tps"] = float(match.group(1))
                failed = re.search(r"number of failed transactions: (\d+)", out)
                result["failed"] = int(failed.group(1)) if failed else 0
                if sidecar is not None:
                    result["delivered_during_run"] = self.receiver.count()
                    result["rss_mb"] = peak_rss_mb(sidecar.pid)
            finally:
                if sidecar is not None:
                    self.stop_sidecar(sidecar)
                if listener is not None:
                    PROCS.stop(listener)
                    assert listener.stdout is not None
                    result["notifications_received"] = int(listener.stdout.read().strip() or 0)
            if case == "b":
                result["outbox"] = self.check_outbox(url)
        return result

    def overhead(self) -> None:
        seconds = self.sizes.pgbench_seconds
        say(
            f"2. producer overhead: pgbench 8 clients, 2 threads, {seconds} s, interleaved;"
            f" Postgres+pgbench on CPU {sorted(DB_CPUS)}, sidecar+receiver on {sorted(APP_CPUS)}"
        )
        tps: dict[str, list[float]] = {case: [] for case in PGBENCH_CASES}
        runs: list[dict[str, Any]] = []
        self.cluster.pin(DB_CPUS)
        self.receiver.pin(APP_CPUS)
        try:
            for rep in range(self.reps):
                for case in rotate(list(PGBENCH_CASES), rep):
                    r = self.pgbench_case(case, rep)
                    tps[case].append(r["tps"])
                    runs.append({"case": case, "rep": rep + 1, **r})
                    say(f"   rep {rep + 1}: ({case}) {r['tps']:,.0f} tps  {PGBENCH_CASES[case]}")
        finally:
            self.cluster.pin(ALL_CPUS)
            self.receiver.pin(ALL_CPUS)
        self.details["producer_overhead"] = {
            "seconds": seconds,
            "pinning": {
                "postgres_and_pgbench": sorted(DB_CPUS),
                "sidecar_and_receiver": sorted(APP_CPUS),
            },
            "cases": PGBENCH_CASES,
            "tps_a_plain": stats(tps["a"]),
            "tps_b_outbox": stats(tps["b"]),
            "tps_c_naive_notify": stats(tps["c"]),
            "tps_d_outbox_no_sidecar": stats(tps["d"]),
            "producer_overhead_ratio": stats(
                [b / a for b, a in zip(tps["b"], tps["a"], strict=True)]
            ),
            "naive_notify_ratio": stats([c / a for c, a in zip(tps["c"], tps["a"], strict=True)]),
            "no_sidecar_ratio": stats([d / a for d, a in zip(tps["d"], tps["a"], strict=True)]),
            "runs": runs,
        }

    # -- 3. latency

    def http_floor(self) -> dict[str, Any]:
        """One request at a time on a warm connection: send -> receipt, the HTTP part."""
        self.receiver.reset()
        path = str(self.workdir / "floor")
        run(
            [
                PY,
                "-m",
                "bench.http_client",
                "--base",
                self.receiver.base,
                "--ca",
                self.receiver.ca,
                "--count",
                "200",
                "--sequential",
                path,
            ],
            cpus=APP_CPUS,
        )
        ids, times = self.receiver.records()
        starts: array[float] = array("d")
        with open(path + ".t", "rb") as f:
            starts.frombytes(f.read())
        lat = sorted((t - starts[i - 1]) * 1000 for i, t in zip(ids, times, strict=True) if i >= 1)
        return {p: percentile(lat, q) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))} | {
            "max": lat[-1]
        }

    def pgbench(self, dbname: str, script: Path, clients: int, seconds: float, *extra: str) -> str:
        """pgbench on the producer side (DB_CPUS when pinned); its output."""
        assert self.cluster.server is not None
        server = self.cluster.server
        cmd = [find_pgbench(), "-n", "-M", "prepared", "-c", str(clients), "-j", "2"]
        cmd += ["-T", str(int(seconds)), "-f", str(script), *extra]
        cmd += ["-D", f"body={DOMAIN_BODY}", "-D", f"data={EVENT_DATA}"]
        cmd += ["-h", server.host, "-p", str(server.port), "-U", server.user, dbname]
        return run(cmd, cpus=DB_CPUS, timeout=seconds + 120)

    def latency_once(self, rate: int, rep: int) -> dict[str, Any]:
        """pgbench -R commits single-INSERT transactions; its per-transaction log has the
        commit times (taken when COMMIT returned), the receiver has the arrival times."""
        name = f"lat_{rate}_{rep}"
        # Enough clients that commit latency never throttles the schedule.
        clients = max(8, rate // 60)
        script = self.workdir / "latency.sql"
        script.write_text(LATENCY_SCRIPT)
        prefix = self.workdir / name
        with database(self.cluster, name) as url:
            self.cluster.checkpoint()
            self.receiver.reset()
            sidecar = self.start_sidecar(url, cpus=APP_CPUS)
            try:
                time.sleep(1.0)  # idle, so the first events find it asleep on the doorbell
                out = self.pgbench(
                    name,
                    script,
                    clients,
                    self.sizes.latency_seconds,
                    "-R",
                    str(rate),
                    "-l",
                    f"--log-prefix={prefix}",
                )
                commits = _pgbench_commit_times(prefix)
                sent = sum(len(v) for v in commits.values())
                got = self.receiver.wait_for(sent, 30, quiet_for=10)
                rss = peak_rss_mb(sidecar.pid)
            finally:
                self.stop_sidecar(sidecar)
            with psycopg.connect(url, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT d.id, e.id, e.account_id FROM outbox.deliveries d"
                    " JOIN outbox.events e ON e.id = d.event_id"
                ).fetchall()
        # A client's k-th transaction inserted its k-th event (ids rise within a client).
        events_of: dict[int, list[int]] = {}
        for _, event_id, account in rows:
            events_of.setdefault(int(account.removeprefix("acct_")), []).append(event_id)
        committed: dict[int, float] = {}
        for client, events in events_of.items():
            times = commits.get(client, [])
            if len(times) != len(events):
                raise RuntimeError(f"client {client}: {len(times)} commits, {len(events)} events")
            committed.update(zip(sorted(events), times, strict=True))
        event_of = {d: e for d, e, _ in rows}
        ids, arrivals = self.receiver.records()
        seen: set[int] = set()
        lat = []
        # Diagnostic: the same, for events committed after the first second, when
        # pgbench's clients have connected and made their first INSERT (each new
        # connection's first outbox INSERT loads plpgsql and the catalogs, ~3 ms of the
        # one database core).
        start = min(committed.values())
        settled = []
        for delivery, t in zip(ids, arrivals, strict=True):
            if delivery not in seen:
                seen.add(delivery)
                at = committed[event_of[delivery]]
                lat.append((t - at) * 1000)
                if at >= start + 1.0:
                    settled.append(lat[-1])
        lat.sort()
        settled.sort()
        lag = re.search(r"schedule lag: avg ([0-9.]+) \(max ([0-9.]+)\)", out)
        return {
            "rate": rate,
            "clients": clients,
            "sent": sent,
            "achieved_rate": sent / self.sizes.latency_seconds,
            "schedule_lag_ms": [float(lag.group(1)), float(lag.group(2))] if lag else None,
            "received": got,
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "max": lat[-1],
            "p99_after_first_second": percentile(settled, 99),
            "rss_mb": rss,
        }

    def latency(self) -> None:
        say(
            f"3. latency: commit -> receipt, {self.sizes.latency_seconds:g} s per rate;"
            f" Postgres+producers on CPU {sorted(DB_CPUS)}, sidecar+receiver on {sorted(APP_CPUS)}"
        )
        self.cluster.pin(DB_CPUS)
        self.receiver.pin(APP_CPUS)
        try:
            floor = self.http_floor()
            say(
                f"   HTTP floor (one request at a time): p50 {floor['p50']:.2f} ms,"
                f" p99 {floor['p99']:.2f} ms"
            )
            by_rate: dict[str, Any] = {"http_floor_ms": floor}
            for rate in self.sizes.latency_rates:
                runs = []
                for rep in range(self.reps):
                    r = self.latency_once(rate, rep)
                    runs.append(r)
                    say(
                        f"   {rate}/s rep {rep + 1}: p50 {r['p50']:.2f} p95 {r['p95']:.2f}"
                        f" p99 {r['p99']:.2f} max {r['max']:.2f} ms"
                        f" ({r['received']}/{r['sent']}, {r['achieved_rate']:.0f}/s sent;"
                        f" p99 after the first second {r['p99_after_first_second']:.2f} ms)"
                    )
                keys = ("p50", "p95", "p99", "max", "p99_after_first_second")
                by_rate[str(rate)] = {key: stats([r[key] for r in runs]) for key in keys} | {
                    "runs": runs
                }
        finally:
            self.cluster.pin(ALL_CPUS)
            self.receiver.pin(ALL_CPUS)
        self.details["latency"] = by_rate

    # -- 4. backlog scaling

    def backlog(self) -> None:
        small_n, large_n = self.sizes.backlog_small, self.sizes.backlog_large
        say(
            f"4. backlog scaling: drain rate at {large_n:,} pending vs {small_n:,};"
            f" {FAN_ACCOUNTS} accounts x {FAN_OUT} webhooks, each event fans out to {FAN_OUT}"
        )
        small: list[float] = []
        small_rss: list[float] = []
        for rep in range(self.reps):
            with database(self.cluster, f"bl_small_{rep}") as url:
                pending = self.load_outbox(url, small_n // FAN_OUT, fan=True)
                r = self.drain(url, pending)
            small.append(r["rate"])
            small_rss.extend(r["rss_mb"])
            say(
                f"   {small_n:,} rep {rep + 1}: {r['rate']:,.0f}/s,"
                f" peak RSS {r['rss_mb'][0]:.1f} MB"
            )
        with database(self.cluster, "bl_large") as url:
            start = time.monotonic()
            pending = self.load_outbox(url, large_n // FAN_OUT, fan=True, chunk=10_000)
            load_s = time.monotonic() - start
            say(f"   {pending:,} pending deliveries built in {load_s:.0f} s")
            r = self.drain(url, pending, window=self.sizes.backlog_window)
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_total_relation_size('outbox.deliveries'),"
                    " pg_total_relation_size('outbox.events')"
                ).fetchone()
        large = r["rate"]
        say(
            f"   {large_n:,} (first {self.sizes.backlog_window:g} s): {large:,.0f}/s,"
            f" peak RSS {r['rss_mb'][0]:.1f} MB"
        )
        self.details["backlog"] = {
            "small_pending": small_n,
            "large_pending": pending,
            "small_per_s": stats(small),
            "large_per_s": stats([large]),
            "large_window_s": self.sizes.backlog_window,
            "large_build_s": load_s,
            "large_sizes_bytes": {"deliveries": row[0], "events": row[1]} if row else None,
            "drain_ratio": large / statistics.median(small),
            "rss_small_mb": stats(small_rss),
            "rss_large_mb": stats(r["rss_mb"]),
            "repetitions_large": 1,
        }

    # -- 5. several sidecars

    def two_sidecars(self) -> None:
        n = self.sizes.two_sidecars
        say(f"5. two sidecars on one backlog of {n:,}")
        rates: list[float] = []
        duplicates = 0
        runs = []
        for rep in range(self.reps):
            with database(self.cluster, f"two_{rep}") as url:
                self.load_outbox(url, n)
                r = self.drain(url, n, sidecars=2)
                check = self.check_outbox(url)
            dup = r["received"] - r["unique"]
            duplicates += dup
            rates.append(r["rate"])
            runs.append(
                {
                    "rate": r["rate"],
                    "received": r["received"],
                    "unique_ids": r["unique"],
                    "duplicates": dup,
                    "attempts_per_sidecar": r["attempts_logged"],
                    "rss_mb": r["rss_mb"],
                    **check,
                }
            )
            say(
                f"   rep {rep + 1}: {r['rate']:,.0f}/s, {r['received']} received, {dup} duplicates,"
                f" split {r['attempts_logged']}, {check['attempted_twice']} attempted twice"
            )
        self.details["two_sidecars"] = {
            "deliveries": n,
            "per_s": stats(rates),
            "duplicates_total": duplicates,
            "runs": runs,
        }

    # -- profile

    def profile(self, stamp: str) -> None:
        pyspy = find_pyspy()
        if pyspy is None:
            self.details["profile"] = {"skipped": "py-spy is not installed"}
            return
        n = self.sizes.throughput
        say(f"profile: py-spy on `outbox run` draining {n:,} (not counted in the figures)")
        raw = RESULTS_DIR / f"profile-{stamp}.raw.txt"
        svg = RESULTS_DIR / f"profile-{stamp}.svg"
        with database(self.cluster, "profile") as url:
            self.receiver.reset()
            sidecar = self.start_sidecar(url)
            recorders = [
                PROCS.start(
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(sidecar.pid),
                        "--rate",
                        "250",
                        "--nonblocking",
                        "--nolineno",
                        "--format",
                        fmt,
                        "-o",
                        str(out),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for fmt, out in (("raw", raw), ("flamegraph", svg))
            ]
            try:
                time.sleep(1.0)
                self.load_outbox(url, n, settle=False)
                self.receiver.wait_for(n, 120, alive=[sidecar.proc], quiet_for=15)
            finally:
                for rec in recorders:
                    PROCS.stop(rec, signal.SIGINT, timeout=30)
                self.stop_sidecar(sidecar)
            _, times = self.receiver.records()
        top_self, top_total, samples = summarize_profile(raw)
        self.details["profile"] = {
            "rate_under_profiler": rate_of(times),
            "samples": samples,
            "flamegraph": str(svg.relative_to(ROOT)),
            "collapsed": str(raw.relative_to(ROOT)),
            "top_self": top_self,
            "top_total": top_total,
        }
        say(f"   {samples} samples; top self time:")
        for name, share in top_self[:8]:
            say(f"     {share:5.1f}%  {name}")


DOMAIN_BODY = (payloads.data_json(1) * 2)[:2048]
EVENT_DATA = payloads.data_json(42)


def summarize_profile(raw: Path, top: int = 25) -> tuple[list[Any], list[Any], int]:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    if not raw.exists():
        return [], [], 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count

    def share(counter: Counter[str]) -> list[Any]:
        return [[name, round(100 * c / samples, 2)] for name, c in counter.most_common(top)]

    return share(self_counts), share(total_counts), samples


# --- the report ------------------------------------------------------------------------


def _median(s: dict[str, Any] | None) -> float | None:
    return None if not s else s.get("median")


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarize(details: dict[str, Any]) -> dict[str, float | int | None]:
    rss = [
        _median(_get(details, "backlog", "rss_small_mb")),
        _median(_get(details, "backlog", "rss_large_mb")),
    ]
    rss_known = [r for r in rss if r is not None]
    summary: dict[str, float | int | None] = {
        "throughput_per_s": _median(_get(details, "throughput", "outbox_per_s")),
        "http_limit_per_s": _median(_get(details, "throughput", "http_limit_per_s")),
        "pgqueuer_per_s": _median(_get(details, "throughput", "pgqueuer_per_s")),
        "ratio_vs_http_limit": _median(_get(details, "throughput", "ratio_vs_http_limit")),
        "ratio_vs_pgqueuer": _median(_get(details, "throughput", "ratio_vs_pgqueuer")),
        "producer_overhead_ratio": _median(
            _get(details, "producer_overhead", "producer_overhead_ratio")
        ),
        "naive_notify_ratio": _median(_get(details, "producer_overhead", "naive_notify_ratio")),
        "latency_p50_ms": _median(_get(details, "latency", "200", "p50")),
        "latency_p99_ms": _median(_get(details, "latency", "200", "p99")),
        "latency_2k_p99_ms": _median(_get(details, "latency", "2000", "p99")),
        "drain_ratio_1m_vs_10k": _get(details, "backlog", "drain_ratio"),
        "rss_peak_mb": max(rss_known) if rss_known else None,
        "two_sidecars_per_s": _median(_get(details, "two_sidecars", "per_s")),
        "duplicates": _get(details, "two_sidecars", "duplicates_total"),
    }
    assert tuple(summary) == SUMMARY_KEYS
    return summary


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _spread(s: dict[str, Any] | None, digits: int = 0, unit: str = "") -> str:
    """`median [min-max] (n)` of a repeated measurement."""
    if not s or s.get("median") is None:
        return "n/a"
    text = f"{_num(s['median'], digits)}{unit}"
    if s["n"] > 1:
        text += f" [{_num(s['min'], digits)}-{_num(s['max'], digits)}]"
    return text + f" (n={s['n']})"


def _met(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value >= target if at_least else value <= target) else "**no**"


def table(details: dict[str, Any], summary: dict[str, Any]) -> str:
    """The Markdown table: every figure next to its same-run reference and the ratio."""
    rows: list[tuple[str, ...]] = []
    tp = details.get("throughput")
    if tp:
        rows.append(
            (
                "1 throughput, deliveries/s",
                _spread(tp["outbox_per_s"]),
                f"HTTP limit (bare aiohttp) {_spread(tp['http_limit_per_s'])}",
                _spread(tp["ratio_vs_http_limit"], 2),
                "≥ 0.75",
                _met(summary["ratio_vs_http_limit"], 0.75, True),
            )
        )
        rows.append(
            (
                "1 throughput vs pgqueuer",
                _spread(tp["outbox_per_s"]),
                f"pgqueuer asyncpg, batch {tp['pgqueuer_batch']}: {_spread(tp['pgqueuer_per_s'])}",
                _spread(tp["ratio_vs_pgqueuer"], 2),
                "≥ 2",
                _met(summary["ratio_vs_pgqueuer"], 2, True),
            )
        )
    po = details.get("producer_overhead")
    if po:
        rows.append(
            (
                "2 producer tx/s, outbox INSERT + sidecar (b)",
                _spread(po["tps_b_outbox"]),
                f"plain INSERT (a) {_spread(po['tps_a_plain'])}",
                _spread(po["producer_overhead_ratio"], 3),
                "≥ 0.85",
                _met(summary["producer_overhead_ratio"], 0.85, True),
            )
        )
        rows.append(
            (
                "2 producer tx/s, naive NOTIFY trigger (c)",
                _spread(po["tps_c_naive_notify"]),
                f"plain INSERT (a) {_spread(po['tps_a_plain'])}",
                _spread(po["naive_notify_ratio"], 3),
                "(what the doorbell avoids)",
                "",
            )
        )
        rows.append(
            (
                "2 producer tx/s, outbox INSERT, no sidecar (d)",
                _spread(po["tps_d_outbox_no_sidecar"]),
                f"plain INSERT (a) {_spread(po['tps_a_plain'])}",
                _spread(po["no_sidecar_ratio"], 3),
                "(diagnostic: trigger + checks)",
                "",
            )
        )
    lat = details.get("latency")
    if lat:
        floor = lat["http_floor_ms"]
        targets = {
            ("200", "p50"): 5.0,
            ("200", "p99"): 20.0,
            ("2000", "p99"): 100.0,
        }
        for rate in ("200", "2000"):
            if rate not in lat:
                continue
            for p in ("p50", "p95", "p99", "max"):
                target = targets.get((rate, p))
                med = lat[rate][p]["median"]
                ref = floor.get(p)
                rows.append(
                    (
                        f"3 commit→receipt {p} at {rate}/s, ms",
                        _spread(lat[rate][p], 2),
                        f"HTTP alone (one POST at a time) {_num(ref, 2)}",
                        f"{med / ref:.1f}x" if ref else "n/a",
                        f"≤ {target:g}" if target else "",
                        _met(med, target, False) if target else "",
                    )
                )
            settled = lat[rate].get("p99_after_first_second")
            if settled:
                rows.append(
                    (
                        f"3 the same p99 at {rate}/s, events committed after the first second, ms",
                        _spread(settled, 2),
                        f"HTTP alone {_num(floor.get('p99'), 2)}",
                        "",
                        "(diagnostic: start-up left out)",
                        "",
                    )
                )
    bl = details.get("backlog")
    if bl:
        rows.append(
            (
                f"4 drain rate at {bl['large_pending']:,} pending, /s",
                _spread(bl["large_per_s"]),
                f"at {bl['small_pending']:,} pending {_spread(bl['small_per_s'])}",
                _num(bl["drain_ratio"], 2),
                "≥ 0.9",
                _met(bl["drain_ratio"], 0.9, True),
            )
        )
        for label, key in (("10k", "rss_small_mb"), ("1M", "rss_large_mb")):
            rows.append(
                (
                    f"4 sidecar peak RSS, {label} backlog, MB",
                    _spread(bl[key], 1),
                    "",
                    "",
                    "≤ 100",
                    _met(_median(bl[key]), 100, False),
                )
            )
    two = details.get("two_sidecars")
    if two:
        single = _median(_get(details, "throughput", "outbox_per_s"))
        two_med = _median(two["per_s"])
        rows.append(
            (
                "5 two sidecars, deliveries/s",
                _spread(two["per_s"]),
                f"one sidecar {_num(single)}" if single else "",
                f"{two_med / single:.2f}" if single and two_med else "",
                "",
                "",
            )
        )
        received = sum(r["received"] for r in two["runs"])
        rows.append(
            (
                "5 duplicate deliveries",
                str(two["duplicates_total"]),
                f"of {received:,} received",
                "",
                "0",
                "yes" if two["duplicates_total"] == 0 else "**no**",
            )
        )
    header = (
        "Figure",
        "Measured: median [min-max] (n)",
        "Reference, same run",
        "Ratio",
        "Target",
        "Met",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def context_line(meta: dict[str, Any]) -> str:
    return (
        f"outbox {meta['outbox_version']}, PostgreSQL {meta['postgres']} (private cluster,"
        f" fsync={meta['fsync']}, shared_buffers={meta['shared_buffers']},"
        f" synchronous_commit={meta['synchronous_commit']}), {meta['cpus']} CPUs,"
        f" load average {meta['loadavg_start']} at start / {meta['loadavg_end']} at end,"
        f" {meta['reps']} repetitions, {meta['runtime_s']:.0f} s in all."
    )


def write_results(
    stamp: str,
    meta: dict[str, Any],
    summary: dict[str, Any],
    details: dict[str, Any],
    errors: dict[str, str],
    suffix: str,
) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = f"{stamp[:10]}{suffix}"
    path = RESULTS_DIR / f"{name}.json"
    if path.exists():
        path = RESULTS_DIR / f"{name}-{stamp[11:].replace(':', '')}.json"
    document = {"summary": summary, "meta": meta, "details": details, "errors": errors}
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, array):
        return None  # raw per-request arrays stay out of the file
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def append_markdown(
    stamp: str, meta: dict[str, Any], text: str, errors: dict[str, str], json_path: Path
) -> None:
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(
            "# Benchmark results\n\nAppended by `make bench`, newest last; bench/README.md"
            " says what each figure is and how it is measured.\n"
        )
    notes = ""
    if errors:
        notes = "\nSections that failed: " + ", ".join(sorted(errors)) + " (see the JSON).\n"
    with RESULTS_MD.open("a") as f:
        f.write(
            f"\n## {stamp}\n\n{context_line(meta)} Raw: `{json_path.relative_to(ROOT)}`.\n\n"
            f"{text}\n{notes}"
        )


def strip_arrays(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_arrays(v) for k, v in value.items() if not isinstance(v, array)}
    if isinstance(value, list):
        return [strip_arrays(v) for v in value]
    return value


# --- main ------------------------------------------------------------------------------


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


SECTIONS = ("throughput", "overhead", "latency", "backlog", "two_sidecars", "profile")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--quick", action="store_true", help="small sizes, for trying it out")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    sizes = QUICK if args.quick else Sizes()
    if len(CPUS) < 2:
        say("warning: one CPU only; the pinned sections cannot separate Postgres from the sidecar")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    loadavg_start = _loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    cluster = Cluster(workdir / "pgdata")
    receiver: Receiver | None = None
    bench: Bench | None = None
    try:
        say(f"work directory {workdir}; starting a private PostgreSQL cluster")
        cluster.start()
        receiver = Receiver(workdir)
        say(f"receiver (separate process) on {receiver.base}")
        bench = Bench(workdir, cluster, receiver, args.reps, sizes)
        bench.build_template()
        sections: dict[str, Callable[[], None]] = {
            "throughput": bench.throughput,
            "overhead": bench.overhead,
            "latency": bench.latency,
            "backlog": bench.backlog,
            "two_sidecars": bench.two_sidecars,
        }
        timings: dict[str, float] = {}
        loads: dict[str, str] = {}
        for name, section in sections.items():
            if (only and name not in only) or name == "profile":
                continue
            t0 = time.monotonic()
            try:
                section()
            except Exception as exc:  # record it, and go on with the other sections
                bench.errors[name] = traceback.format_exc()
                say(f"{name} FAILED: {exc}")
            timings[name] = round(time.monotonic() - t0, 1)
            loads[name] = _loadavg()
            say(f"   ({timings[name]:.0f} s; load average {loads[name]})")
        if (not args.no_profile and not only) or "profile" in only:
            t0 = time.monotonic()
            try:
                bench.profile(stamp.replace(":", ""))
            except Exception as exc:  # a diagnostic: its failure does not fail the run
                bench.details["profile"] = {"error": traceback.format_exc()}
                say(f"profile failed (not counted): {exc}")
            timings["profile"] = round(time.monotonic() - t0, 1)
        meta = {
            "date": stamp,
            "outbox_version": outbox_version,
            "postgres": cluster.setting("server_version"),
            "fsync": cluster.setting("fsync"),
            "shared_buffers": cluster.setting("shared_buffers"),
            "synchronous_commit": cluster.setting("synchronous_commit"),
            "pgqueuer_version": _version("pgqueuer"),
            "python": platform.python_version(),
            "cpus": len(CPUS),
            "loadavg_start": loadavg_start,
            "loadavg_end": _loadavg(),
            "reps": args.reps,
            "quick": args.quick,
            "sizes": sizes.__dict__,
            "section_seconds": timings,
            "loadavg_after_section": loads,
            "runtime_s": time.monotonic() - started,
            "sidecar": {
                "OUTBOX_CONCURRENCY": CONCURRENCY,
                "OUTBOX_LOG_FORMAT": "json, to a file",
                "OUTBOX_API_LISTEN": "off",
            },
        }
        details = strip_arrays(bench.details)
        summary = summarize(details)
        text = table(details, summary)
        suffix = ("-quick" if args.quick else "") + ("-partial" if only else "")
        json_path = write_results(stamp, meta, summary, details, bench.errors, suffix)
        if not args.quick and not only:
            append_markdown(stamp, meta, text, bench.errors, json_path)
        print()
        print(context_line(meta))
        print(text)
        print()
        print("summary:", json.dumps(summary))
        say(
            f"wrote {json_path.relative_to(ROOT)}"
            + ("" if args.quick or only else " and bench/RESULTS.md")
        )
        return 1 if bench.errors else 0
    finally:
        if receiver is not None:
            receiver.stop()
        PROCS.cleanup()
        try:
            cluster.stop()
        except Exception as exc:
            say(f"could not stop the private cluster: {exc}")
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
