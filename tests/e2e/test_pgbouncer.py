"""Behind PgBouncer in transaction mode: a real PgBouncer in front of the test's Postgres.

Transaction pooling gives each transaction whichever server connection is free, so
nothing of a session lasts: settings, prepared statements, advisory locks, LISTEN. The
sidecar goes through it for everything but LISTEN and the doorbell, which take
OUTBOX_LISTEN_DATABASE_URL, a direct connection (or, without one, it polls).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from outbox import db
from tests.conftest import (
    SIDECAR_LOGIN,
    SQL,
    Sidecar,
    call_outbox,
    doorbell_holders,
    free_port,
    sidecar_environment,
    wait_until,
)
from tests.e2e.test_api import make_token
from tests.receiver import Receiver
from tools import localpg

Start = Callable[..., Sidecar]

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """A PgBouncer process in transaction mode, one server connection per database."""

    def __init__(self, server: localpg.Server) -> None:
        # Readable by the account PgBouncer switches to when started as root.
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-pgbouncer-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        (self.dir / "users.txt").write_text(f'"{server.user}" ""\n"{SIDECAR_LOGIN}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={server.host} port={server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir}/users.txt\n"
            # One server connection: every client of a database shares it, so whatever
            # one client leaves on the session, the next one sees.
            "pool_mode = transaction\ndefault_pool_size = 1\nmax_client_conn = 200\n"
        )
        for path in self.dir.iterdir():
            path.chmod(0o644)
        command = [PGBOUNCER, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: it switches to Debian's postgres account.
            command[1:1] = ["-u", pwd.getpwnam("postgres").pw_name]
        self._log = open(self.dir / "pgbouncer.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def url(self, direct_url: str) -> str:
        """The same database, through PgBouncer."""
        parts = urlsplit(direct_url)
        netloc = f"{parts.username}@127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def wait_ready(self, direct_url: str) -> None:
        def answers() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                with psycopg.connect(self.url(direct_url), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                return False

        wait_until(answers, what="PgBouncer to answer")

    def log(self) -> str:
        return (self.dir / "pgbouncer.log").read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pgbouncer(pg_server: localpg.Server) -> Iterator[PgBouncer]:
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.skip(
            "PgBouncer is not installed and could not be: `make test` installs Debian's "
            "pgbouncer when run as root; else `sudo apt-get install pgbouncer`"
        )
    bouncer = PgBouncer(pg_server)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pooled_url(pgbouncer: PgBouncer, database_url: str) -> str:
    pgbouncer.wait_ready(database_url)
    return pgbouncer.url(database_url)


class TestBehindPgBouncer:
    def test_deliveries_flow_and_a_commit_wakes_the_idle_sidecar(
        self, sql: SQL, receiver: Receiver, sidecars: Start, pooled_url: str, database_url: str
    ) -> None:
        """Through PgBouncer with a direct listen URL, every event is delivered once, and
        an idle sidecar is woken by the commit itself (the poll is 30 s away)."""
        sql.webhook(receiver.url())
        sidecar = sidecars(
            OUTBOX_DATABASE_URL=pooled_url,
            OUTBOX_DATABASE_POOLER="pgbouncer",
            OUTBOX_LISTEN_DATABASE_URL=database_url,
            OUTBOX_POLL_INTERVAL="30",
        )
        for n in range(1, 6):
            # Idle, with the doorbell armed, before each commit.
            wait_until(lambda: doorbell_holders(sql) == 1, what="the doorbell to be armed")
            sql.emit(data={"n": n})
            receiver.wait_for(n, timeout=10)
        for n in range(200):
            sql.emit(data={"n": n})
        got = receiver.wait_for(205, timeout=60)
        assert len({r.headers["X-Webhook-Id"] for r in got}) == len(got) == 205
        wait_until(
            lambda: (
                sql.one("SELECT count(*) FROM outbox.deliveries WHERE status = 'succeeded'") == 205
            ),
            what="every result recorded",
        )
        assert sidecar.stop() == 0
        assert not [line for line in sidecar.log_lines() if line.get("level") == "error"]
        assert "prepared statement" not in sidecar.log()

    def test_without_a_direct_url_it_says_so_once_and_polls(
        self, sql: SQL, receiver: Receiver, sidecars: Start, pooled_url: str
    ) -> None:
        """Behind PgBouncer with no direct URL, the sidecar logs poll-only once and
        delivers on its polls."""
        sql.webhook(receiver.url())
        sidecar = sidecars(
            OUTBOX_DATABASE_URL=pooled_url,
            OUTBOX_DATABASE_POOLER="pgbouncer",
            OUTBOX_POLL_INTERVAL="0.2",
        )
        for n in range(20):
            sql.emit(data={"n": n})
        receiver.wait_for(20)
        assert sidecar.stop() == 0
        poll_only = [line for line in sidecar.log_lines() if "poll-only" in str(line.get("event"))]
        assert len(poll_only) == 1, sidecar.log()
        # Neither the listener nor the doorbell was started (nor failed).
        parts = {line.get("part") for line in sidecar.log_lines()}
        assert not parts & {"listen", "doorbell"}, sidecar.log()

    def test_no_session_setting_is_left_for_other_clients(
        self, sql: SQL, receiver: Receiver, sidecars: Start, pooled_url: str, database_url: str
    ) -> None:
        """The dispatcher's session settings would stay on PgBouncer's server connection
        for the next client (a producer committing without waiting for the disk):
        behind PgBouncer it sets none."""
        sql.webhook(receiver.url())
        sidecar = sidecars(
            OUTBOX_DATABASE_URL=pooled_url,
            OUTBOX_DATABASE_POOLER="pgbouncer",
            OUTBOX_LISTEN_DATABASE_URL=database_url,
        )
        sql.emit()
        receiver.wait_for(1)
        wait_until(
            lambda: sql.one("SELECT status FROM outbox.deliveries") == "succeeded",
            what="the result recorded",
        )
        with psycopg.connect(pooled_url, autocommit=True) as producer:
            for setting, default in (("synchronous_commit", "on"), ("plan_cache_mode", "auto")):
                row = producer.execute(f"SHOW {setting}").fetchone()
                assert row == (default,), setting
        assert sidecar.stop() == 0

    @pytest.mark.slow
    def test_sidecar_retention_and_prune_work_through_pgbouncer(
        self,
        sql: SQL,
        receiver: Receiver,
        sidecars: Start,
        pooled_url: str,
        database_url: str,
        ca_file: str,
    ) -> None:
        """The background pruner and `outbox prune` go through PgBouncer too."""
        sql.webhook(receiver.url())
        sidecar = sidecars(
            OUTBOX_DATABASE_URL=pooled_url,
            OUTBOX_DATABASE_POOLER="pgbouncer",
            OUTBOX_LISTEN_DATABASE_URL=database_url,
            OUTBOX_RETENTION="1s",
        )
        for _ in range(3):
            sql.emit()
        receiver.wait_for(3)
        wait_until(
            lambda: sql.one("SELECT count(*) FROM outbox.events") == 0,
            what="the sidecar to prune",
        )
        assert sidecar.stop() == 0
        sql.emit(account="acct_without_webhooks")
        sql("UPDATE outbox.events SET occurred_at = now() - interval '1 hour'")
        env = sidecar_environment(pooled_url, ca_file, OUTBOX_DATABASE_POOLER="pgbouncer")
        result = call_outbox(env, "prune", "--older-than", "1m")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "deleted 0 deliveries, 0 attempts, 1 events\n"

    def test_the_admin_api_works_through_pgbouncer(
        self, sql: SQL, sidecars: Start, pooled_url: str, database_url: str
    ) -> None:
        """The admin API's connection pool prepares nothing: many requests, several at
        once, on one server connection, all answered."""
        sql.webhook("https://example.com/hook")
        token = make_token(sql, "acct_1")
        sidecar = sidecars(
            OUTBOX_DATABASE_URL=pooled_url,
            OUTBOX_DATABASE_POOLER="pgbouncer",
            OUTBOX_LISTEN_DATABASE_URL=database_url,
        )

        def get(_: int) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", sidecar.api_port, timeout=30)
            auth = {"Authorization": f"Bearer {token}"}
            try:
                conn.request("GET", "/api/v1/webhooks", headers=auth)
                return conn.getresponse().status
            finally:
                conn.close()

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(get, range(40))) == [200] * 40
        assert sidecar.stop() == 0
        assert "prepared statement" not in sidecar.log()


class TestMigrateThroughPgBouncer:
    def test_concurrent_migrations_finish(
        self, pgbouncer: PgBouncer, empty_database_url: str
    ) -> None:
        """Migrations take turns without a session lock, which a transaction pooler would
        leave held on a server connection after the client is gone."""
        pgbouncer.wait_ready(empty_database_url)
        url = pgbouncer.url(empty_database_url)

        async def both() -> list[list[int]]:
            return await asyncio.wait_for(
                asyncio.gather(db.migrate(url), db.migrate(url)), timeout=60
            )

        applied = asyncio.run(both())
        assert sorted(applied, key=len)[0] == []
        assert asyncio.run(asyncio.wait_for(db.migrate(url), timeout=30)) == []
