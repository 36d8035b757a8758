"""Find or start a local PostgreSQL for development and tests (not shipped: the wheel
and the image hold the outbox package alone).

`server()` prefers a server already answering on 127.0.0.1:5432 and otherwise runs
a private cluster in a data directory (default `<repo>/.pgdata`), started once
and reused by later calls.

Command line::

    python -m tools.localpg url [DBNAME]   # print a URL, creating the database
    python -m tools.localpg stop           # stop the private cluster
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import psycopg
from psycopg import errors, sql

__all__ = [
    "LocalPgError",
    "Server",
    "default_datadir",
    "ensure_database",
    "main",
    "private_server",
    "server",
    "stop_private",
]

# An explicit name: under `python -m` this module is `__main__`, and the CLI
# attaches its stderr handler to this logger.
log = logging.getLogger("tools.localpg")

HOST = "127.0.0.1"
SYSTEM_PORT = 5432
SUPERUSER = "postgres"
PORT_FILE = "outbox-port"
LOG_FILE = "server.log"

_TOOLS = ("initdb", "pg_ctl", "postgres")
_DEBIAN_LIB = Path("/usr/lib/postgresql")
_TRUTHY = {"1", "true", "yes", "on"}
_NO_BINARIES = (
    "no PostgreSQL binaries found: install postgresql (apt-get install postgresql) "
    "or set OUTBOX_DATABASE_URL"
)


class LocalPgError(RuntimeError):
    """A local PostgreSQL could not be found, started or stopped."""


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str

    def url(self, dbname: str) -> str:
        # IPv6 literals need brackets in a URL authority.
        host = f"[{self.host}]" if ":" in self.host else self.host
        user, db = quote(self.user, safe=""), quote(dbname, safe="")
        return f"postgresql://{user}@{host}:{self.port}/{db}"


@dataclass(frozen=True)
class _Account:
    """The unprivileged user that initdb/pg_ctl run as when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


@dataclass(frozen=True)
class _Binaries:
    initdb: str
    pg_ctl: str


def default_datadir() -> Path:
    override = os.environ.get("OUTBOX_LOCALPG_DIR")
    if override:
        return Path(override).expanduser().absolute()
    return Path(__file__).resolve().parent.parent / ".pgdata"


def server(*, force_private: bool = False) -> Server:
    """Return a PostgreSQL to use: the system one on 5432 if usable, else a private one."""
    private = force_private or os.environ.get("OUTBOX_LOCALPG_PRIVATE", "").lower() in _TRUTHY
    if not private:
        system = Server(HOST, SYSTEM_PORT, SUPERUSER)
        if _port_open(SYSTEM_PORT):
            try:
                _probe(system)
            except psycopg.Error as exc:
                log.info(
                    "%s:%d answers but refused us (%s); using a private cluster",
                    HOST,
                    SYSTEM_PORT,
                    _one_line(str(exc)),
                )
            else:
                return system
    return private_server(default_datadir())


def ensure_database(server: Server, dbname: str) -> str:
    """Create `dbname` unless it exists and return its URL."""
    with psycopg.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        dbname="postgres",
        connect_timeout=10,
        autocommit=True,
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if exists is None:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            except (errors.DuplicateDatabase, errors.UniqueViolation):
                # Another process (a parallel test worker) created it first; a
                # creator racing us past the existence check shows up as a
                # unique violation on pg_database rather than duplicate_database.
                pass
            else:
                log.info("created database %s", dbname)
    return server.url(dbname)


def stop_private(datadir: Path | None = None) -> None:
    """Stop the private cluster in `datadir` (default: `default_datadir()`) if it runs."""
    datadir = (datadir or default_datadir()).absolute()
    if not (datadir / "PG_VERSION").is_file():
        return
    binaries = _find_binaries()
    account = _account_for(datadir)
    with _locked(datadir):
        if not _is_running(binaries, datadir, account):
            return
        log.info("stopping the private PostgreSQL cluster in %s", _display(datadir))
        done = _run(
            [binaries.pg_ctl, "stop", "-w", "-t", "60", "-m", "fast", "-D", str(datadir)],
            datadir,
            account,
            timeout=90,
        )
        if done.returncode != 0:
            raise LocalPgError(
                f"pg_ctl stop failed in {datadir}: {_one_line(done.stdout + done.stderr)}"
            )


# --- the private cluster -------------------------------------------------------------


def private_server(datadir: Path) -> Server:
    """The private cluster in `datadir`: made there if missing, started if stopped."""
    binaries = _find_binaries()
    account = _account_for(datadir)
    datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(datadir):
        if account is not None:
            _hand_over(datadir, account)
        if not (datadir / "PG_VERSION").is_file():
            _initdb(binaries, datadir, account)

        running = _running_server(binaries, datadir, account)
        if running is not None:
            return running

        port = _remembered_port(datadir)
        if port is None or not _port_is_free(port):
            if port is not None:
                log.info("port %d is taken by something else; choosing another", port)
            port = _pick_free_port()
            _remember_port(datadir, port, account)
        log.info("starting a private PostgreSQL cluster in %s on port %d", _display(datadir), port)
        _start(binaries, datadir, account, port)
        return Server(HOST, port, SUPERUSER)


def _initdb(binaries: _Binaries, datadir: Path, account: _Account | None) -> None:
    who = f" as user {account.name}" if account else ""
    log.info("initializing a private PostgreSQL cluster in %s%s", _display(datadir), who)
    done = _run(
        [
            binaries.initdb,
            "-D",
            str(datadir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            # A throwaway dev cluster: skipping the final fsync of the new files
            # makes initdb several seconds faster and risks nothing we care about.
            "--no-sync",
        ],
        datadir,
        account,
        timeout=180,
    )
    if done.returncode != 0:
        raise LocalPgError(f"initdb failed in {datadir}:\n{(done.stdout + done.stderr).strip()}")


def _start(binaries: _Binaries, datadir: Path, account: _Account | None, port: int) -> None:
    # TCP on loopback only, and no Unix socket: the socket directory
    # (/var/run/postgresql) may be missing or owned by the system server.
    options = f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories='' -c fsync=on"
    done = _run(
        [
            binaries.pg_ctl,
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(datadir),
            "-l",
            str(datadir / LOG_FILE),
            "-o",
            options,
        ],
        datadir,
        account,
        timeout=120,
        # Its own session, so a Ctrl-C meant for `make run` does not reach the
        # postmaster and the cluster survives for the next run.
        new_session=True,
    )
    if done.returncode != 0:
        raise LocalPgError(
            f"PostgreSQL failed to start in {datadir}: {_one_line(done.stdout + done.stderr)}"
            f"{_log_tail(datadir)}"
        )


def _is_running(binaries: _Binaries, datadir: Path, account: _Account | None) -> bool:
    # pg_ctl also treats a postmaster.pid left by a crash (dead pid) as "not running".
    done = _run([binaries.pg_ctl, "status", "-D", str(datadir)], datadir, account, timeout=30)
    return done.returncode == 0


def _running_port(datadir: Path) -> int | None:
    # The live server's port is line 4 of postmaster.pid; trust it over our own
    # note in case someone started the cluster by hand with another -p.
    try:
        lines = (datadir / "postmaster.pid").read_text().splitlines()
        return int(lines[3])
    except (OSError, IndexError, ValueError):
        return None


def _remembered_port(datadir: Path) -> int | None:
    try:
        port = int((datadir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _remember_port(datadir: Path, port: int, account: _Account | None) -> None:
    path = datadir / PORT_FILE
    path.write_text(f"{port}\n")
    if account is not None:
        os.chown(path, account.uid, account.gid)


def _pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the postmaster, so a port still in TIME_WAIT from the
    # cluster's previous run counts as free; only a live listener blocks it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _port_open(port: int) -> bool:
    # A plain TCP connect first, so that an absent server costs a refused
    # connection instead of psycopg's connect timeout.
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _probe(srv: Server) -> None:
    with psycopg.connect(
        host=srv.host, port=srv.port, user=srv.user, dbname="postgres", connect_timeout=3
    ):
        pass


def _running_server(binaries: _Binaries, datadir: Path, account: _Account | None) -> Server | None:
    """The cluster in `datadir` if it runs and answers; None if it is not running."""
    # pg_ctl status is re-checked while waiting because a postmaster that just
    # died stays a zombie, and so "running", until init gets round to reaping
    # it (seconds in some containers); once it is gone we start a new one.
    deadline = time.monotonic() + 10
    while _is_running(binaries, datadir, account):
        port = _running_port(datadir) or _remembered_port(datadir)
        if port is not None:
            try:
                _probe(Server(HOST, port, SUPERUSER))
                return Server(HOST, port, SUPERUSER)
            except psycopg.Error:
                pass
        if time.monotonic() >= deadline:
            raise LocalPgError(
                f"the private PostgreSQL in {datadir} runs but does not answer on "
                f"{HOST}:{port}; stop it with `python -m tools.localpg stop` "
                f"(if no server is running, remove {datadir / 'postmaster.pid'})"
                f"{_log_tail(datadir)}"
            )
        time.sleep(0.2)
    return None


def _log_tail(datadir: Path, lines: int = 10) -> str:
    try:
        text = (datadir / LOG_FILE).read_text(errors="replace")
    except OSError:
        return ""
    tail = text.strip().splitlines()[-lines:]
    if not tail:
        return ""
    return f"\nlast lines of {datadir / LOG_FILE}:\n" + "\n".join(tail)


# --- binaries, users and permissions -------------------------------------------------


def _find_binaries() -> _Binaries:
    found = [shutil.which(tool) for tool in _TOOLS]
    if all(found):
        return _Binaries(initdb=str(found[0]), pg_ctl=str(found[1]))
    # Debian/Ubuntu packages keep the server binaries off PATH, one dir per major version.
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for bindir in _DEBIAN_LIB.glob("*/bin"):
        version = _version_key(bindir.parent.name)
        if version is not None and all(os.access(bindir / t, os.X_OK) for t in _TOOLS):
            candidates.append((version, bindir))
    if not candidates:
        raise LocalPgError(_NO_BINARIES)
    bindir = max(candidates)[1]
    return _Binaries(initdb=str(bindir / "initdb"), pg_ctl=str(bindir / "pg_ctl"))


def _version_key(name: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return None


def _account_for(datadir: Path) -> _Account | None:
    """The user to run initdb/pg_ctl as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    # A cluster already owned by some unprivileged user keeps that owner: its
    # postmaster runs as that user, and only that user may signal it to stop.
    try:
        owner = datadir.stat().st_uid
    except FileNotFoundError:
        owner = 0
    if owner != 0:
        try:
            return _account(pwd.getpwuid(owner))
        except KeyError:
            pass
    for name in (SUPERUSER, "nobody"):
        try:
            return _account(pwd.getpwnam(name))
        except KeyError:
            continue
    raise LocalPgError(
        "PostgreSQL refuses to run as root and neither a 'postgres' nor a 'nobody' user "
        "exists: create one, run as an unprivileged user, or set OUTBOX_DATABASE_URL"
    )


def _account(entry: pwd.struct_passwd) -> _Account:
    return _Account(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        home=entry.pw_dir,
    )


def _hand_over(datadir: Path, account: _Account) -> None:
    """Give `datadir` to `account` and let it reach the directory."""
    st = datadir.stat()
    if (st.st_uid, st.st_gid) != (account.uid, account.gid):
        os.chown(datadir, account.uid, account.gid)
        for root, dirs, files in os.walk(datadir):
            for name in dirs + files:
                os.chown(Path(root) / name, account.uid, account.gid, follow_symlinks=False)
    for parent in datadir.parents:
        pst = parent.stat()
        if not _can_traverse(pst, account):
            # Search permission only (no listing), the least that lets the
            # postmaster reach its data directory.
            os.chmod(parent, stat.S_IMODE(pst.st_mode) | stat.S_IXOTH)
            log.info("made %s traversable (o+x) for user %s", parent, account.name)


def _can_traverse(st: os.stat_result, account: _Account) -> bool:
    if st.st_uid == account.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in account.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


@contextmanager
def _locked(datadir: Path) -> Iterator[None]:
    # Parallel test workers and `make run` may race to initdb or start the same
    # cluster. The lock sits on the directory itself because initdb insists on
    # an empty directory, so no lock file can live inside it.
    fd = os.open(datadir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run(
    cmd: list[str],
    datadir: Path,
    account: _Account | None,
    *,
    timeout: float,
    new_session: bool = False,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if account is not None:
        env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
    try:
        return subprocess.run(
            cmd,
            # A cwd the other user can enter: pg_ctl and postgres warn or fail
            # when they cannot stat their working directory (e.g. /root).
            cwd=datadir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=new_session,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=list(account.groups) if account else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise LocalPgError(f"{Path(cmd[0]).name} timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise LocalPgError(f"could not run {cmd[0]}: {exc}") from exc


# --- helpers -------------------------------------------------------------------------


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


# --- command line --------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit 1, like every other failure of this command.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m tools.localpg",
        description="Find or start a local PostgreSQL for development and tests.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    url_cmd = commands.add_parser(
        "url", help="print a database URL, creating the database (and a cluster) if needed"
    )
    url_cmd.add_argument("dbname", nargs="?", default="outbox")
    commands.add_parser("stop", help="stop the private cluster")
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("localpg: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    try:
        if args.command == "url":
            given = os.environ.get("OUTBOX_DATABASE_URL") or os.environ.get("DATABASE_URL")
            if given:
                print(given)
                return 0
            print(ensure_database(server(), args.dbname))
        else:
            stop_private()
    except (LocalPgError, psycopg.Error, OSError) as exc:
        sys.stderr.write(f"{parser.prog}: error: {_one_line(str(exc)) or type(exc).__name__}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
