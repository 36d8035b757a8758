"""The one package that runs SQL. Its statements are the named queries of
sql/queries.sql (and the migrations); each is run by one typed operation here, which
takes the caller's connection, so transactions stay where the callers open them.

- ``core``: connections, the named queries, migrations, the schema version.
- ``deliveries``: the dispatcher's claim, record and wake-ups; the backlog.
- ``webhooks``: webhooks, their status and delivery log, replays.
- ``access``: API tokens, portal links and page sessions.
- ``notifications``: sending operational events to the operator's endpoint.
- ``retention``: pruning old rows in batches.
"""

from __future__ import annotations

from outbox.db import access, deliveries, notifications, retention, webhooks
from outbox.db.core import (
    LOCK_KEY,
    SQL_DIR,
    SchemaMismatch,
    connect,
    expected_version,
    migrate,
    migrations,
    missing_database,
    query,
    schema_problem,
    schema_version,
)

__all__ = [
    "LOCK_KEY",
    "SQL_DIR",
    "SchemaMismatch",
    "access",
    "connect",
    "deliveries",
    "expected_version",
    "migrate",
    "migrations",
    "missing_database",
    "notifications",
    "query",
    "retention",
    "schema_problem",
    "schema_version",
    "webhooks",
]
