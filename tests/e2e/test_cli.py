"""The `outbox` command as a user types it, with a real database and receiver.

Most commands run in this process (`call_outbox`: the same `main`, environment, input
and output, without a Python start per command); those whose process matters to a shell
(exit codes, a closed pipe, stdin) run as real processes (`run_outbox`)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import subprocess
import sys

import psycopg
import pytest
import standardwebhooks

from outbox import db, tokens
from outbox.events import EVENTS
from tests.conftest import (
    ROOT,
    SQL,
    call_outbox,
    run_outbox,
    sidecar_environment,
    wait_until,
)
from tests.receiver import Receiver, Reply


@pytest.fixture
def outbox(database_url: str, ca_file: str):  # type: ignore[no-untyped-def]
    """`outbox ARGS` in this process, with extra settings as keyword arguments."""
    env = sidecar_environment(database_url, ca_file)

    def run(*args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
        return call_outbox(env | extra, *args, stdin=stdin)

    return run


@pytest.fixture
def outbox_process(database_url: str, ca_file: str):  # type: ignore[no-untyped-def]
    """`outbox ARGS` as a process of its own."""
    env = sidecar_environment(database_url, ca_file)

    def run(*args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
        return run_outbox(env | extra, *args, stdin=stdin)

    return run


def webhook_count(sql: SQL) -> int:
    return int(sql.one("SELECT count(*) FROM outbox.webhooks"))


class TestWebhookCommands:
    def test_add_list_update_delete(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """add prints the id alone; list shows it; update changes it; delete removes it."""
        added = outbox(
            "webhooks",
            "add",
            "--account",
            "acct_1",
            "--name",
            "CRM Sync",
            "--url",
            "https://example.com/hook",
            "--event",
            "lead.scored",
            "--secret",
            "0123456789abcdef",
        )
        assert added.returncode == 0, added.stderr
        hook_id = int(added.stdout)
        assert added.stdout == f"{hook_id}\n"

        listed = outbox("webhooks", "list", "--account", "acct_1", "--json")
        (row,) = json.loads(listed.stdout)
        assert row["id"] == hook_id and row["name"] == "CRM Sync" and row["has_secret"]
        assert "secret" not in row
        table = outbox("webhooks", "list", "--account", "acct_1").stdout
        assert "CRM Sync" in table and "lead.scored" in table

        assert (
            outbox(
                "webhooks", "update", str(hook_id), "--disable", "--no-secret", "--name", "Slack"
            ).returncode
            == 0
        )
        assert sql("SELECT name, enabled, secret FROM outbox.webhooks") == [("Slack", False, None)]
        assert outbox("webhooks", "delete", str(hook_id)).returncode == 0
        assert webhook_count(sql) == 0

    def test_a_generated_secret_is_shown_once_on_stderr(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """`--secret generate` stores a new whsec_ secret (standard base64 of 32 bytes) and
        shows it on one stderr line, so stdout stays the id alone; update makes another."""
        added = outbox(
            "webhooks",
            "add",
            "--account",
            "acct_1",
            "--name",
            "n",
            "--url",
            "https://example.com/h",
            "--event",
            "lead.scored",
            "--secret",
            "generate",
        )
        assert added.returncode == 0, added.stderr
        hook_id = int(added.stdout)
        assert added.stdout == f"{hook_id}\n"
        (line,) = added.stderr.splitlines()
        (secret,) = re.findall(r"whsec_\S+", line)
        assert line.startswith(f"signing secret of webhook {hook_id}: ")
        assert len(base64.b64decode(secret[6:], validate=True)) == 32
        assert sql.one("SELECT secret FROM outbox.webhooks") == secret

        updated = outbox("webhooks", "update", str(hook_id), "--secret", "generate")
        assert updated.returncode == 0, updated.stderr
        (new,) = re.findall(r"whsec_\S+", updated.stderr)
        assert new != secret
        assert sql.one("SELECT secret FROM outbox.webhooks") == new

    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["--url", "http://example.com/hook"], "https://"),
            (["--secret", "short"], "16"),
            (["--name", "  "], "name"),
            (["--event", "lead.bogus"], "lead.created, lead.scored"),
        ],
    )
    def test_bad_input_is_one_line_exit_2_nothing_written(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL, args: list[str], says: str
    ) -> None:
        """A broken rule is named on one stderr line, exit 2, and nothing is stored."""
        base = {
            "--account": "acct_1",
            "--name": "n",
            "--url": "https://example.com/h",
            "--event": "lead.scored",
        }
        base.update(dict(zip(args[::2], args[1::2], strict=True)))
        result = outbox("webhooks", "add", *[x for kv in base.items() for x in kv])
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr
        assert webhook_count(sql) == 0

    def test_the_eleventh_webhook_is_refused(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """The 10-per-account limit is reported plainly."""
        for n in range(10):
            sql.webhook(f"https://example.com/{n}")
        result = outbox(
            "webhooks",
            "add",
            "--account",
            "acct_1",
            "--name",
            "n",
            "--url",
            "https://example.com/11",
            "--event",
            "lead.scored",
        )
        assert result.returncode == 2 and "10 webhooks" in result.stderr
        assert webhook_count(sql) == 10

    def test_unknown_id(self, outbox) -> None:  # type: ignore[no-untyped-def]
        """An id that does not exist, or is not a number, is a one-line error."""
        for args in (["delete", "999"], ["update", "999", "--enable"], ["test", "abc"]):
            result = outbox("webhooks", *args)
            assert result.returncode == 2, args
            assert len(result.stderr.strip().splitlines()) == 1


class TestTestSend:
    def test_sends_a_signed_sample_once(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL, receiver: Receiver
    ) -> None:
        """`webhooks test` POSTs one signed, marked sample of the chosen event; exit 0 on 2xx."""
        secret = "whsec_test_secret_0123"
        hook = sql.webhook(receiver.url(), secret=secret)
        result = outbox("webhooks", "test", str(hook), "--event", "meeting.booked")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: HTTP 200")
        (got,) = receiver.received()
        body = json.loads(got.body)
        assert body["event"] == "meeting.booked" and body["data"]["meeting"]
        assert got.headers["X-Webhook-Test"] == "true"
        assert got.headers["X-Webhook-Id"].startswith("test_")
        standardwebhooks.Webhook(secret.encode()).verify(got.body, got.headers)
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 0

    def test_failure_exits_1_without_retrying(  # type: ignore[no-untyped-def]
        self, outbox_process, sql: SQL, receiver: Receiver
    ) -> None:
        """A 5xx answer is reported with its status and exit 1 (of the process, as a shell
        script sees it), after exactly one request."""
        receiver.respond = lambda _: Reply(500)
        hook = sql.webhook(receiver.url())
        result = outbox_process("webhooks", "test", str(hook))
        assert result.returncode == 1 and "HTTP 500" in result.stdout
        assert len(receiver.received()) == 1

    def test_every_event_has_a_sample(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL, receiver: Receiver
    ) -> None:
        """Each of the seven events sends a non-empty sample with a lead."""
        hook = sql.webhook(receiver.url())
        for event in EVENTS:
            assert outbox("webhooks", "test", str(hook), "--event", event).returncode == 0
        bodies = [json.loads(r.body) for r in receiver.received()]
        assert [b["event"] for b in bodies] == list(EVENTS)
        assert all(b["data"]["lead"] for b in bodies)


class TestEmitAndStatus:
    def test_emit_from_argument_and_stdin(self, outbox_process, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """emit prints the new event's id alone, taking JSON from the argument or from
        the standard input of its process (a pipe)."""
        first = outbox_process("emit", "acct_1", "lead.created", '{"lead": {"id": 1}}')
        second = outbox_process("emit", "acct_1", "lead.created", stdin='{"lead": {"id": 2}}')
        assert first.returncode == second.returncode == 0
        ids = [int(first.stdout), int(second.stdout)]
        rows = sql("SELECT id, data FROM outbox.events ORDER BY id")
        assert rows == [(ids[0], {"lead": {"id": 1}}), (ids[1], {"lead": {"id": 2}})]

    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["acct_1", "lead.nope", "{}"], "valid events are"),
            (["acct_1", "lead.created", "{not json"], "JSON"),
            (["acct_1", "lead.created", "[1, 2]"], "object"),
            (["acct_1", "lead.created", "[" * 30_000], "nested too deeply"),
            (["", "lead.created", "{}"], "account_id"),
        ],
    )
    def test_emit_rejects_bad_input(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL, args: list[str], says: str
    ) -> None:
        """Bad emit input: one line naming the problem, exit 2, no event."""
        result = outbox("emit", *args)
        assert result.returncode == 2 and says in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert sql.one("SELECT count(*) FROM outbox.events") == 0

    def test_status_shows_the_failure_reason(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """`outbox status` shows each webhook with its last status and reason."""
        hook = sql.webhook("https://example.com/hook", name="CRM Sync")
        sql.emit()
        sql(
            "UPDATE outbox.deliveries SET status = 'failed', finished_at = now(),"
            " last_error = 'HTTP 503' WHERE webhook_id = %s",
            (hook,),
        )
        shown = outbox("status", "--account", "acct_1")
        out = shown.stdout
        assert "CRM Sync" in out and "failed" in out and "HTTP 503" in out
        # The retry window in words, from the settings in force (the tests' own delays),
        # on stderr: stdout is the table alone.
        assert "retried up to 3 times: after about 0.2 seconds, 0.4 seconds" in shown.stderr
        assert "retried" not in out

    def test_migrate_twice_and_bad_settings(self, outbox) -> None:  # type: ignore[no-untyped-def]
        """migrate is idempotent; a bad setting is named on one line with exit 2."""
        assert outbox("migrate").returncode == 0
        assert "up to date" in outbox("migrate").stdout
        bad = outbox("status", OUTBOX_HTTP_TIMEOUT="soon")
        assert bad.returncode == 2 and "OUTBOX_HTTP_TIMEOUT" in bad.stderr


class TestMissingDatabase:
    @pytest.mark.parametrize("command", [["migrate"], ["status"]])
    def test_says_how_to_create_it(  # type: ignore[no-untyped-def]
        self, outbox_process, database_url: str, command: list[str]
    ) -> None:
        """A database that does not exist: one line with the createdb command, exit 2."""
        missing = database_url.rsplit("/", 1)[0] + "/outbox_never_created"
        result = outbox_process(*command, OUTBOX_DATABASE_URL=missing)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert '"outbox_never_created" does not exist' in line
        assert "createdb -h " in line and " outbox_never_created`" in line
        assert 'CREATE DATABASE "outbox_never_created"' in line
        assert "Traceback" not in result.stderr


RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


class TestJsonTimes:
    def test_webhooks_list_writes_times_as_the_api_does(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL, sidecars, receiver: Receiver
    ) -> None:
        """`webhooks list --json` writes each time exactly as the admin API does: RFC 3339, UTC."""
        sidecar = sidecars()
        hook = sql.webhook(receiver.url())
        sql.emit()
        wait_until(
            lambda: sql.one("SELECT last_delivery_at FROM outbox.webhook_status"),
            what="the delivery to finish",
        )
        token = asyncio.run(_token(sql.url, "acct_1"))
        conn = http.client.HTTPConnection("127.0.0.1", sidecar.api_port, timeout=30)
        conn.request(
            "GET", f"/api/v1/webhooks/{hook}", headers={"Authorization": f"Bearer {token}"}
        )
        from_api = json.load(conn.getresponse())
        conn.close()

        listed = outbox("webhooks", "list", "--account", "acct_1", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        for field in ("created_at", "updated_at", "last_delivery_at"):
            assert RFC3339_UTC.match(row[field]), (field, row[field])
            assert row[field] == from_api[field], field

    def test_tokens_list_too(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """`tokens list --json` writes its times the same way."""
        asyncio.run(_token(sql.url, "acct_1"))
        listed = outbox("tokens", "list", "--account", "acct_1", "--json")
        (row,) = json.loads(listed.stdout)
        assert RFC3339_UTC.match(row["created_at"]), row


async def _token(url: str, account: str) -> str:
    async with await db.connect(url) as conn:
        return (await tokens.create(conn, account))[1]


class TestClosedPipe:
    def test_status_into_head(self, database_url: str, ca_file: str, sql: SQL) -> None:
        """`outbox status | head -1` with more rows than a pipe holds: the header, no traceback."""
        sql(
            "INSERT INTO outbox.webhooks (account_id, name, url, event)"
            " SELECT 'acct_' || (n / 10), 'hook ' || n, 'https://example.com/hooks/' || n,"
            " 'lead.scored' FROM generate_series(0, 1999) AS n"
        )
        env = sidecar_environment(database_url, ca_file)
        result = subprocess.run(
            ["bash", "-c", f"{sys.executable} -m outbox status | head -1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.stderr == ""
        (header,) = result.stdout.splitlines()
        assert header.split()[:3] == ["account_id", "id", "name"]

    def test_output_to_a_closed_pipe(self, database_url: str, ca_file: str, sql: SQL) -> None:
        """Output to a pipe nobody reads any more: exit 1 quietly, as Python's docs advise."""
        for n in range(10):
            sql.webhook(f"https://example.com/{n}")
        read, write = os.pipe()
        os.close(read)
        try:
            for args in (["webhooks", "list", "--account", "acct_1"], ["status"]):
                proc = subprocess.run(
                    [sys.executable, "-m", "outbox", *args],
                    stdout=write,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                    env=sidecar_environment(database_url, ca_file),
                    timeout=60,
                    check=False,
                )
                assert proc.stderr == "", args
                assert proc.returncode == 1, args
        finally:
            os.close(write)


def old_and_young(sql: SQL) -> tuple[int, int]:
    """Two delivered events: one finished two hours ago (event as old), one just now."""
    sql.webhook("https://example.com/hook")
    old, young = sql.emit(), sql.emit()
    sql(
        "UPDATE outbox.deliveries SET status = 'succeeded', attempts = 1, finished_at = now()"
        " - CASE WHEN event_id = %s THEN interval '2 hours' ELSE interval '0' END",
        (old,),
    )
    sql(
        "INSERT INTO outbox.delivery_attempts (delivery_id, attempt, started_at, duration_ms)"
        " SELECT id, 1, finished_at, 5 FROM outbox.deliveries"
    )
    sql("UPDATE outbox.events SET occurred_at = now() - interval '3 hours' WHERE id = %s", (old,))
    return old, young


class TestPrune:
    def test_prune_older_than_prints_what_it_deleted(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """--older-than deletes what finished before then, and says how much of each."""
        _, young = old_and_young(sql)
        result = outbox("prune", "--older-than", "1h")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "deleted 1 deliveries, 1 attempts, 1 events\n"
        assert [r[0] for r in sql("SELECT id FROM outbox.events")] == [young]
        assert sql.one("SELECT count(*) FROM outbox.delivery_attempts") == 1

    def test_prune_gives_up_on_a_lock_held_elsewhere_and_says_so(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL
    ) -> None:
        """A session holding the pruners' lock: prune waits --wait, then exits 1 with one
        line naming the lock; nothing is deleted."""
        old_and_young(sql)
        with psycopg.connect(sql.url) as other:
            other.execute("SELECT FROM outbox.locks WHERE name = 'prune' FOR UPDATE")
            result = outbox("prune", "--older-than", "1h", "--wait", "1s")
        assert result.returncode == 1, result.stderr
        assert result.stdout == "deleted 0 deliveries, 0 attempts, 0 events\n"
        (line,) = result.stderr.strip().splitlines()
        assert "pruners' lock outbox.locks 'prune' for 1s" in line
        assert sql.one("SELECT count(*) FROM outbox.events") == 2

    def test_prune_defaults_to_the_retention_setting(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """Without --older-than, OUTBOX_RETENTION says what is old; the default keeps 30 days."""
        old_and_young(sql)
        kept = outbox("prune")
        assert kept.stdout == "deleted 0 deliveries, 0 attempts, 0 events\n"
        pruned = outbox("prune", OUTBOX_RETENTION="90m")
        assert pruned.stdout == "deleted 1 deliveries, 1 attempts, 1 events\n"

    def test_prune_with_retention_off_does_nothing(self, outbox, sql: SQL) -> None:  # type: ignore[no-untyped-def]
        """With OUTBOX_RETENTION=off, prune says there is nothing to do and deletes nothing."""
        old_and_young(sql)
        result = outbox("prune", OUTBOX_RETENTION="off")
        assert result.returncode == 0 and "nothing to do" in result.stdout
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 2

    @pytest.mark.parametrize(
        ("args", "env", "says"),
        [
            (["--older-than", "5x"], {}, "'5x' is not a duration"),
            (["--older-than", "0"], {}, "more than 0"),
            (["--older-than"], {}, "--older-than"),
            ([], {"OUTBOX_RETENTION": "forever"}, "OUTBOX_RETENTION"),
        ],
    )
    def test_bad_durations_are_one_line_exit_2(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL, args: list[str], env: dict[str, str], says: str
    ) -> None:
        """A duration that is not one is named on one stderr line, exit 2, nothing deleted."""
        old_and_young(sql)
        result = outbox("prune", *args, **env)
        assert result.returncode == 2 and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 2
