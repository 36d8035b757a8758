"""A webhook's own headers and rate limit through the API and the CLI (CONTRACT
sections 9, 7, 18 and 19): set, shown masked, changed, refused with the rule named."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import SQL, wait_until
from tests.e2e import test_api as shared
from tests.e2e.test_api import Api, Server, hook_body, outbox, owned_rows
from tests.receiver import Receiver, Reply

# The fixtures of test_api.py: a sidecar and database for this module, two accounts a test.
server = shared.server
api = shared.api
db = shared.db

TOKEN = "Bearer crm-api-token-0123456789"
KEY = "key-0123456789-abcdef"


def stored(db: SQL, hook: int) -> tuple[Any, ...]:
    rows = db("SELECT headers, rate_limit FROM outbox.webhooks WHERE id = %s", (hook,))
    assert len(rows) == 1
    return rows[0]


class TestApi:
    def test_create_shows_names_and_keeps_values(self, api: Api, db: SQL) -> None:
        """Headers and rate_limit are taken on create; the answer shows each header with
        "***" for its value, as every later read does; the values are stored."""
        created = api(
            "POST",
            "/api/v1/webhooks",
            hook_body(headers={"Authorization": TOKEN, "X-Api-Key": KEY}, rate_limit=5),
        )
        assert created.status == 201, created
        hook = created.json
        assert hook["headers"] == {"Authorization": "***", "X-Api-Key": "***"}
        assert hook["rate_limit"] == 5
        assert stored(db, hook["id"]) == ({"Authorization": TOKEN, "X-Api-Key": KEY}, 5)
        path = f"/api/v1/webhooks/{hook['id']}"
        assert api("GET", path).json == hook
        assert api("GET", "/api/v1/webhooks").json["webhooks"] == [hook]
        plain = api("POST", "/api/v1/webhooks", hook_body()).json
        assert plain["headers"] == {} and plain["rate_limit"] is None
        for answer in api.answers:
            assert TOKEN.encode() not in answer.body and KEY.encode() not in answer.body

    def test_change_by_name_keeps_the_others(self, api: Api, db: SQL) -> None:
        """PATCH sets the headers it names (in any case), removes those given null, keeps
        the rest; headers null removes all; rate_limit changes and null removes it."""
        hook = api(
            "POST",
            "/api/v1/webhooks",
            hook_body(headers={"Authorization": TOKEN, "X-Api-Key": KEY, "X-Team": "a"}),
        ).json
        path = f"/api/v1/webhooks/{hook['id']}"
        changed = api(
            "PATCH",
            path,
            {
                "headers": {"authorization": "Bearer new", "X-Api-Key": None, "X-New": "n"},
                "rate_limit": 2,
            },
        )
        assert changed.status == 200, changed
        assert changed.json["headers"] == {"authorization": "***", "X-New": "***", "X-Team": "***"}
        assert stored(db, hook["id"]) == (
            {"authorization": "Bearer new", "X-New": "n", "X-Team": "a"},
            2,
        )
        # A change of something else leaves both alone.
        api("PATCH", path, {"name": "Renamed"})
        assert stored(db, hook["id"])[1] == 2
        cleared = api("PATCH", path, {"headers": None, "rate_limit": None})
        assert cleared.status == 200, cleared
        assert (cleared.json["headers"], cleared.json["rate_limit"]) == ({}, None)
        assert stored(db, hook["id"]) == ({}, None)

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            (
                {"headers": {"Host": "evil.example"}},
                "headers: Host is set by outbox itself and cannot be given",
            ),
            (
                {"headers": {"X-Webhook-Signature": "sha256=0"}},
                "headers: X-Webhook-Signature is set by outbox itself and cannot be given",
            ),
            (
                {"headers": ["Authorization: x"]},
                "headers must be a JSON object of header names to values, not array",
            ),
            ({"headers": {"X-Key": 1}}, "headers: the value of X-Key must be a string, not number"),
            (
                {"headers": {"X-Key": "a\nb"}},
                "headers: the value of X-Key may have only printable ASCII characters"
                " (no line breaks or other control characters)",
            ),
            (
                {"headers": {"Authorization": "***"}},
                "headers: the value of Authorization is '***', which is how values are shown,"
                " not a value: give the value itself, or leave the header out to keep its value",
            ),
            (
                {"headers": {f"X-H{i}": "v" for i in range(11)}},
                "headers has 11 headers; the limit is 10",
            ),
            (
                {"rate_limit": 0},
                "rate_limit must be at least 1 (attempts per second), or null for no limit",
            ),
            (
                {"rate_limit": 2.5},
                "rate_limit must be a whole number of attempts per second, at most 2147483647,"
                " or null for no limit",
            ),
            (
                {"rate_limit": "5"},
                "rate_limit must be a whole number of attempts per second, at most 2147483647,"
                " or null for no limit",
            ),
            (
                {"rate_limit": True},
                "rate_limit must be a whole number of attempts per second, at most 2147483647,"
                " or null for no limit",
            ),
            (
                {"rate_limit": 2**31},
                "rate_limit must be a whole number of attempts per second, at most 2147483647,"
                " or null for no limit",
            ),
        ],
    )
    def test_breaking_a_rule_is_422_naming_it(
        self, api: Api, db: SQL, fields: dict[str, Any], message: str
    ) -> None:
        """On create and on change: 422 with the rule's words; nothing is written."""
        created = api("POST", "/api/v1/webhooks", hook_body(**fields))
        assert created.status == 422, created
        assert created.error == ("invalid", message)
        hook = api("POST", "/api/v1/webhooks", hook_body(rate_limit=3))
        before = owned_rows(db, api.main)
        changed = api("PATCH", f"/api/v1/webhooks/{hook.json['id']}", fields)
        assert changed.status == 422, changed
        assert changed.error == ("invalid", message)
        assert owned_rows(db, api.main) == before

    def test_test_sends_and_deliveries_carry_the_headers_and_the_log_masks_them(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """A receiver that checks a Bearer credential takes the test send and the
        delivery; the delivery log shows the header as Authorization: ***."""
        receiver.respond = lambda got: Reply(
            200 if got.headers.get("Authorization") == TOKEN else 401
        )
        hook = api(
            "POST",
            "/api/v1/webhooks",
            hook_body(url=receiver.url(), headers={"Authorization": TOKEN}),
        ).json
        path = f"/api/v1/webhooks/{hook['id']}"
        test = api("POST", f"{path}/test")
        assert test.json["ok"] is True, test.json
        assert receiver.received()[-1].headers["X-Webhook-Test"] == "true"
        db.emit(api.main)
        wait_until(lambda: api("GET", path).json["last_delivery_status"] == "succeeded")
        [delivery] = api("GET", f"{path}/deliveries").json["deliveries"]
        [attempt] = delivery["attempt_log"]
        assert attempt["response_status"] == 200
        assert attempt["request"]["headers"]["Authorization"] == "***"
        assert TOKEN.encode() not in api.answers[-1].body
        assert TOKEN not in api.sidecar.log()


class TestCli:
    def test_add_list_update(self, server: Server, db: SQL) -> None:
        """--header and --rate-limit on add; list shows names only; update replaces a
        header by name, --no-headers and --no-rate-limit remove them."""
        env = server.sidecar.env
        account = "acct_cli_limits"
        added = outbox(
            "webhooks", "add", "--account", account, "--name", "CRM", "--event", "lead.scored",
            "--url", "https://crm.example.com/in", "--header", f"Authorization: {TOKEN}",
            "--header", f"X-Api-Key:{KEY}", "--rate-limit", "5",
            env=env,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        hook = int(added.stdout)
        assert stored(db, hook) == ({"Authorization": TOKEN, "X-Api-Key": KEY}, 5)

        listed = outbox("webhooks", "list", "--account", account, env=env)
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split()[-2:] == ["rate_limit", "headers"]
        assert row.split()[-2:] == ["5", "Authorization,X-Api-Key"]
        as_json = outbox("webhooks", "list", "--account", account, "--json", env=env)
        [shown] = json.loads(as_json.stdout)
        assert shown["headers"] == {"Authorization": "***", "X-Api-Key": "***"}
        assert shown["rate_limit"] == 5
        assert TOKEN not in listed.stdout + as_json.stdout
        assert KEY not in listed.stdout + as_json.stdout

        changed = outbox(
            "webhooks", "update", str(hook), "--header", "authorization: Bearer new",
            "--no-rate-limit",
            env=env,
        )  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        assert stored(db, hook) == ({"authorization": "Bearer new", "X-Api-Key": KEY}, None)
        replaced = outbox(
            "webhooks", "update", str(hook), "--no-headers", "--header", "X-Only: 1",
            "--rate-limit", "7",
            env=env,
        )  # fmt: skip
        assert replaced.returncode == 0, replaced.stderr
        assert stored(db, hook) == ({"X-Only": "1"}, 7)
        cleared = outbox("webhooks", "update", str(hook), "--no-headers", env=env)
        assert cleared.returncode == 0, cleared.stderr
        assert stored(db, hook) == ({}, 7)

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (
                ["--header", "Host: x"],
                "outbox: headers: Host is set by outbox itself and cannot be given",
            ),
            (
                ["--header", "Authorization"],
                "outbox: argument --header: 'Authorization' is not a header: give it as"
                " 'Name: value'",
            ),
            (["--header", "A: 1", "--header", "a: 2"], "outbox: --header a is given twice"),
            (
                ["--rate-limit", "0"],
                "outbox: rate_limit must be at least 1 (attempts per second), or null for no limit",
            ),
            (
                ["--rate-limit", "fast"],
                "outbox: argument --rate-limit: 'fast' is not a whole number of attempts per"
                " second (at most 2147483647)",
            ),
        ],
    )
    def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        self, server: Server, db: SQL, args: list[str], message: str
    ) -> None:
        env = server.sidecar.env
        account = "acct_cli_refused"
        added = outbox(
            "webhooks", "add", "--account", account, "--name", "CRM", "--event", "lead.scored",
            "--url", "https://crm.example.com/in", *args,
            env=env,
        )  # fmt: skip
        assert (added.returncode, added.stderr.strip()) == (2, message)
        assert db.one("SELECT count(*) FROM outbox.webhooks WHERE account_id = %s", (account,)) == 0
