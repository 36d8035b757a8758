"""End to end: Slack and Discord webhooks, delivered by real `outbox run` processes to a
real HTTPS receiver that checks each body as Slack's or Discord's endpoint does."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import standardwebhooks

from outbox.events import EVENTS, sample
from tests.chat import escape_error
from tests.conftest import SQL, Sidecar, call_outbox, sidecar_environment, wait_until
from tests.receiver import Receiver

# Not base64 after whsec_, so every library keys with its UTF-8 bytes.
SECRET = "whsec_test_secret_0123"
Start = Callable[..., Sidecar]
HOSTILE = (
    "<!channel> <!here> <@U0123> <#C1|general> <https://evil.example|click me> "
    "@everyone @here [free money](https://evil.example) **bold** `code` ||spoiler|| "
    "# heading\n> quote\n- list\n1. list\n&amp; & < > \\ 😀 👩‍👩‍👧‍👦 e\u0301 שלום "
)


def hostile(value: Any, times: int) -> Any:
    """``value`` with every string made hostile and ``times`` as long."""
    if isinstance(value, dict):
        return {k: hostile(v, times) for k, v in value.items()}
    if isinstance(value, list):
        return [hostile(v, times) for v in value]
    if isinstance(value, str):
        return (HOSTILE + value + " ") * times
    return value


def hostile_sample(event: str) -> dict[str, Any]:
    """The event's sample made hostile, as long as data may be (256 KiB)."""
    times = 40
    while len(json.dumps(data := hostile(sample(event), times)).encode()) > 262144:
        times -= 5
    result: dict[str, Any] = data
    return result


def wrong_types(event: str) -> dict[str, Any]:
    """The sample's top-level objects as bare strings and numbers as strings."""
    return {
        key: ("87" if key == "score" else HOSTILE)
        for key in sample(event)
        if key not in ("conversation", "web_intelligence")
    } | {"lead": {"name": None, "username": HOSTILE, "headline": 42}}


def webhook(sql: SQL, url: str, event: str, fmt: str | None, account: str = "acct_1") -> int:
    """A webhook as SQL users make one; ``fmt`` None leaves the format to the URL."""
    columns = "account_id, name, url, event, secret" + (", format" if fmt else "")
    values = [account, f"{fmt} {event}", url, event, SECRET] + ([fmt] if fmt else [])
    marks = ", ".join(["%s"] * len(values))
    return int(
        sql.one(f"INSERT INTO outbox.webhooks ({columns}) VALUES ({marks}) RETURNING id", values)
    )


def emit(sql: SQL, account: str, event: str, data: dict[str, Any]) -> None:
    raw = json.dumps(data)
    assert len(raw.encode()) <= 262144
    sql.one("SELECT outbox.emit(%s, %s, %s::jsonb)", (account, event, raw))


def statuses(sql: SQL) -> dict[str, int]:
    rows = sql("SELECT status, count(*) FROM outbox.deliveries GROUP BY status")
    return {status: int(count) for status, count in rows}


class TestPlainJsonToSlack:
    def test_a_slack_endpoint_refuses_the_json_body(
        self, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """What a new user saw: the JSON body to a Slack-like endpoint is 400 no_text on
        every attempt, and the status says HTTP 400."""
        receiver.chat = "slack"
        webhook(sql, receiver.url("/slack"), "reply.received", "json")
        sidecars()
        emit(sql, "acct_1", "reply.received", sample("reply.received"))
        wait_until(lambda: statuses(sql) == {"failed": 1}, what="the delivery to fail")
        assert set(receiver.refusals) == {"no_text"}
        assert len(receiver.refusals) == 4
        error = sql.one("SELECT last_error FROM outbox.webhook_status")
        assert error == "HTTP 400"


class TestChatDeliveries:
    @pytest.mark.parametrize("fmt", ["slack", "discord"])
    def test_every_event_sample_and_hostile_data_are_accepted(
        self, fmt: str, sql: SQL, receiver: Receiver, sidecars: Start
    ) -> None:
        """Each event's sample, its hostile twin (mentions, link syntax, markdown,
        emoji, near 256 KiB of text) and a wrong-typed version reach a receiver that checks
        like the service: all 200, signed over the body as sent, nothing unescaped."""
        receiver.chat = fmt
        for event in EVENTS:
            webhook(sql, receiver.url(f"/{fmt}/{event}"), event, fmt)
        sidecars()
        for event in EVENTS:
            emit(sql, "acct_1", event, sample(event))
            emit(sql, "acct_1", event, hostile_sample(event))
            emit(sql, "acct_1", event, wrong_types(event))
        total = 3 * len(EVENTS)
        wait_until(
            lambda: statuses(sql).get("pending", 0) == 0 and sum(statuses(sql).values()) == total,
            timeout=60,
            what="every delivery to finish",
        )
        assert receiver.refusals == []
        assert statuses(sql) == {"succeeded": total}
        got = receiver.received()
        assert len(got) == total
        verifier = standardwebhooks.Webhook(SECRET.encode())
        for request in got:
            event = request.path.rsplit("/", 1)[1]
            assert request.headers["X-Webhook-Event"] == event
            assert request.headers["Content-Type"] == "application/json"
            signed = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
            assert request.headers["X-Webhook-Signature"] == "sha256=" + signed
            verifier.verify(request.body, request.headers)
            message = json.loads(request.body)
            assert escape_error(fmt, message) is None
            assert "data" not in message

    def test_the_url_chooses_the_format(self, sql: SQL) -> None:
        """Created without a format, a Slack or Discord webhook URL gets its format."""
        urls = {
            "https://hooks.slack.com/services/T0/B0/x": "slack",
            "https://discord.com/api/webhooks/1/abc": "discord",
            "https://example.com/hook": "json",
        }
        for url, fmt in urls.items():
            hook = webhook(sql, url, "lead.scored", None)
            assert sql.one("SELECT format FROM outbox.webhooks WHERE id = %s", (hook,)) == fmt


@pytest.fixture
def outbox(database_url: str, ca_file: str):  # type: ignore[no-untyped-def]
    env = sidecar_environment(database_url, ca_file)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return call_outbox(env, *args)

    return run


class TestCommands:
    def test_format_on_add_update_list_and_test(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL, receiver: Receiver
    ) -> None:
        """--format on add and update; list shows it (also --json); a test send goes in
        the webhook's format and passes the service's checks."""
        receiver.chat = "discord"
        added = outbox(
            "webhooks", "add", "--account", "acct_1", "--name", "Deals", "--url",
            receiver.url("/discord"), "--event", "meeting.booked", "--secret", SECRET,
            "--format", "discord",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        hook = added.stdout.strip()
        listed = outbox("webhooks", "list", "--account", "acct_1")
        assert listed.stdout.splitlines()[0].split()[:4] == ["id", "name", "event", "format"]
        assert "discord" in listed.stdout.splitlines()[1]

        tested = outbox("webhooks", "test", hook)
        assert tested.returncode == 0, (tested.stdout, receiver.refusals)
        (got,) = receiver.received()
        message = json.loads(got.body)
        assert "Meeting booked with Maren Okafor" in message["content"]
        assert got.headers["X-Webhook-Test"] == "true"
        standardwebhooks.Webhook(SECRET.encode()).verify(got.body, got.headers)

        assert outbox("webhooks", "update", hook, "--format", "slack").returncode == 0
        (row,) = json.loads(outbox("webhooks", "list", "--account", "acct_1", "--json").stdout)
        assert row["format"] == "slack"
        receiver.chat = "slack"
        assert outbox("webhooks", "test", hook, "--event", "lead.scored").returncode == 0
        assert json.loads(receiver.received()[-1].body)["text"].startswith("Maren Okafor scored")

    def test_a_bad_format_is_refused_naming_the_valid_ones(  # type: ignore[no-untyped-def]
        self, outbox, sql: SQL
    ) -> None:
        """One line on stderr naming json, slack and discord; exit 2; nothing written."""
        added = outbox(
            "webhooks", "add", "--account", "acct_1", "--name", "x", "--url",
            "https://example.com/h", "--event", "lead.scored", "--format", "teams",
        )  # fmt: skip
        assert added.returncode == 2
        assert added.stderr == "outbox: format must be json, slack or discord, not 'teams'\n"
        assert sql.one("SELECT count(*) FROM outbox.webhooks") == 0
