"""The two services a run starts once and every section uses: a private PostgreSQL
cluster (`Cluster`, with `database()` for a fresh clone of the template per case) and
the HTTPS receiver (`Receiver`, bench/receiver.py in a process of its own, driven over
its stdin/stdout), which is the measuring instrument: every rate and latency is taken
from its arrival times.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.common import PROCS, PY, cpu_seconds, descendants, set_affinity
from tools import localpg

# --- the cluster -----------------------------------------------------------------------

# The template every case's database is cloned from (Bench.build_template).
TEMPLATE = "bench_tpl"


class Cluster:
    """A private PostgreSQL cluster (tools.localpg), fsync on, default settings."""

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

    def create(self, name: str, template: str = TEMPLATE) -> str:
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

    def wal_lsn(self) -> int:
        """The current WAL write position in bytes: the difference of two is the WAL
        written in between, by every database of the cluster."""
        with self.admin() as conn:
            row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()
        assert row is not None
        return int(row[0])

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
def database(cluster: Cluster, name: str, template: str = TEMPLATE) -> Iterator[str]:
    url = cluster.create(name, template)
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
