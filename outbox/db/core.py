"""Connections, the named queries of sql/queries.sql, migrations and the schema version."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import structlog

__all__ = [
    "LOCK_KEY",
    "SQL_DIR",
    "SchemaMismatch",
    "connect",
    "expected_version",
    "migrate",
    "migrations",
    "missing_database",
    "query",
    "schema_problem",
    "schema_version",
]

log = structlog.get_logger("outbox.db")

# Installed wheels carry sql/ inside the outbox package; a source checkout keeps it beside.
_PACKAGE = Path(__file__).parent.parent
_PACKAGED = _PACKAGE / "sql"
SQL_DIR = _PACKAGED if _PACKAGED.is_dir() else _PACKAGE.parent / "sql"

# The key of every advisory lock outbox takes, as outbox.lock_key() returns it; migrate
# cannot call that (the schema may not exist yet), so sql/queries.sql's migrate_lock
# names the number itself, and a test holds the three equal.
LOCK_KEY = 1869968482


@cache
def _queries() -> dict[str, str]:
    text = (SQL_DIR / "queries.sql").read_text()
    parts = re.split(r"^-- ([a-z_]+) --$", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> LiteralString:
    """The SQL of the named query; the files are ours, so it is as trusted as a literal.

    Only this package runs it; tests read it to look at a statement's plan."""
    return _queries()[name]


async def connect(url: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection that names itself in pg_stat_activity."""
    return await psycopg.AsyncConnection.connect(
        url, autocommit=True, application_name="outbox", **kwargs
    )


_MISSING = re.compile(r'database "(?P<name>.*)" does not exist')


def missing_database(exc: psycopg.OperationalError) -> str | None:
    """For a connection refused because its database does not exist: one line saying so
    and how to create it. None for any other failure."""
    found = _MISSING.search(str(exc))
    if found is None:
        return None
    pgconn = exc.pgconn
    name = pgconn.db.decode() if pgconn and pgconn.db else found["name"]
    options = []
    if pgconn is not None:
        if pgconn.host:
            options += ["-h", pgconn.host.decode()]
        if pgconn.port:
            options += ["-p", pgconn.port.decode()]
        if pgconn.user:
            options += ["-U", pgconn.user.decode()]
    createdb = shlex.join(["createdb", *options, name])
    identifier = '"' + name.replace('"', '""') + '"'
    return (
        f"database {identifier} does not exist: create it with `{createdb}`"
        f" (or CREATE DATABASE {identifier}; in psql), then run `outbox migrate`"
    )


def _warn(notice: psycopg.errors.Diagnostic) -> None:
    if notice.severity_nonlocalized == "WARNING":
        log.warning("migrate", message=notice.message_primary)


def migrations() -> list[tuple[int, str, Path]]:
    """(version, name, path) of every migration, in order."""
    found = []
    for path in sorted((SQL_DIR / "migrations").glob("*.sql")):
        version, _, name = path.stem.partition("_")
        found.append((int(version), name, path))
    return found


@cache
def expected_version() -> int:
    """The newest migration this version ships: the schema it runs against."""
    return migrations()[-1][0]


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """The newest migration applied to the database; None when it has no outbox schema."""
    try:
        cur = await conn.execute(query("schema_version"))
    except psycopg.errors.UndefinedTable:
        return None
    row = await cur.fetchone()
    return None if row is None else row[0]


class SchemaMismatch(Exception):
    """The database's outbox schema is not the one this version runs against."""


def schema_problem(found: int | None, expected: int) -> str | None:
    """What to do when the schema at version ``found`` is not ``expected``; else None."""
    if found is None:
        return "the database has no outbox schema: run `outbox migrate`"
    if found < expected:
        return (
            f"the outbox schema is at version {found} and this outbox needs {expected}:"
            " run `outbox migrate`"
        )
    if found > expected:
        return (
            f"the outbox schema is at version {found}, newer than this outbox knows"
            f" ({expected}): upgrade outbox"
        )
    return None


async def migrate(url: str) -> list[int]:
    """Bring the database's outbox schema to the newest version; return the versions
    applied.

    sql/schema.sql is the schema: a database with no outbox schema gets it whole, in one
    transaction, recorded as every version this outbox ships. Migrations only upgrade a
    database an older outbox migrated; a test holds the two paths to one catalogue.

    Safe to run twice and concurrently: runs take turns under an advisory lock, and the
    schema or each migration commits together with its rows in outbox.schema_migrations,
    checked for under the same lock.
    """
    # Nothing prepared: through a transaction pooler the next run of a statement may be
    # on another server connection, or on one where another client prepared it.
    async with await connect(url, prepare_threshold=None) as conn:
        # Each transaction must see what the run that held the lock before it committed:
        # under REPEATABLE READ (a server or database default) the snapshot is taken
        # before the lock is granted, and a waiting run would install the schema again.
        await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)
        # A migrating user who may not create roles is told so, and the rest goes on.
        conn.add_notice_handler(_warn)
        async with conn.transaction():
            await conn.execute(query("migrate_lock"))
            await conn.execute(query("migrations_table"))
        applied = await _install(conn) or await _upgrade(conn)
        # migrate creates this table itself, so its grant is made here: the sidecar's
        # role reads the schema version to know whether it may run. (Under the lock:
        # two GRANTs on one table at once fail with "tuple concurrently updated".)
        async with conn.transaction():
            await conn.execute(query("migrate_lock"))
            await conn.execute(query("schema_version_grant"))
    return applied


async def _upgrade(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """Apply the migrations the database lacks, each in a transaction of its own with
    its row; return their versions."""
    applied = []
    for version, name, path in migrations():
        async with conn.transaction():
            await conn.execute(query("migrate_lock"))
            cur = await conn.execute(query("migration_applied"), {"version": version})
            if await cur.fetchone() is not None:
                continue
            await conn.execute(path.read_text())
            await conn.execute(query("migration_record"), {"version": version, "name": name})
        log.info("migrated", version=version, name=name)
        applied.append(version)
    return applied


async def _install(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """On a database with no outbox schema, apply sql/schema.sql and record every
    version as applied; return those versions (none when the schema was there).

    Decided under the lock, so of concurrent runs on an empty database one installs and
    the others find it done.
    """
    shipped = migrations()
    async with conn.transaction():
        await conn.execute(query("migrate_lock"))
        cur = await conn.execute(query("schema_state"))
        row = await cur.fetchone()
        assert row is not None
        recorded, objects = row
        if recorded:
            return []
        if objects:
            raise SchemaMismatch(
                "schema outbox holds objects but outbox.schema_migrations records no"
                " version, so `outbox migrate` did not make it: rename or drop that"
                " schema, then migrate again"
            )
        await conn.execute((SQL_DIR / "schema.sql").read_text())
        for version, name, _ in shipped:
            await conn.execute(query("migration_record"), {"version": version, "name": name})
    for version, name, _ in shipped:
        log.info("migrated", version=version, name=name, source="schema.sql")
    return [version for version, _, _ in shipped]
