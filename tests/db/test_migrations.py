"""`outbox migrate`: sql/schema.sql on an empty database, migrations for older ones;
idempotent, safe concurrently, and both paths give one catalogue."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from outbox import db
from tests.conftest import ROOT, call_outbox
from tools import localpg

SCHEMA = ROOT / "sql" / "schema.sql"

# One line per object of schema `outbox` (schema_migrations excepted, since only
# `migrate` creates it), with its rights, down to a column's: enough to show any
# difference between two databases.
DESCRIBE = """
SELECT format('schema acl=%s', nspacl) FROM pg_namespace WHERE nspname = 'outbox'
UNION ALL
SELECT format('relation %s kind=%s acl=%s options=%s rls=%s', c.relname, c.relkind,
              c.relacl, c.reloptions, c.relrowsecurity)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'outbox' AND c.relkind IN ('r', 'v', 'm', 'p', 'S')
  AND c.relname <> 'schema_migrations'
UNION ALL
SELECT format('column %s.%s #%s %s %s default=%s identity=%s generated=%s compression=%s'
              ' acl=%s',
              c.relname, a.attname, row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
              format_type(a.atttypid, a.atttypmod),
              CASE WHEN a.attnotnull THEN 'NOT NULL' ELSE 'NULL' END,
              pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
              nullif(a.attcompression, ''), a.attacl)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = 'outbox' AND c.relkind IN ('r', 'v', 'm', 'p')
  AND c.relname <> 'schema_migrations' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT format('constraint %s on %s: %s', con.conname, c.relname, pg_get_constraintdef(con.oid))
FROM pg_constraint con
JOIN pg_namespace n ON n.oid = con.connamespace
LEFT JOIN pg_class c ON c.oid = con.conrelid
WHERE n.nspname = 'outbox' AND c.relname IS DISTINCT FROM 'schema_migrations'
UNION ALL
SELECT format('index %s', pg_get_indexdef(i.indexrelid))
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'outbox' AND c.relname <> 'schema_migrations'
UNION ALL
SELECT format('view %s: %s', c.relname, pg_get_viewdef(c.oid))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'outbox' AND c.relkind IN ('v', 'm')
UNION ALL
SELECT format('function %s acl=%s: %s', p.oid::regprocedure, p.proacl,
              pg_get_functiondef(p.oid))
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'outbox' AND p.prokind IN ('f', 'p')
UNION ALL
SELECT format('trigger %s enabled=%s', pg_get_triggerdef(t.oid), t.tgenabled)
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'outbox' AND NOT t.tgisinternal
UNION ALL
-- The rows the schema itself writes (the catalogue alone would not show one missing).
SELECT format('row outbox.locks %s', name) FROM outbox.locks
UNION ALL
SELECT format('rows outbox.portal_secret %s', count(*)) FROM outbox.portal_secret
"""


def describe(url: str) -> list[str]:
    """A sorted, readable description of schema outbox in the database at url."""
    with psycopg.connect(url, autocommit=True) as conn:
        return sorted(str(r[0]) for r in conn.execute(DESCRIBE).fetchall())


def migrations_table(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT version, name, applied_at FROM outbox.schema_migrations ORDER BY version"
        ).fetchall()


def migrate(url: str) -> list[int]:
    return asyncio.run(db.migrate(url))


def migrate_together(url: str, count: int) -> list[list[int]]:
    """What each of ``count`` migrates started at the same moment applied."""
    barrier = threading.Barrier(count, timeout=30)

    def run(_: int) -> list[int]:
        barrier.wait()
        return migrate(url)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


VERSIONS = [version for version, _, _ in db.migrations()]


def at_version(url: str, last: int) -> None:
    """Bring an empty database to version ``last`` as the older outboxes did: migration
    files 1..last applied one by one, each recorded as migrate records it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(db.query("migrations_table"))
        for version, name, path in db.migrations()[:last]:
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute(db.query("migration_record"), {"version": version, "name": name})


@pytest.fixture
def new_database(pg_server: localpg.Server) -> Iterator[Callable[[], str]]:
    """Create empty databases on demand; all are dropped after the test."""
    janitors: list[DatabaseJanitor] = []

    def create() -> str:
        name = f"outbox_x_{uuid.uuid4().hex[:12]}"
        janitor = DatabaseJanitor(
            user=pg_server.user, host=pg_server.host, port=pg_server.port, dbname=name
        )
        janitor.init()
        janitors.append(janitor)
        return pg_server.url(name)

    yield create
    for janitor in janitors:
        janitor.drop()


class TestMigrationFiles:
    def test_versions_are_numbered_one_to_n(self) -> None:
        """Migration files are numbered 1, 2, ... with no gap or duplicate."""
        numbers = [version for version, _, _ in db.migrations()]
        assert numbers == list(range(1, len(numbers) + 1))
        assert all(name for _, name, _ in db.migrations())


class TestMigrate:
    def test_first_run_applies_every_migration(self, empty_database_url: str) -> None:
        """On an empty database migrate answers and records every version, applied at
        one moment (one transaction)."""
        assert migrate(empty_database_url) == VERSIONS
        rows = migrations_table(empty_database_url)
        assert [(v, n) for v, n, _ in rows] == [(v, n) for v, n, _ in db.migrations()]
        assert len({applied_at for _, _, applied_at in rows}) == 1

    def test_first_run_applies_schema_sql_not_the_migrations(
        self,
        empty_database_url: str,
        template_db: str,
        pg_server: localpg.Server,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """An empty database gets sql/schema.sql whole: with every migration file made to
        fail, migrate still succeeds, with the same schema and versions."""
        sql = tmp_path / "sql"
        shutil.copytree(db.SQL_DIR, sql)
        for path in (sql / "migrations").glob("*.sql"):
            path.write_text("DO $$ BEGIN RAISE 'migration file run'; END $$;")
        monkeypatch.setattr(db.core, "SQL_DIR", sql)
        assert migrate(empty_database_url) == VERSIONS
        assert describe(empty_database_url) == describe(pg_server.url(template_db))

    def test_refuses_a_schema_it_did_not_make(self, empty_database_url: str) -> None:
        """A schema outbox with objects but no recorded version is left alone, with a
        message saying what to do."""
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA outbox")
            conn.execute("CREATE TABLE outbox.events (id bigint)")
        with pytest.raises(db.SchemaMismatch, match="rename or drop that schema"):
            migrate(empty_database_url)
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM outbox.schema_migrations").fetchone() == (0,)

    def test_second_run_is_a_no_op(self, empty_database_url: str) -> None:
        """Migrating again applies nothing, keeps the data and leaves the schema as it was."""
        migrate(empty_database_url)
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO outbox.webhooks (account_id, name, url, event)"
                " VALUES ('acct_1', 'n', 'https://example.com', 'lead.scored')"
            )
            conn.execute("SELECT outbox.emit('acct_1', 'lead.scored', '{}')")
        before = (describe(empty_database_url), migrations_table(empty_database_url))
        assert migrate(empty_database_url) == []
        assert (describe(empty_database_url), migrations_table(empty_database_url)) == before
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM outbox.webhooks),"
                " (SELECT count(*) FROM outbox.events), (SELECT count(*) FROM outbox.deliveries)"
            ).fetchone()
        assert counts == (1, 1, 1)

    @pytest.mark.parametrize("start", [1, 10], ids=["from-1", "from-10"])
    def test_upgrade_by_migrations(
        self,
        start: int,
        new_database: Callable[[], str],
        template_db: str,
        pg_server: localpg.Server,
    ) -> None:
        """A database an older outbox migrated is upgraded by the migrations it lacks, to
        the catalogue a fresh database gets from sql/schema.sql."""
        if start >= len(VERSIONS):
            pytest.skip(f"no migration after version {start}")
        url = new_database()
        at_version(url, start)
        assert migrate(url) == VERSIONS[start:]
        assert describe(url) == describe(pg_server.url(template_db))
        rows = migrations_table(url)
        assert [(v, n) for v, n, _ in rows] == [(v, n) for v, n, _ in db.migrations()]

    @pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
    def test_concurrent_threads(
        self, empty_database_url: str, template_db: str, pg_server: localpg.Server, isolation: str
    ) -> None:
        """Three migrates started together on an empty database all succeed; the schema is
        installed once, also where transactions default to REPEATABLE READ (a snapshot
        taken before the lock was granted would not see the first run's install)."""
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            name = conn.info.dbname
            conn.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = '{isolation}'")
        applied = migrate_together(empty_database_url, 3)
        # The first run to take the lock installs schema.sql; the others find it done.
        assert sorted(applied, key=len) == [[], [], VERSIONS]
        assert [v for v, _, _ in migrations_table(empty_database_url)] == VERSIONS
        assert describe(empty_database_url) == describe(pg_server.url(template_db))

    def test_concurrent_upgrades(
        self, new_database: Callable[[], str], template_db: str, pg_server: localpg.Server
    ) -> None:
        """Three migrates started together on a database at version 1 take turns migration
        by migration: between them, each missing one is applied once."""
        url = new_database()
        at_version(url, 1)
        applied = migrate_together(url, 3)
        assert sorted(v for versions in applied for v in versions) == VERSIONS[1:]
        assert describe(url) == describe(pg_server.url(template_db))

    def test_concurrent_processes(
        self, empty_database_url: str, template_db: str, pg_server: localpg.Server
    ) -> None:
        """Three `python -m outbox migrate` processes at once all exit 0, one row per
        migration."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env.update(OUTBOX_DATABASE_URL=empty_database_url, OUTBOX_LOG_FORMAT="json")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "outbox", "migrate"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(3)
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        assert [v for v, _, _ in migrations_table(empty_database_url)] == VERSIONS
        assert describe(empty_database_url) == describe(pg_server.url(template_db))


class TestSchemaFile:
    def test_schema_sql_equals_the_migrations_applied_in_order(
        self, new_database: Callable[[], str]
    ) -> None:
        """The catalogue of a fresh install (sql/schema.sql, by migrate) is exactly that of
        migrations 1..N applied in order: a change goes into both, and this holds them
        equal."""
        installed, upgraded = new_database(), new_database()
        migrate(installed)
        at_version(upgraded, len(VERSIONS))
        expected = describe(upgraded)
        assert any(line.startswith("relation events ") for line in expected)
        assert describe(installed) == expected

    def test_schema_sql_runs_under_psql(self, new_database: Callable[[], str]) -> None:
        """`psql -v ON_ERROR_STOP=1 -f sql/schema.sql` applies cleanly to an empty database."""
        url = new_database()
        done = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(SCHEMA)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        with psycopg.connect(url, autocommit=True) as conn:
            emitted = conn.execute("SELECT outbox.emit('a', 'lead.scored', '{}')").fetchone()
        assert emitted == (1,)

    def test_outbox_sql_prints_schema_sql(self) -> None:
        """`outbox sql` prints sql/schema.sql unchanged."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        done = call_outbox(env, "sql")
        assert done.returncode == 0, done.stderr
        assert done.stdout == SCHEMA.read_text()
