"""Operator tokens and portal links with a display name (contract 20), against a real
`outbox run`: one credential for the SaaS's backend, acting for the account named in
``Outbox-Account``, and an account token that a header cannot widen."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime

import pytest

from outbox import tokens
from tests.conftest import SQL
from tests.e2e.test_api import Api, Server, api, db, finished_delivery, outbox, server

__all__ = ["api", "db", "server"]  # the fixtures this module borrows


def _account() -> str:
    return f"acct_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def operator(server: Server) -> str:
    """An operator token, made by `outbox tokens create --operator`."""
    made = outbox("tokens", "create", "--operator", env=server.sidecar.env)
    assert made.returncode == 0, made.stderr
    assert "Outbox-Account" in made.stderr
    return made.stdout.strip()


def _as(account: str) -> dict[str, str]:
    return {"Outbox-Account": account}


class TestOperatorTokens:
    def test_created_hashed_and_listed_apart(self, operator: str, db: SQL, server: Server) -> None:
        """The token is printed alone, kept only as its digest with no account, and
        `tokens list --operator` shows it as an operator token while no account's list
        does."""
        assert tokens.well_formed(operator)
        rows = db(
            "SELECT account_id, operator FROM outbox.api_tokens WHERE token_sha256 = %s",
            (tokens.digest(operator),),
        )
        assert rows == [(None, True)]
        assert "obx_" not in " ".join(str(r) for r in db("SELECT * FROM outbox.api_tokens"))
        env = server.sidecar.env
        listed = outbox("tokens", "list", "--operator", env=env)
        assert listed.returncode == 0, listed.stderr
        assert "operator" in listed.stdout and operator not in listed.stdout
        as_json = json.loads(outbox("tokens", "list", "--operator", "--json", env=env).stdout)
        assert as_json and all(t["operator"] and t["account_id"] is None for t in as_json)
        account = _account()
        outbox("tokens", "create", "--account", account, env=env)
        mine = json.loads(outbox("tokens", "list", "--account", account, "--json", env=env).stdout)
        assert [t["operator"] for t in mine] == [False]
        neither = outbox("tokens", "list", env=env)
        assert neither.returncode == 2 and "--account" in neither.stderr
        both = outbox("tokens", "create", "--operator", "--account", account, env=env)
        assert both.returncode == 2 and len(both.stderr.splitlines()) <= 2

    def test_every_route_for_the_named_account(
        self, api: Api, operator: str, db: SQL, server: Server
    ) -> None:
        """With Outbox-Account, an operator token manages that account's webhooks,
        deliveries, replays, portal links and sessions, exactly as its own token would;
        what it makes belongs to that account."""
        account = _account()
        h = _as(account)
        created = api(
            "POST",
            "/api/v1/webhooks",
            {"name": "CRM", "url": "https://127.0.0.1:9/hook", "event": "lead.scored"},
            token=operator,
            headers=h,
        )
        assert created.status == 201, created.body
        hook = created.json["id"]
        assert db.one("SELECT account_id FROM outbox.webhooks WHERE id = %s", (hook,)) == account
        listed = api("GET", "/api/v1/webhooks", token=operator, headers=h).json["webhooks"]
        assert [w["id"] for w in listed] == [hook]
        assert api("GET", f"/api/v1/webhooks/{hook}", token=operator, headers=h).status == 200
        patched = api(
            "PATCH", f"/api/v1/webhooks/{hook}", {"name": "CRM 2"}, token=operator, headers=h
        )
        assert patched.json["name"] == "CRM 2"
        tested = api("POST", f"/api/v1/webhooks/{hook}/test", {}, token=operator, headers=h)
        assert tested.status == 200 and tested.json["ok"] is False
        old_hook, delivery = finished_delivery(db, account, "https://127.0.0.1:9/other")
        log = api("GET", f"/api/v1/webhooks/{old_hook}/deliveries", token=operator, headers=h)
        assert [d["id"] for d in log.json["deliveries"]] == [delivery]
        retried = api("POST", f"/api/v1/deliveries/{delivery}/retry", token=operator, headers=h)
        assert retried.status == 202, retried.body
        recovered = api(
            "POST",
            f"/api/v1/webhooks/{hook}/recover",
            {"since": "2020-01-01T00:00:00Z"},
            token=operator,
            headers=h,
        )
        assert recovered.status == 202, recovered.body
        link = api("POST", "/api/v1/portal-links", {}, token=operator, headers=h)
        assert link.status == 201 and "/portal/" in link.json["url"]
        assert api("DELETE", "/api/v1/portal-sessions", token=operator, headers=h).status == 204
        assert api("DELETE", f"/api/v1/webhooks/{hook}", token=operator, headers=h).status == 204
        events = api("GET", "/api/v1/events", token=operator)
        assert events.status == 200 and len(events.json["events"]) == 7

    def test_without_the_header_a_route_that_needs_an_account_answers_400(
        self, api: Api, operator: str
    ) -> None:
        """Nothing is guessed: each route about an account says which header is missing."""
        for method, path in [
            ("GET", "/api/v1/webhooks"),
            ("GET", "/api/v1/webhooks/1"),
            ("DELETE", "/api/v1/webhooks/1"),
            ("POST", "/api/v1/portal-links"),
            ("DELETE", "/api/v1/portal-sessions"),
        ]:
            answer = api(method, path, token=operator)
            assert answer.status == 400, (method, path, answer.body)
            assert answer.json["error"]["code"] == "missing_account"
            assert "Outbox-Account" in answer.json["error"]["message"]
        blank = api("GET", "/api/v1/webhooks", token=operator, headers=_as("  "))
        assert blank.status == 400 and "Outbox-Account" in blank.json["error"]["message"]

    def test_one_account_at_a_time(self, api: Api, operator: str, db: SQL) -> None:
        """Acting for one account, an operator token sees nothing of another's."""
        first, second = _account(), _account()
        hook = db.webhook("https://127.0.0.1:9/x", account=second)
        assert (
            api("GET", f"/api/v1/webhooks/{hook}", token=operator, headers=_as(first)).status == 404
        )
        listed = api("GET", "/api/v1/webhooks", token=operator, headers=_as(first))
        assert listed.json == {"webhooks": []}

    def test_an_account_token_cannot_act_for_another_account(self, api: Api) -> None:
        """Outbox-Account naming another account is refused (403) with an account token,
        and nothing of that account is shown; naming its own account changes nothing."""
        refused = api("GET", "/api/v1/webhooks", headers=_as(api.other))
        assert refused.status == 403
        assert "operator" in refused.json["error"]["message"]
        made = api(
            "POST",
            "/api/v1/webhooks",
            {"name": "x", "url": "https://example.com/h", "event": "lead.created"},
            headers=_as(api.other),
        )
        assert made.status == 403
        assert api("GET", "/api/v1/webhooks", headers=_as(api.main)).status == 200


class TestPortalLinks:
    def test_display_name_and_a_duration(self, api: Api, operator: str, server: Server) -> None:
        """display_name travels with the link to its Continue page; ttl takes "15m"."""
        account = _account()
        before = time.time()
        made = api(
            "POST",
            "/api/v1/portal-links",
            {"display_name": "Ada's Bakery", "ttl": "15m"},
            token=operator,
            headers=_as(account),
        )
        assert made.status == 201, made.body
        expires = datetime.fromisoformat(made.json["expires_at"].replace("Z", "+00:00"))
        assert 14 * 60 < expires.timestamp() - before < 16 * 60
        path = made.json["url"].split(str(server.sidecar.api_port), 1)[1]
        page = api("GET", path, anonymous=True)
        assert page.status == 200
        assert "Ada&#x27;s Bakery" in page.body.decode() and account not in page.body.decode()

    @pytest.mark.parametrize(
        ("body", "words"),
        [
            ({"ttl": "25h"}, "ttl"),
            ({"ttl": 86401}, "ttl"),
            ({"ttl": "soon"}, "ttl"),
            ({"display_name": ""}, "display_name"),
            ({"display_name": "x" * 101}, "display_name"),
            ({"display_name": "two\nlines"}, "display_name"),
            ({"display_name": 7}, "display_name"),
            ({"name": "x"}, "display_name"),
        ],
    )
    def test_bad_fields_are_named(self, api: Api, body: dict[str, object], words: str) -> None:
        answer = api("POST", "/api/v1/portal-links", body)
        assert answer.status == 422, answer.body
        assert words in answer.json["error"]["message"]
