"""Where code lives: SQL in sql/, run only by the outbox/db/ package's typed operations."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
PACKAGE = ROOT / "outbox"
# Starts of SQL statements, as a string literal in Python would hold them.
SQL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|GRANT|REVOKE|LISTEN|NOTIFY|"
    r"SET|RESET|DISCARD|TRUNCATE|BEGIN|COMMIT|DO|COPY|VACUUM|ANALYZE)\b"
)
# What running a statement or reading its rows looks like in psycopg.
RUNS_SQL = {"execute", "executemany", "fetchone", "fetchall", "fetchmany", "copy"}


def modules(*, outside_db: bool = False) -> list[Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    if outside_db:
        found = [path for path in found if PACKAGE / "db" not in path.parents]
    return found


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


def sql_calls(path: Path) -> list[str]:
    """Calls that run SQL or read rows, and uses of the named-query loader."""
    where = path.relative_to(PACKAGE)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in RUNS_SQL
        ):
            found.append(f"{where}:{node.lineno}: .{node.func.attr}(")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "query"
            and isinstance(node.value, ast.Name)
            and node.value.id in {"db", "core"}
        ):
            found.append(f"{where}:{node.lineno}: {node.value.id}.query")
        elif (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("outbox.db")
            and any(alias.name == "query" for alias in node.names)
        ):
            found.append(f"{where}:{node.lineno}: imports query")
    return found


def test_no_sql_outside_sql_files() -> None:
    """Every statement the package runs is a named query in sql/queries.sql (or a
    migration): none is written in Python, where it could drift from the schema."""
    found = []
    for path in modules():
        found += sql_literals(path)
    assert found == []


def test_only_the_db_package_runs_sql() -> None:
    """Outside outbox/db/, no module runs a statement, reads rows or loads a named
    query: it calls the db package's typed operations, so every statement has one
    caller to read when the schema changes."""
    found = []
    for path in modules(outside_db=True):
        found += sql_calls(path)
    assert found == []
