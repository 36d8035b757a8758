"""The admin API against a real `outbox run` process and a real database.

Most tests share one sidecar and database per module: each test works as two accounts
of its own, and the API's isolation between accounts keeps the tests apart. The
fixtures here (``server``, ``api``, ``db``) are shared by the other test_api_*.py
modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox import tokens
from outbox.events import EVENTS
from tests.conftest import (
    SQL,
    Sidecar,
    call_outbox,
    cloned_database,
    free_port,
    sidecar_environment,
    wait_until,
)
from tests.receiver import BlackHole, Receiver, Reply
from tools import localpg

SECRET = "whsec_api_secret_0123456789"
OTHER_SECRET = "whsec_rotated_secret_987654321"
# Short enough that a failing delivery gives up within a quarter of a second.
RETRY_DELAYS = "0.03,0.06,0.09"
_UNSET: Any = object()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> tuple[str, str]:
        """(code, message) of an error answer, which must have exactly that shape."""
        body = self.json
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        return body["error"]["code"], body["error"]["message"]


class Api:
    """HTTP calls to one sidecar's admin API as ``main`` (or ``other``, another account
    with a token of its own); keeps every answer."""

    def __init__(self, sidecar: Sidecar, main: str, other: str, account_tokens: dict[str, str]):
        self.sidecar = sidecar
        self.main = main
        self.other = other
        self.tokens = account_tokens
        self.port = sidecar.api_port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.answers: list[Answer] = []

    def __call__(
        self,
        method: str,
        path: str,
        body: Any = _UNSET,
        *,
        account: str | None = None,
        anonymous: bool = False,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is None and not anonymous:
            token = self.tokens[account or self.main]
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not _UNSET:
            raw = json.dumps(body).encode()
        if raw is not None:
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=raw, headers=sent)
            response = conn.getresponse()
            answer = Answer(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()
        self.answers.append(answer)
        return answer


def make_token(sql: SQL, account: str) -> str:
    """A token for ``account``, created the way `outbox tokens create` does it."""

    async def create() -> str:
        async with await psycopg.AsyncConnection.connect(sql.url, autocommit=True) as conn:
            return (await tokens.create(conn, account))[1]

    return asyncio.run(create())


def new_api(sidecar: Sidecar, sql: SQL) -> Api:
    """Two new accounts, each with a token, on ``sidecar``."""
    main, other = (f"acct_{uuid.uuid4().hex[:10]}" for _ in range(2))
    return Api(sidecar, main, other, {a: make_token(sql, a) for a in (main, other)})


def sidecar_env(database_url: str, ca_file: str) -> dict[str, str]:
    return sidecar_environment(
        database_url,
        ca_file,
        OUTBOX_RETRY_DELAYS=RETRY_DELAYS,
        OUTBOX_API_LISTEN=f"127.0.0.1:{free_port()}",
    )


@dataclass(frozen=True)
class Server:
    sidecar: Sidecar
    sql: SQL


@pytest.fixture(scope="module")
def server(
    pg_server: localpg.Server,
    template_db: str,
    ca_file: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """One database and one `outbox run` for a whole module."""
    with cloned_database(pg_server, template_db, "outbox_api") as url:
        log_path = Path(tmp_path_factory.mktemp("api")) / "sidecar.log"
        sidecar = Sidecar(sidecar_env(url, ca_file), log_path).start()
        sql = SQL(url)
        try:
            yield Server(sidecar, sql)
        finally:
            sidecar.stop()
            sql.conn.close()


@pytest.fixture
def db(server: Server) -> SQL:
    return server.sql


@pytest.fixture
def api(server: Server) -> Api:
    return new_api(server.sidecar, server.sql)


def outbox(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`outbox ARGS` with ``env`` as its environment, in this process."""
    return call_outbox(env, *args)


def hook_body(**fields: Any) -> dict[str, Any]:
    return {
        "name": "CRM Sync",
        "url": "https://example.com/webhooks",
        "event": "lead.scored",
        "secret": SECRET,
    } | fields


def owned_rows(sql: SQL, account: str) -> list[tuple[Any, ...]]:
    """Everything of ``account`` in the database, to compare before and after."""
    return sql(
        "SELECT 'webhook', w::text FROM outbox.webhooks w WHERE account_id = %(a)s"
        " UNION ALL SELECT 'event', e::text FROM outbox.events e WHERE account_id = %(a)s"
        " UNION ALL SELECT 'delivery', d::text FROM outbox.deliveries d"
        "   JOIN outbox.webhooks w ON w.id = d.webhook_id WHERE w.account_id = %(a)s"
        " UNION ALL SELECT 'attempt', x::text FROM outbox.delivery_attempts x"
        "   JOIN outbox.deliveries d ON d.id = x.delivery_id"
        "   JOIN outbox.webhooks w ON w.id = d.webhook_id WHERE w.account_id = %(a)s"
        " UNION ALL SELECT 'token', t.id::text FROM outbox.api_tokens t WHERE account_id = %(a)s"
        " ORDER BY 1, 2",
        {"a": account},
    )


def add_delivery(
    sql: SQL,
    hook: int,
    *,
    status: str = "failed",
    attempts: int = 1,
    finished_ago: float = 0.0,
) -> int:
    """A delivery of ``hook`` written straight to the database, as if ``attempts``
    attempts had answered 500, so that no test waits for retries to run out. Its event
    is one the webhook is not subscribed to, so the fan-out adds nothing of its own.
    A pending one is due in an hour."""
    account = sql.one("SELECT account_id FROM outbox.webhooks WHERE id = %s", (hook,))
    event = sql.emit(account, event="lead.created", data={"made": "by the test"})
    delivery = sql.one(
        "INSERT INTO outbox.deliveries (event_id, webhook_id, status, attempts, next_attempt_at,"
        " finished_at, last_error, last_response_status)"
        " VALUES (%(event)s, %(hook)s, %(status)s, %(attempts)s, now() + interval '1 hour',"
        "  CASE WHEN %(status)s <> 'pending' THEN now() - make_interval(secs => %(ago)s) END,"
        "  'HTTP 500', 500)"
        " RETURNING id",
        {"event": event, "hook": hook, "status": status, "attempts": attempts, "ago": finished_ago},
    )
    for attempt in range(1, attempts + 1):
        sql(
            "INSERT INTO outbox.delivery_attempts"
            " (delivery_id, attempt, started_at, duration_ms, response_status, error)"
            " VALUES (%s, %s, now(), 5, 500, 'HTTP 500')",
            (delivery, attempt),
        )
    return int(delivery)


def finished_delivery(sql: SQL, account: str, url: str) -> tuple[int, int]:
    """(webhook id, delivery id): a new webhook of ``account`` with one failed delivery."""
    hook = sql.webhook(url, account=account)
    return hook, add_delivery(sql, hook)


def every_text_in_database(sql: SQL) -> str:
    """Every row of every table in every schema of the database, as text."""
    tables = sql(
        "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables"
        " WHERE table_type = 'BASE TABLE'"
        " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    rows = []
    for (table,) in tables:
        rows += [r[0] for r in sql(f"SELECT t::text FROM {table} t")]
    return "\n".join(rows)


# Every /api/ route, with placeholders for ids: (method, path, body).
ROUTES = [
    ("GET", "/api/v1/openapi.json", None),
    ("GET", "/api/v1/events", None),
    ("GET", "/api/v1/webhooks", None),
    ("POST", "/api/v1/webhooks", hook_body()),
    ("GET", "/api/v1/webhooks/{webhook}", None),
    ("PATCH", "/api/v1/webhooks/{webhook}", {"name": "renamed"}),
    ("DELETE", "/api/v1/webhooks/{webhook}", None),
    ("POST", "/api/v1/webhooks/{webhook}/test", {}),
    ("GET", "/api/v1/webhooks/{webhook}/deliveries", None),
    ("POST", "/api/v1/webhooks/{webhook}/recover", {"since": "2020-01-01T00:00:00Z"}),
    ("POST", "/api/v1/deliveries/{delivery}/retry", None),
    ("DELETE", "/api/v1/portal-sessions", None),
]
# Every route that reads a JSON body.
JSON_ROUTES = [
    ("POST", "/api/v1/webhooks"),
    ("PATCH", "/api/v1/webhooks/{webhook}"),
    ("POST", "/api/v1/webhooks/{webhook}/test"),
    ("POST", "/api/v1/webhooks/{webhook}/recover"),
    ("POST", "/api/v1/portal-links"),
]
# Bodies nested deeper than Python's JSON parser can go.
DEEP_JSON = [b"[" * 30_000, b'{"a":' * 12_000, b"[" * 15_000 + b"]" * 15_000]


def _send(body: Any) -> Any:
    return _UNSET if body is None else body


class TestAuth:
    def test_every_api_route_needs_a_token(self, api: Api, db: SQL, receiver: Receiver) -> None:
        """No Authorization header: 401 in the error shape with a Bearer challenge, on
        every route and on paths that are no route; nothing is done or sent."""
        hook, delivery = finished_delivery(db, api.main, receiver.url())
        before = owned_rows(db, api.main)
        for method, path, body in [*ROUTES, ("GET", "/api/v2/nothing", None)]:
            path = path.format(webhook=hook, delivery=delivery)
            answer = api(method, path, _send(body), anonymous=True)
            assert answer.status == 401, (method, path, answer)
            assert answer.error[0] == "unauthorized"
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert owned_rows(db, api.main) == before
        assert receiver.received() == []

    def test_unknown_malformed_and_revoked_tokens_are_refused(self, api: Api, db: SQL) -> None:
        """A token we never issued, another scheme, or a revoked token: 401."""
        assert api("GET", "/api/v1/webhooks", token=tokens.generate()).status == 401
        assert api("GET", "/api/v1/webhooks", token="not-even-close").status == 401
        assert api("GET", "/api/v1/webhooks", token="obx_" + "é" * 10).status == 401
        basic = {"Authorization": "Basic " + api.tokens[api.main]}
        assert api("GET", "/api/v1/webhooks", anonymous=True, headers=basic).status == 401
        assert api("GET", "/api/v1/webhooks").status == 200
        db("DELETE FROM outbox.api_tokens WHERE account_id = %s", (api.main,))
        assert api("GET", "/api/v1/webhooks").status == 401

    def test_healthz_and_metrics_need_no_token(self, api: Api) -> None:
        """The probes that orchestrators and Prometheus call work without a token."""
        assert api("GET", "/healthz", anonymous=True).json == {"status": "ok"}
        metrics = api("GET", "/metrics", anonymous=True)
        assert metrics.status == 200
        assert metrics.headers["Content-Type"].startswith("text/plain")

    def test_an_unknown_method_answers_405_in_the_error_shape(self, api: Api) -> None:
        """PUT is not PATCH: 405 with Allow, and the error shape."""
        answer = api("PUT", "/api/v1/webhooks", {})
        assert answer.status == 405
        assert answer.error[0] == "method_not_allowed"
        assert "POST" in answer.headers["Allow"]


class TestTokens:
    def test_cli_create_list_revoke(self, api: Api, db: SQL, server: Server) -> None:
        """`tokens create` prints only the token, which then works; `tokens list` shows
        ids and times but not the token; `tokens revoke` makes it fail."""
        env = server.sidecar.env
        account = f"acct_{uuid.uuid4().hex[:10]}"
        created = outbox("tokens", "create", "--account", account, env=env)
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        assert created.stdout == token + "\n" and token.startswith("obx_")
        assert token not in created.stderr
        assert api("GET", "/api/v1/webhooks", token=token).json == {"webhooks": []}

        listed = outbox("tokens", "list", "--account", account, "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert set(row) == {"id", "account_id", "operator", "created_at", "last_used_at"}
        assert row["operator"] is False
        assert row["last_used_at"] is not None
        assert token not in listed.stdout + listed.stderr

        revoked = outbox("tokens", "revoke", str(row["id"]), env=env)
        assert revoked.returncode == 0, revoked.stderr
        assert api("GET", "/api/v1/webhooks", token=token).status == 401
        assert (
            db.one("SELECT count(*) FROM outbox.api_tokens WHERE account_id = %s", (account,)) == 0
        )

    def test_cli_refuses_bad_input(self, server: Server, db: SQL) -> None:
        """An empty account, an unknown or non-numeric id: one line on stderr, exit 2,
        nothing written."""
        env = server.sidecar.env
        before = db.one("SELECT count(*) FROM outbox.api_tokens")
        empty = outbox("tokens", "create", "--account", "", env=env)
        assert empty.returncode == 2 and empty.stdout == ""
        assert "account_id" in empty.stderr and len(empty.stderr.splitlines()) == 1
        for bad in ("abc", "999999999"):
            refused = outbox("tokens", "revoke", bad, env=env)
            assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
        assert db.one("SELECT count(*) FROM outbox.api_tokens") == before

    def test_tokens_are_never_stored_in_clear(self, api: Api, db: SQL) -> None:
        """No token, nor any 12-character piece of one, is anywhere in the database,
        after creating and using it: only its SHA-256 is."""
        for account in (api.main, api.other):
            assert api("GET", "/api/v1/webhooks", account=account).status == 200
        everything = every_text_in_database(db)
        for token in api.tokens.values():
            secret_part = token.removeprefix(tokens.PREFIX)
            assert len(secret_part) >= 43
            for start in range(len(secret_part) - 11):
                assert secret_part[start : start + 12] not in everything
            digest = hashlib.sha256(token.encode()).digest()
            assert db.one(
                "SELECT count(*) FROM outbox.api_tokens WHERE token_sha256 = %s", (digest,)
            )


class TestIsolation:
    def test_another_accounts_things_answer_404_on_every_route(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """The other account's token sees nothing of main's: every route that takes an
        id answers 404, word for word as for an id that exists nowhere, and nothing
        changes or is sent."""
        hook, delivery = finished_delivery(db, api.main, receiver.url())
        before = owned_rows(db, api.main)
        for method, template, body in ROUTES:
            if "{" not in template:
                continue
            path = template.format(webhook=hook, delivery=delivery)
            answer = api(method, path, _send(body), account=api.other)
            assert answer.status == 404, (method, path, answer)
            assert answer.error[0] == "not_found"
            nowhere = template.format(webhook=10**15, delivery=10**15)
            absent = api(method, nowhere, _send(body), account=api.other)
            ours = hook if "{webhook}" in template else delivery
            assert absent.error[1].replace(str(10**15), "N") == answer.error[1].replace(
                str(ours), "N"
            )
        assert api("GET", "/api/v1/webhooks", account=api.other).json == {"webhooks": []}
        assert owned_rows(db, api.main) == before
        assert receiver.received() == []
        # The owner, by contrast, sees it.
        assert api("GET", f"/api/v1/webhooks/{hook}").status == 200

    def test_ids_that_are_not_numbers_answer_404(self, api: Api) -> None:
        """Not a number, zero, or past bigint: 404 like any unknown id, never 500."""
        for raw in ("abc", "0", "-1", "1.5", str(2**63), "%D9%A1", "1e3"):
            answer = api("GET", f"/api/v1/webhooks/{raw}")
            assert answer.status == 404, (raw, answer)
            assert answer.error[0] == "not_found"
            assert api("POST", f"/api/v1/deliveries/{raw}/retry").status == 404


class TestWebhooks:
    def test_create_read_change_delete(self, api: Api, db: SQL) -> None:
        """The whole life of a webhook, with has_secret instead of the secret."""
        created = api("POST", "/api/v1/webhooks", hook_body())
        assert created.status == 201, created
        hook = created.json
        assert hook["has_secret"] is True and "secret" not in hook
        assert created.headers["Location"] == f"/api/v1/webhooks/{hook['id']}"
        assert hook | {"id": 0, "created_at": "", "updated_at": ""} == {
            "id": 0,
            "name": "CRM Sync",
            "url": "https://example.com/webhooks",
            "event": "lead.scored",
            "format": "json",
            "enabled": True,
            "has_secret": True,
            "previous_secret_expires_at": None,
            "created_at": "",
            "updated_at": "",
            "last_delivery_status": None,
            "last_delivery_at": None,
            "last_error": None,
            "pending": 0,
            "retrying": 0,
            "last_attempt_at": None,
            "last_attempt_status": None,
            "last_attempt_error": None,
            "next_retry_at": None,
            "next_retry_attempt": None,
            "disabled_reason": None,
            "headers": {},
            "rate_limit": None,
            "failing_since": None,
            "failed_in_streak": 0,
        }
        stored = db("SELECT account_id, secret FROM outbox.webhooks WHERE id = %s", (hook["id"],))
        assert stored == [(api.main, SECRET)]
        path = f"/api/v1/webhooks/{hook['id']}"
        assert api("GET", path).json == hook
        assert api("GET", "/api/v1/webhooks").json == {"webhooks": [hook]}

        changed = api(
            "PATCH", path, {"name": "Renamed", "event": "reply.received", "enabled": False}
        )
        assert changed.status == 200, changed
        assert changed.json["name"] == "Renamed"
        assert changed.json["event"] == "reply.received"
        assert changed.json["enabled"] is False
        assert changed.json["has_secret"] is True
        assert changed.json["updated_at"] > hook["updated_at"]

        unsigned = api("PATCH", path, {"secret": None})
        assert unsigned.json["has_secret"] is False
        assert db.one("SELECT secret FROM outbox.webhooks WHERE id = %s", (hook["id"],)) is None
        resigned = api("PATCH", path, {"secret": OTHER_SECRET})
        assert resigned.json["has_secret"] is True
        assert resigned.json["previous_secret_expires_at"] is None
        assert api("PATCH", path, {}).json == resigned.json

        deleted = api("DELETE", path)
        assert deleted.status == 204 and deleted.body == b""
        assert api("GET", path).status == 404
        assert api("DELETE", path).status == 404
        assert [kind for kind, _ in owned_rows(db, api.main)] == ["token"]

    def test_a_rotated_secret_overlaps_until_patched_to_null(self, api: Api, db: SQL) -> None:
        """A new secret leaves the old one signing for 24 hours; null ends that at once."""
        hook = api("POST", "/api/v1/webhooks", hook_body()).json
        path = f"/api/v1/webhooks/{hook['id']}"
        rotated = api("PATCH", path, {"secret": OTHER_SECRET}).json
        expires = datetime.fromisoformat(rotated["previous_secret_expires_at"])
        assert timedelta(hours=23, minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=24)
        assert db.one(
            "SELECT previous_secret FROM outbox.webhooks WHERE id = %s", (hook["id"],)
        ) == (SECRET)
        ended = api("PATCH", path, {"previous_secret_expires_at": None})
        assert ended.status == 200, ended
        assert ended.json["previous_secret_expires_at"] is None
        assert (
            db.one("SELECT previous_secret FROM outbox.webhooks WHERE id = %s", (hook["id"],))
            is None
        )
        refused = api("PATCH", path, {"previous_secret_expires_at": "2030-01-01T00:00:00Z"})
        assert refused.status == 422 and "only be set to null" in refused.error[1]
        created = api(
            "POST", "/api/v1/webhooks", hook_body() | {"previous_secret_expires_at": None}
        )
        assert created.status == 422 and "unknown field" in created.error[1]

    def test_a_leaked_secret_is_replaced_with_no_overlap_in_one_request(
        self, api: Api, db: SQL
    ) -> None:
        """PATCH of a new secret with previous_secret_expires_at null: the old secret
        stops signing at once, the first rotation as the next."""
        hook = api("POST", "/api/v1/webhooks", hook_body()).json
        path = f"/api/v1/webhooks/{hook['id']}"
        for secret in (OTHER_SECRET, SECRET):
            changed = api("PATCH", path, {"secret": secret, "previous_secret_expires_at": None})
            assert changed.status == 200, changed
            assert changed.json["previous_secret_expires_at"] is None
            assert db.one(
                "SELECT (secret, previous_secret) FROM outbox.webhooks WHERE id = %s",
                (hook["id"],),
            ) == (secret, None)

    def test_format_on_create_and_change(self, api: Api, db: SQL) -> None:
        """format is json by default, follows a Slack or Discord URL when left out,
        changes by PATCH; a bad one is 422 naming the valid ones and changes nothing."""
        plain = api("POST", "/api/v1/webhooks", hook_body()).json
        assert plain["format"] == "json"
        slack_url = "https://hooks.slack.com/services/T0/B0/secret"
        slack = api("POST", "/api/v1/webhooks", hook_body(url=slack_url)).json
        assert slack["format"] == "slack"
        chosen = api("POST", "/api/v1/webhooks", hook_body(format="discord")).json
        assert chosen["format"] == "discord"
        path = f"/api/v1/webhooks/{plain['id']}"
        assert api("PATCH", path, {"format": "slack"}).json["format"] == "slack"
        assert api("GET", path).json["format"] == "slack"
        for body, status in ((hook_body(format="teams"), 422), (hook_body(format=3), 422)):
            answer = api("POST", "/api/v1/webhooks", body)
            assert answer.status == status, answer
        bad = api("PATCH", path, {"format": "Slack"})
        assert bad.status == 422
        assert bad.error == ("invalid", "format must be json, slack or discord, not 'Slack'")
        assert api("GET", path).json["format"] == "slack"
        assert api("PATCH", path, {"format": None}).status == 422

    def test_the_event_catalogue(self, api: Api) -> None:
        """Every wire name with its display name, in catalogue order."""
        events = api("GET", "/api/v1/events").json["events"]
        assert [(e["name"], e["display_name"]) for e in events] == list(EVENTS.items())

    def test_status_fields_follow_deliveries(self, api: Api, db: SQL, receiver: Receiver) -> None:
        """The webhook object carries section 4's status: last status, time, reason."""
        receiver.respond = lambda _: Reply(503)
        hook = api("POST", "/api/v1/webhooks", hook_body(url=receiver.url())).json
        db.emit(api.main)
        path = f"/api/v1/webhooks/{hook['id']}"
        failed = wait_until(
            lambda: (w := api("GET", path).json)["last_delivery_status"] == "failed" and w,
            what="the delivery to fail",
        )
        assert failed["last_error"] == "HTTP 503" and failed["pending"] == 0
        assert failed["last_delivery_at"] is not None
        receiver.respond = lambda _: Reply(200)
        db.emit(api.main)
        succeeded = wait_until(
            lambda: (w := api("GET", path).json)["last_delivery_status"] == "succeeded" and w,
            what="the delivery to succeed",
        )
        assert succeeded["last_error"] is None

    def test_create_breaking_a_rule_is_422_naming_it(self, api: Api, db: SQL) -> None:
        """The database's rules, answered 422 with a message naming the rule (https,
        the valid events, 16, name); nothing is written."""
        cases = [
            (hook_body(url="http://example.com/h"), "https"),
            (hook_body(url="https://"), "https"),
            (hook_body(url="https://exa mple.com"), "https"),
            (hook_body(event="lead.deleted"), "valid events are lead.created, lead.scored"),
            (hook_body(event=""), "valid events are"),
            (hook_body(secret="short"), "16"),
            (hook_body(secret="0123456789abcde"), "at least 16 characters"),
            (hook_body(name=""), "name"),
            (hook_body(name="   "), "name must not be empty"),
            ({"url": "https://example.com/h", "event": "lead.scored"}, "name is required"),
            (hook_body(url=None), "url is required"),
            (hook_body(name=5), "name must be a string"),
            (hook_body(secret=["a" * 20]), "secret must be a string"),
            (hook_body(enabled="yes"), "enabled must be true or false"),
            (hook_body(name="a\x00b"), "NUL"),
            (hook_body(name="\ud800"), "Unicode"),
            (hook_body(colour="blue"), "unknown field 'colour'"),
            (hook_body(account_id=api.other), "unknown field 'account_id'"),
        ]
        for body, named in cases:
            answer = api("POST", "/api/v1/webhooks", body)
            assert answer.status == 422, (body, answer)
            code, message = answer.error
            assert code == "invalid" and named in message, (body, message)
        assert [kind for kind, _ in owned_rows(db, api.main)] == ["token"]
        assert [kind for kind, _ in owned_rows(db, api.other)] == ["token"]

    def test_change_breaking_a_rule_is_422_and_changes_nothing(self, api: Api, db: SQL) -> None:
        """A PATCH that breaks a rule leaves every field as it was."""
        hook = db.webhook("https://example.com/h", account=api.main)
        before = owned_rows(db, api.main)
        cases = [
            ({"url": "ftp://example.com"}, "https"),
            ({"event": "everything"}, "valid events are"),
            ({"secret": "0123456789abcde"}, "16"),
            ({"name": ""}, "name"),
            ({"name": None}, "name must not be null"),
            ({"enabled": None}, "enabled"),
            ({"id": 7}, "unknown field 'id'"),
            ({"name": "fine", "url": "http://example.com"}, "https"),
        ]
        for body, named in cases:
            answer = api("PATCH", f"/api/v1/webhooks/{hook}", body)
            assert answer.status == 422, (body, answer)
            assert named in answer.error[1], (body, answer.error)
        assert owned_rows(db, api.main) == before

    def test_the_eleventh_webhook_is_409_saying_the_limit(self, api: Api, db: SQL) -> None:
        """Ten per account; the eleventh is refused with 409, and not written."""
        for n in range(10):
            assert api("POST", "/api/v1/webhooks", hook_body(name=f"h{n}")).status == 201
        answer = api("POST", "/api/v1/webhooks", hook_body(name="h10"))
        assert answer.status == 409
        code, message = answer.error
        assert code == "limit_reached" and "10" in message and "limit" in message
        count = "SELECT count(*) FROM outbox.webhooks WHERE account_id = %s"
        assert db.one(count, (api.main,)) == 10
        # Another account is not affected by this one's limit.
        assert api("POST", "/api/v1/webhooks", hook_body(), account=api.other).status == 201

    def test_malformed_json_is_400(self, api: Api, db: SQL) -> None:
        """A body that is not a JSON object: 400 bad_request, nothing written."""
        hook = db.webhook("https://example.com/h", account=api.main)
        before = owned_rows(db, api.main)
        for raw in (b'{"name": "x"', b"not json", b"[1, 2]", b'"a string"', b"\xff\xfe{", b"{,}"):
            for method, path in (
                ("POST", "/api/v1/webhooks"),
                ("PATCH", f"/api/v1/webhooks/{hook}"),
                ("POST", f"/api/v1/webhooks/{hook}/test"),
                ("POST", f"/api/v1/webhooks/{hook}/recover"),
            ):
                answer = api(method, path, raw=raw)
                assert answer.status == 400, (raw, method, path, answer)
                assert answer.error[0] == "bad_request"
        assert api("POST", "/api/v1/webhooks", raw=b"").status == 400
        assert owned_rows(db, api.main) == before

    def test_json_nested_too_deep_is_400(self, api: Api, db: SQL, receiver: Receiver) -> None:
        """A body nested too deep to parse is bad JSON like any other, on every route
        that reads one: 400 bad_request saying so, nothing written or sent."""
        hook = db.webhook(receiver.url(), account=api.main)
        before = owned_rows(db, api.main)
        for raw in DEEP_JSON:
            for method, template in JSON_ROUTES:
                path = template.format(webhook=hook)
                answer = api(method, path, raw=raw)
                assert answer.status == 400, (method, path, answer)
                assert answer.error == (
                    "bad_request",
                    "the body is not valid JSON: nested too deeply",
                )
        assert owned_rows(db, api.main) == before
        assert receiver.received() == []
        assert api("GET", "/healthz", anonymous=True).status == 200

    def test_a_body_over_the_cap_is_413(self, api: Api, db: SQL) -> None:
        """A 1 MB body is refused, with or without a Content-Length, and nothing of it
        reaches the database."""
        big = json.dumps(hook_body(name="x" * 1_000_000)).encode()
        answer = api("POST", "/api/v1/webhooks", raw=big)
        assert answer.status == 413 and answer.error[0] == "too_large"
        hook = db.webhook("https://example.com/h", account=api.main)
        before = owned_rows(db, api.main)
        assert api("PATCH", f"/api/v1/webhooks/{hook}", raw=big).status == 413

        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        conn.request(
            "POST",
            "/api/v1/webhooks",
            body=iter([big[:40_000], big[40_000:80_000]]),
            headers={"Authorization": f"Bearer {api.tokens[api.main]}"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413, response.read()
        conn.close()
        assert owned_rows(db, api.main) == before


class TestSecrets:
    def test_secrets_are_in_no_response_and_no_log_line(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """Create with a secret, rotate it, list, read, test-send, deliver: neither
        secret appears in any answer or in the sidecar's log."""
        hook = api("POST", "/api/v1/webhooks", hook_body(url=receiver.url())).json
        path = f"/api/v1/webhooks/{hook['id']}"
        api("GET", path)
        api("GET", "/api/v1/webhooks")
        api("PATCH", path, {"secret": OTHER_SECRET})
        api("PATCH", path, {"secret": "too short"})
        assert api("POST", f"{path}/test", {}).json["ok"] is True
        db.emit(api.main)
        wait_until(lambda: api("GET", path).json["last_delivery_status"] == "succeeded")
        api("GET", f"{path}/deliveries")
        api("POST", "/api/v1/webhooks", hook_body(secret="x" * 15))
        assert len(api.answers) >= 9
        for answer in api.answers:
            assert SECRET.encode() not in answer.body and OTHER_SECRET.encode() not in answer.body
            assert b'"secret"' not in answer.body
        log = api.sidecar.log()
        assert f'"webhook_id": {hook["id"]}' in log
        assert SECRET not in log and OTHER_SECRET not in log
        # The receiver did get signatures made with the rotated secret.
        got = receiver.received()[-1]
        expected = hmac.new(OTHER_SECRET.encode(), got.body, hashlib.sha256).hexdigest()
        assert got.headers["X-Webhook-Signature"] == "sha256=" + expected


class TestSendTestPayload:
    def test_to_a_2xx_target(self, api: Api, db: SQL, receiver: Receiver) -> None:
        """One signed sample of the webhook's event, flagged as a test, answered with
        the outcome; nothing is recorded as a delivery."""
        hook = api("POST", "/api/v1/webhooks", hook_body(url=receiver.url())).json
        answer = api("POST", f"/api/v1/webhooks/{hook['id']}/test")
        assert answer.status == 200
        result = answer.json
        assert result["ok"] is True and result["status"] == 200 and result["error"] is None
        assert isinstance(result["duration_ms"], int) and result["duration_ms"] >= 0
        (got,) = receiver.received()
        assert got.headers["X-Webhook-Test"] == "true"
        assert got.headers["X-Webhook-Event"] == "lead.scored"
        signed = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
        assert got.headers["X-Webhook-Signature"] == "sha256=" + signed
        payload = json.loads(got.body)
        assert payload["event"] == "lead.scored" and payload["data"]
        assert [kind for kind, _ in owned_rows(db, api.main)] == ["token", "webhook"]

        other = api("POST", f"/api/v1/webhooks/{hook['id']}/test", {"event": "meeting.booked"})
        assert other.json["ok"] is True
        assert receiver.received()[-1].headers["X-Webhook-Event"] == "meeting.booked"
        assert "meeting" in json.loads(receiver.received()[-1].body)["data"]

    def test_in_the_webhooks_format(self, api: Api, db: SQL, receiver: Receiver) -> None:
        """A Slack webhook's test send is a Slack message that a Slack-like endpoint
        takes; signed over the body as sent."""
        receiver.chat = "slack"
        body = hook_body(url=receiver.url(), event="reply.received", format="slack")
        hook = api("POST", "/api/v1/webhooks", body).json
        answer = api("POST", f"/api/v1/webhooks/{hook['id']}/test")
        assert answer.json["ok"] is True, (answer, receiver.refusals)
        (got,) = receiver.received()
        message = json.loads(got.body)
        assert message["text"].startswith("Maren Okafor replied: “Timing is good")
        assert message["blocks"][0]["text"]["text"] == "Reply Received: Maren Okafor"
        signed = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
        assert got.headers["X-Webhook-Signature"] == "sha256=" + signed

    def test_to_a_5xx_target_is_one_request_and_no_retry(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """The target's failure is the answer's content, not the answer's status; it is
        tried once and never again."""
        receiver.respond = lambda _: Reply(503)
        hook = api("POST", "/api/v1/webhooks", hook_body(url=receiver.url())).json
        answer = api("POST", f"/api/v1/webhooks/{hook['id']}/test", {})
        assert answer.status == 200
        assert answer.json | {"duration_ms": 0} == {
            "ok": False,
            "status": 503,
            "duration_ms": 0,
            "error": "HTTP 503",
        }
        time.sleep(0.5)  # longer than the sidecar's whole retry schedule
        assert len(receiver.received()) == 1
        assert (
            db.one("SELECT count(*) FROM outbox.deliveries WHERE webhook_id = %s", (hook["id"],))
            == 0
        )

    def test_an_unknown_event_is_422_and_sends_nothing(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        hook = db.webhook(receiver.url(), account=api.main)
        answer = api("POST", f"/api/v1/webhooks/{hook}/test", {"event": "lead.deleted"})
        assert answer.status == 422 and "valid events are" in answer.error[1]
        assert api("POST", f"/api/v1/webhooks/{hook}/test", {"evnt": "x"}).status == 422
        assert api("POST", f"/api/v1/webhooks/{hook}/test", {"event": 3}).status == 422
        assert receiver.received() == []

    def test_uses_the_ssrf_guard_of_deliveries_without_naming_the_address(
        self, sidecars: Callable[..., Sidecar], sql: SQL, receiver: Receiver
    ) -> None:
        """Without OUTBOX_ALLOW_PRIVATE_TARGETS a loopback target is refused, as it is
        for real deliveries; the tenant is not told the address its host resolved to
        (the operator's log is)."""
        sidecar = sidecars(OUTBOX_ALLOW_PRIVATE_TARGETS="false")
        guarded = new_api(sidecar, sql)
        for host in ("127.0.0.1", "localhost"):
            url = receiver.url().replace("127.0.0.1", host)
            hook = sql.webhook(url, account=guarded.main)
            result = guarded("POST", f"/api/v1/webhooks/{hook}/test").json
            assert result["ok"] is False and result["status"] is None
            assert result["error"] == "blocked: not a public address"
        assert receiver.received() == []

        def sent(line: dict[str, Any]) -> bool:
            return line.get("event") == "api: test payload sent"

        # Log lines are written once the event loop has a moment, maybe after the answer.
        logged = wait_until(
            lambda: (
                len(errors := [line["error"] for line in sidecar.log_lines() if sent(line)]) == 2
                and errors
            ),
            what="the two test sends' log lines",
        )
        assert logged[0] == "blocked: 127.0.0.1 is not a public address"
        assert logged[1] in (
            "blocked: 127.0.0.1 is not a public address",
            "blocked: ::1 is not a public address",
        )

    def test_one_at_a_time_per_webhook_else_429(
        self, api: Api, db: SQL, receiver: Receiver, black_hole: BlackHole
    ) -> None:
        """While a test send to a webhook waits for its answer, another to the same
        webhook is 429 with Retry-After (at most the time the first has left); other
        webhooks are not held up, and once the first is done the next one goes."""
        stuck = api("POST", "/api/v1/webhooks", hook_body(url=black_hole.url())).json
        other = api("POST", "/api/v1/webhooks", hook_body(url=receiver.url())).json
        first: list[Answer] = []
        sending = threading.Thread(
            target=lambda: first.append(api("POST", f"/api/v1/webhooks/{stuck['id']}/test"))
        )
        sending.start()
        try:
            wait_until(lambda: black_hole.connections() == 1, what="the first test send")
            second = api("POST", f"/api/v1/webhooks/{stuck['id']}/test")
            assert second.status == 429
            assert 1 <= int(second.headers["Retry-After"]) <= 2  # OUTBOX_HTTP_TIMEOUT
            code, message = second.error
            assert code == "rate_limited"
            assert message.startswith("a test send to this webhook is still in flight")
            assert api("POST", f"/api/v1/webhooks/{other['id']}/test").json["ok"] is True
        finally:
            sending.join(30)
        assert first[0].status == 200 and first[0].json["error"] == "timeout after 2s"
        api("PATCH", f"/api/v1/webhooks/{stuck['id']}", {"url": receiver.url("/fixed")})
        assert api("POST", f"/api/v1/webhooks/{stuck['id']}/test").json["ok"] is True
        assert len(receiver.received("/fixed")) == 1

    def test_ten_a_minute_per_account_else_429(self, api: Api, db: SQL, receiver: Receiver) -> None:
        """The eleventh test send of an account within a minute is 429 with Retry-After
        and sends nothing; another account's test sends still go."""
        hooks = [
            db.webhook(receiver.url(f"/{n}"), account=api.main, name=f"h{n}") for n in range(3)
        ]
        for n in range(10):
            assert api("POST", f"/api/v1/webhooks/{hooks[n % 3]}/test").json["ok"] is True
        eleventh = api("POST", f"/api/v1/webhooks/{hooks[0]}/test")
        assert eleventh.status == 429
        retry_after = int(eleventh.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert eleventh.error == (
            "rate_limited",
            f"at most 10 test sends a minute per account; try again in {retry_after} s",
        )
        assert len(receiver.received()) == 10
        theirs = db.webhook(receiver.url("/theirs"), account=api.other)
        assert api("POST", f"/api/v1/webhooks/{theirs}/test", account=api.other).status == 200
        assert len(receiver.received("/theirs")) == 1


def _samples(api: Api) -> dict[str, float]:
    values = {}
    for line in api("GET", "/metrics", anonymous=True).body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class TestMetrics:
    def test_counters_move_after_deliveries(self, api: Api, db: SQL, receiver: Receiver) -> None:
        """Deliveries, attempts and their durations count up by what happened; the
        claim histogram reports; the dispatcher says it is up."""
        before = wait_until(
            lambda: (m := _samples(api))["outbox_dispatcher_up"] == 1 and m,
            what="the dispatcher's first claim",
        )
        receiver.respond = lambda r: Reply(500 if b'"fail"' in r.body else 200)
        hook = db.webhook(receiver.url(), account=api.main)
        db.emit(api.main, data={"n": 1})
        db.emit(api.main, data={"n": 2})
        db.emit(api.main, data={"fail": True})
        wait_until(
            lambda: (
                db.one(
                    "SELECT count(*) FROM outbox.deliveries"
                    " WHERE webhook_id = %s AND status <> 'pending'",
                    (hook,),
                )
                == 3
            ),
            what="every delivery to finish",
        )
        after = _samples(api)

        def moved(name: str) -> float:
            return after[name] - before[name]

        assert moved('outbox_deliveries_total{outcome="succeeded"}') == 2
        assert moved('outbox_deliveries_total{outcome="failed"}') == 1
        assert moved('outbox_attempts_total{outcome="succeeded"}') == 2
        assert moved('outbox_attempts_total{outcome="retrying"}') == 3
        assert moved('outbox_attempts_total{outcome="failed"}') == 1
        assert moved("outbox_attempt_duration_seconds_count") == 6
        assert moved("outbox_attempt_duration_seconds_sum") > 0
        assert moved("outbox_claim_batch_size_count") >= 1
        assert after["outbox_dispatcher_up"] == 1

    @pytest.mark.slow
    def test_pending_gauges_read_the_database(
        self, sidecars: Callable[..., Sidecar], sql: SQL
    ) -> None:
        """Pending deliveries anywhere in the database show, with the oldest one's age,
        within the few seconds between two reads."""
        api = new_api(sidecars(), sql)
        assert _samples(api)["outbox_pending_deliveries"] == 0
        assert _samples(api)["outbox_oldest_pending_age_seconds"] == 0
        hook = sql.webhook("https://example.com/h", account=api.main, enabled=False)
        event = sql.emit(api.main)
        sql(
            "INSERT INTO outbox.deliveries (event_id, webhook_id, next_attempt_at, created_at)"
            " VALUES (%s, %s, now() + interval '1 hour', now() - interval '90 seconds')",
            (event, hook),
        )
        values = wait_until(
            lambda: (m := _samples(api))["outbox_pending_deliveries"] == 1 and m,
            what="the backlog gauges' next read",
        )
        assert 90 <= values["outbox_oldest_pending_age_seconds"] < 120
