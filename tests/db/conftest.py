"""Database tests share one migrated database per module, emptied after every test.

Cloning the template per test costs a CREATE DATABASE and a DROP DATABASE (a checkpoint
each); emptying the tables costs milliseconds. Tests here start from the same state as
a fresh clone: empty tables, identities restarted. Tests that need a database of their
own (migrations) use `empty_database_url` or create one.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import cloned_database
from tools import localpg


@pytest.fixture(scope="module")
def module_database_url(pg_server: localpg.Server, template_db: str) -> Iterator[str]:
    with cloned_database(pg_server, template_db, "outbox_m") as url:
        yield url


@pytest.fixture
def database_url(module_database_url: str) -> Iterator[str]:
    """The module's migrated database, emptied (identities restarted) after the test.

    Every table of schema outbox but schema_migrations and locks (whose rows the
    migrations write once) is emptied, so tables that later migrations add are covered.
    """
    yield module_database_url
    with psycopg.connect(module_database_url, autocommit=True) as conn:
        # A test that leaves a transaction open would make this wait: fail instead.
        conn.execute("SET lock_timeout = '10s'")
        tables = conn.execute(
            "SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')"
            " FROM pg_tables WHERE schemaname = 'outbox'"
            " AND tablename NOT IN ('schema_migrations', 'locks')"
        ).fetchone()
        assert tables is not None and tables[0]
        conn.execute(f"TRUNCATE {tables[0]} RESTART IDENTITY CASCADE")
