"""Where code lives: SQL in sql/, run through outbox/db.py's named queries."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
# Starts of SQL statements, as a string literal in Python would hold them.
SQL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|GRANT|REVOKE|LISTEN|NOTIFY|"
    r"SET|RESET|DISCARD|TRUNCATE|BEGIN|COMMIT|DO|COPY|VACUUM|ANALYZE)\b"
)
# localpg starts a development server and creates its database: it manages the server
# outbox runs on, not outbox's schema.
ALLOWED = {"localpg.py"}


def sql_literals(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        # One word alone is an HTTP method or a name, not a statement.
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and SQL.match(node.value)
            and len(node.value.split()) > 1
        ):
            found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    return found


def test_no_sql_outside_sql_files() -> None:
    """Every statement the package runs is a named query in sql/queries.sql (or a
    migration): none is written in Python, where it could drift from the schema."""
    found = []
    for path in sorted((ROOT / "outbox").glob("*.py")):
        if path.name not in ALLOWED:
            found += sql_literals(path)
    assert found == []
