"""Shared fixtures: a real Postgres (the machine's, or one we start), a migrated template
database cloned per test, a real HTTPS receiver, and real `outbox run` processes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import structlog
import trustme
from pytest_postgresql.janitor import DatabaseJanitor

from outbox import cli, db
from outbox import log as outbox_log
from tests.receiver import BlackHole, Receiver
from tools import localpg

ROOT = Path(__file__).parent.parent

# OUTBOX_TEST_PRIVATE_CLUSTER=1: the suite runs on a cluster of its own, made in a new
# directory when the run starts and stopped and deleted when it ends, so that it creates
# nothing on the server on 127.0.0.1:5432 and leaves nothing behind. The process that
# starts pytest makes it before any worker starts, and tells them where it is in
# PRIVATE_CLUSTER_DIR (workers inherit the environment).
PRIVATE_CLUSTER = "OUTBOX_TEST_PRIVATE_CLUSTER"
PRIVATE_CLUSTER_DIR = "OUTBOX_TEST_PRIVATE_CLUSTER_DIR"
_PRIVATE_CLUSTER_PREFIX = "outbox-test-pg-"
_private_base = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(PRIVATE_CLUSTER, "").lower() not in {"1", "true", "yes", "on"}:
        return
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its starter made it
        return
    _remove_abandoned_clusters()
    # Not pytest's tmp_path: its parent is 0700, and as root the cluster runs as
    # `postgres`, which must reach its data directory.
    base = Path(tempfile.mkdtemp(prefix=_PRIVATE_CLUSTER_PREFIX, dir="/tmp"))
    base.chmod(0o755)
    (base / "owner-pid").write_text(f"{os.getpid()}\n")
    try:
        localpg.private_server(base / "pgdata")
    except BaseException:
        _remove_cluster(base)
        raise
    config.stash[_private_base] = base
    os.environ[PRIVATE_CLUSTER_DIR] = str(base / "pgdata")
    # A run stopped with SIGTERM (a CI time limit, `kill`) cleans up as after Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    base = config.stash.get(_private_base, None)
    if base is not None:
        _remove_cluster(base)
        os.environ.pop(PRIVATE_CLUSTER_DIR, None)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _remove_cluster(base: Path) -> None:
    try:
        localpg.stop_private(base / "pgdata")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _remove_abandoned_clusters() -> None:
    """Clusters of runs that were killed before they could clean up (kill -9)."""
    for base in Path("/tmp").glob(f"{_PRIVATE_CLUSTER_PREFIX}*"):
        try:
            owner = int((base / "owner-pid").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            _remove_cluster(base)
        except (OSError, ValueError):
            continue


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, the rest in their order: with pytest-xdist they then run beside
    the others instead of alone at the end of the run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def pg_server() -> localpg.Server:
    """The Postgres the suite runs on: the run's own cluster with
    OUTBOX_TEST_PRIVATE_CLUSTER=1; else 127.0.0.1:5432 when it answers, else the private
    development cluster in .pgdata (the one `make run` uses, left running)."""
    private = os.environ.get(PRIVATE_CLUSTER_DIR)
    if private:
        return localpg.private_server(Path(private))
    return localpg.server()


def _janitor(server: localpg.Server, dbname: str, **kwargs: Any) -> DatabaseJanitor:
    return DatabaseJanitor(
        user=server.user, host=server.host, port=server.port, dbname=dbname, **kwargs
    )


@pytest.fixture(scope="session")
def template_db(pg_server: localpg.Server) -> Iterator[str]:
    """A database migrated once; every test gets a copy (CREATE DATABASE ... TEMPLATE)."""
    name = f"outbox_tpl_{os.getpid()}"
    janitor = _janitor(pg_server, name, as_template=True)
    janitor.drop()
    janitor.init()
    asyncio.run(db.migrate(pg_server.url(name)))
    yield name
    janitor.drop()


@contextmanager
def cloned_database(
    server: localpg.Server, template: str, prefix: str = "outbox_t"
) -> Iterator[str]:
    """A fresh copy of the migrated template (milliseconds), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    janitor = _janitor(server, name, template_dbname=template)
    janitor.init()
    try:
        yield server.url(name)
    finally:
        janitor.drop()


@pytest.fixture
def database_url(pg_server: localpg.Server, template_db: str) -> Iterator[str]:
    with cloned_database(pg_server, template_db) as url:
        yield url


@pytest.fixture
def empty_database_url(pg_server: localpg.Server) -> Iterator[str]:
    name = f"outbox_e_{uuid.uuid4().hex[:12]}"
    janitor = _janitor(pg_server, name)
    janitor.init()
    yield pg_server.url(name)
    janitor.drop()


class SQL:
    """Synchronous SQL for arranging and checking; autocommit, one connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)

    def __call__(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []

    def one(self, query: str, params: Any = None) -> Any:
        rows = self(query, params)
        assert len(rows) == 1 and len(rows[0]) == 1, rows
        return rows[0][0]

    def webhook(
        self,
        url: str,
        *,
        account: str = "acct_1",
        event: str = "lead.scored",
        secret: str | None = "whsec_test_secret_0123",
        name: str = "hook",
        enabled: bool = True,
    ) -> int:
        return int(
            self.one(
                "INSERT INTO outbox.webhooks (account_id, name, url, event, secret, enabled)"
                " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (account, name, url, event, secret, enabled),
            )
        )

    def emit(
        self,
        account: str = "acct_1",
        event: str = "lead.scored",
        data: dict[str, Any] | None = None,
    ) -> int:
        return int(
            self.one(
                "SELECT outbox.emit(%s, %s, %s::jsonb)",
                (account, event, json.dumps(data or {"lead": {"id": 42}})),
            )
        )


@pytest.fixture
def sql(database_url: str) -> Iterator[SQL]:
    s = SQL(database_url)
    yield s
    s.conn.close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def receiver(ca: trustme.CA) -> Iterator[Receiver]:
    r = Receiver(ca).start()
    yield r
    r.stop()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole().start()
    yield hole
    hole.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def doorbell_holders(sql: SQL) -> int:
    """How many sessions hold the doorbell's lock in ``sql``'s database.

    Advisory locks are cluster-wide in pg_locks: the count is of this database only, so
    a sidecar of another database (a developer's `make run`, another pytest-xdist
    worker) on the same server is not counted."""
    return int(
        sql.one(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE d.datname = current_database() AND l.locktype = 'advisory'"
            " AND l.classid = %s AND l.objid = 1 AND l.granted",
            (db.LOCK_KEY,),
        )
    )


# Sidecars in tests log in as this role, which has outbox_sidecar and nothing else, as
# a production sidecar may. Cluster-wide and owning nothing, it is created once and kept.
SIDECAR_LOGIN = "outbox_sidecar_test"


def login_url(url: str, user: str) -> str:
    """``url`` with its user replaced by ``user``."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}@{host}"))


def as_sidecar_role(url: str) -> str:
    """The same database, logged in as SIDECAR_LOGIN; unchanged where migrate could not
    create outbox_sidecar (a migrating user who may not create roles)."""
    with psycopg.connect(url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'outbox_sidecar'").fetchone():
            return url
        conn.execute(
            "DO $$ BEGIN"
            f" CREATE ROLE {SIDECAR_LOGIN} LOGIN IN ROLE outbox_sidecar;"
            " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;"
            " END $$"
        )
    return login_url(url, SIDECAR_LOGIN)


class Sidecar:
    """A real `outbox run` process (or `outbox serve`, or another ``command``), logged
    in as a role with outbox_sidecar's rights only."""

    def __init__(
        self, env: dict[str, str], log_path: Path, command: tuple[str, ...] = ("run",)
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.command = command
        self.api_port = int(env["OUTBOX_API_LISTEN"].rsplit(":", 1)[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sidecar:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        env = self.env | {
            name: as_sidecar_role(self.env[name])
            for name in ("OUTBOX_DATABASE_URL", "OUTBOX_LISTEN_DATABASE_URL")
            if self.env.get(name)
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", *self.command],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        started = "admin API listening" if self.command == ("serve",) else "dispatcher started"
        wait_until(
            lambda: started in self.log() or self.proc.poll() is not None,
            what=f"outbox {' '.join(self.command)} start",
        )
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait()


def run_outbox(
    env: dict[str, str], *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """One `outbox ARGS...` command as a process of its own, run to its end, output kept.

    A Python start costs seconds: use it where the process itself is under test (exit
    codes as a shell sees them, pipes, signals), else `call_outbox`."""
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


def sidecar_environment(database_url: str, ca_file: str, **settings: str) -> dict[str, str]:
    """This process's environment without any OUTBOX_ setting, plus test settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_CA_FILE=ca_file,
        OUTBOX_ALLOW_PRIVATE_TARGETS="true",
        OUTBOX_RETRY_DELAYS="0.2,0.4,0.8",
        OUTBOX_HTTP_TIMEOUT="2",
        OUTBOX_LOG_FORMAT="json",
    )
    env.update(settings)
    return env


@pytest.fixture
def sidecar_env(database_url: str, ca_file: str) -> dict[str, str]:
    return sidecar_environment(database_url, ca_file)


@pytest.fixture
def sidecars(sidecar_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    """Start `outbox run` processes: sidecars(OUTBOX_X="...") with extra settings, or
    sidecars("serve") for `outbox serve`, sidecars("run", "--deliver-only") and so on."""
    started: list[Sidecar] = []

    def start(*command: str, **overrides: str) -> Sidecar:
        env = dict(sidecar_env)
        env.setdefault("OUTBOX_API_LISTEN", f"127.0.0.1:{free_port()}")
        env.update(overrides)
        log_path = tmp_path / f"sidecar{len(started)}.log"
        sidecar = Sidecar(env, log_path, command or ("run",)).start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            sidecar.proc.kill()
            sidecar.wait()


def call_outbox(
    env: dict[str, str], *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """`outbox ARGS...` run in this process by `outbox.cli.main`, as `run_outbox` runs it
    in a new one: ``env`` is the whole environment, ``stdin`` its input, and the exit
    code, stdout and stderr come back the same way. Nothing it sets outlives the call:
    the environment, the standard streams, structlog's configuration and the root
    logger's handlers are put back."""
    saved_env = dict(os.environ)
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    saved_log = structlog.get_config()
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()

    def configure_uncached(fmt: str) -> None:
        # outbox caches each module's logger on first use, as it should in a process
        # of its own; here that would tie those loggers to this call's stderr.
        outbox_log.configure(fmt)
        structlog.configure(cache_logger_on_first_use=False)

    os.environ.clear()
    os.environ.update(env)
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    try:
        with mock.patch.object(cli, "configure", configure_uncached):
            # A thread of its own: main() runs asyncio.run(), which a thread that already
            # runs an event loop (Playwright's, in the browser tests) may not call.
            with ThreadPoolExecutor(1) as thread:
                code = thread.submit(_main, list(args)).result()
            writer = structlog.get_config()["logger_factory"]()
            if hasattr(writer, "flush"):
                writer.flush()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        os.environ.clear()
        os.environ.update(saved_env)
        structlog.reset_defaults()
        structlog.configure(**saved_log)
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
    return subprocess.CompletedProcess(
        ["outbox", *args], code, stdout=out.getvalue(), stderr=err.getvalue()
    )


def _main(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as exc:  # argparse's --version and --help
        return exc.code if isinstance(exc.code, int) else 1
