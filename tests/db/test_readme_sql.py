"""The front page's SQL, run as printed: emitting from the app's transaction, and the
status queries with the columns their example output shows."""

from __future__ import annotations

import re

from tests.conftest import ROOT, SQL

README = (ROOT / "README.md").read_text()


def _blocks() -> list[tuple[str, str | None]]:
    """Each ```sql block, with the plain ``` block right after it (its output), if any."""
    found = re.finditer(r"```sql\n(.*?)```\s*(?:```\n(.*?)```)?", README, re.S)
    return [(m.group(1), m.group(2)) for m in found]


def _by_start(start: str) -> list[tuple[str, str | None]]:
    return [(query, out) for query, out in _blocks() if query.startswith(start)]


def _leads(sql: SQL) -> None:
    """The application's own table that the example updates, on this connection only."""
    sql("CREATE TEMP TABLE leads (id integer PRIMARY KEY, score integer)")
    sql("INSERT INTO leads VALUES (42, NULL)")


class TestEmitting:
    """The producer's examples enqueue a delivery for the subscribed webhook."""

    def test_the_transaction_example_writes_the_lead_and_enqueues_one_delivery(
        self, sql: SQL
    ) -> None:
        """BEGIN; UPDATE leads; INSERT INTO outbox.events; COMMIT: both writes land, and
        the webhook subscribed to lead.scored gets one pending delivery."""
        hook = sql.webhook("https://crm.example.com/hooks/autoreach", name="CRM Sync")
        _leads(sql)
        ((transaction, _),) = _by_start("BEGIN;")
        sql(transaction)
        assert sql.one("SELECT score FROM leads WHERE id = 42") == 87
        assert sql("SELECT webhook_id, status FROM outbox.deliveries") == [(hook, "pending")]

    def test_the_emit_function_example_returns_the_event_id(self, sql: SQL) -> None:
        """`SELECT outbox.emit(...)`, as the page quotes it, returns the new event's id."""
        (call,) = re.findall(r"`(SELECT outbox\.emit\(.*?\);)`", README)
        (row,) = sql(call)
        assert row == (sql.one("SELECT max(id) FROM outbox.events"),)


class TestStatus:
    """The status queries run, and answer the columns the page shows them answering."""

    def test_each_status_query_answers_the_columns_of_its_example_output(self, sql: SQL) -> None:
        """Both webhook_status queries have an example output; its header names the
        columns the query returns, in order, and the webhook is in the answer."""
        sql.webhook("https://crm.example.com/hooks/autoreach", name="CRM Sync")
        sql.emit()
        examples = [(q, out) for q, out in _by_start("SELECT") if "webhook_status" in q]
        assert len(examples) == 2
        for query, output in examples:
            assert output is not None, query
            shown = [name.strip() for name in output.splitlines()[0].split("|")]
            cur = sql.conn.execute(query)
            assert [c.name for c in cur.description or []] == shown
            assert [row[0] for row in cur.fetchall()] == ["CRM Sync"]
