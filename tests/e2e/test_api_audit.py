"""What the audit of 2026-12-05 found in the admin API, against a real `outbox run`.

The delivery log and the status fields never name an address a tenant's URL resolved
to; replays are rate-limited per account; every answer says nosniff; a token that is
not of our form is refused without the database.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, SQL, free_port, sidecar_environment
from tests.e2e import test_api as shared
from tests.e2e.test_api import Api, add_delivery

# The fixtures of test_api.py: a sidecar and database for this module, two accounts a test.
server = shared.server
api = shared.api
db = shared.db

BLOCKED = "blocked: 10.1.2.3 is not a public address"


def blocked_delivery(db: SQL, hook: int) -> int:
    """A failed delivery of ``hook`` whose attempt the SSRF guard refused."""
    delivery = add_delivery(db, hook)
    db("UPDATE outbox.deliveries SET last_error = %s WHERE id = %s", (BLOCKED, delivery))
    db(
        "UPDATE outbox.delivery_attempts SET error = %s, response_status = NULL"
        " WHERE delivery_id = %s",
        (BLOCKED, delivery),
    )
    db(
        "INSERT INTO outbox.webhook_health"
        " (webhook_id, last_attempt_at, last_attempt_status, last_attempt_error)"
        " VALUES (%s, now(), 'failed', %s)",
        (hook, BLOCKED),
    )
    return delivery


class TestNoAddressReachesATenant:
    def test_status_fields_the_log_and_retry_say_blocked_without_the_address(
        self, api: Api, db: SQL
    ) -> None:
        """The tenant reads 'blocked: not a public address'; SQL keeps the address."""
        hook = db.webhook("https://internal.example/hook", account=api.main)
        delivery = blocked_delivery(db, hook)
        one = api("GET", f"/api/v1/webhooks/{hook}").json
        assert one["last_error"] == "blocked: not a public address"
        assert one["last_attempt_error"] == "blocked: not a public address"
        (listed,) = api("GET", "/api/v1/webhooks").json["webhooks"]
        assert listed["last_error"] == "blocked: not a public address"
        (logged,) = api("GET", f"/api/v1/webhooks/{hook}/deliveries").json["deliveries"]
        assert logged["last_error"] == "blocked: not a public address"
        assert logged["attempt_log"][0]["error"] == "blocked: not a public address"
        retried = api("POST", f"/api/v1/deliveries/{delivery}/retry")
        assert retried.status == 202
        assert b"10.1.2.3" not in retried.body
        assert (
            db.one("SELECT error FROM outbox.delivery_attempts WHERE delivery_id = %s", (delivery,))
            == BLOCKED
        )


class TestReplaysAreLimited:
    def test_past_60_a_minute_retry_and_recover_answer_429(self, api: Api, db: SQL) -> None:
        """Sixty replays pass; the next retry and recover are 429 with Retry-After, and
        re-queue nothing. Ids that are not the account's replay nothing and do not count."""
        hook = db.webhook("https://example.com/hook", account=api.main, enabled=True)
        # Deliveries must stay finished once replayed: the webhook is turned off after.
        deliveries = [add_delivery(db, hook) for _ in range(61)]
        for _ in range(5):
            assert api("POST", "/api/v1/deliveries/999999999/retry").status == 404
        for delivery in deliveries[:60]:
            answer = api("POST", f"/api/v1/deliveries/{delivery}/retry")
            assert answer.status == 202, answer.body
        refused = api("POST", f"/api/v1/deliveries/{deliveries[60]}/retry")
        assert refused.status == 429
        assert refused.error[0] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        status = db.one("SELECT status FROM outbox.deliveries WHERE id = %s", (deliveries[60],))
        assert status == "failed"
        since = {"since": "2020-01-01T00:00:00Z"}
        assert api("POST", f"/api/v1/webhooks/{hook}/recover", since).status == 429
        # Another account has a budget of its own.
        other_hook = db.webhook("https://example.com/hook", account=api.other)
        other = add_delivery(db, other_hook)
        assert api("POST", f"/api/v1/deliveries/{other}/retry", account=api.other).status == 202

    def test_replays_at_once_cannot_pass_the_budget_together(self, api: Api, db: SQL) -> None:
        """70 retries sent at the same moment: 60 re-queue, the rest are 429."""
        from concurrent.futures import ThreadPoolExecutor

        hook = db.webhook("https://example.com/hook", account=api.main)
        deliveries = [add_delivery(db, hook) for _ in range(70)]
        with ThreadPoolExecutor(35) as pool:
            answers = list(
                pool.map(lambda d: api("POST", f"/api/v1/deliveries/{d}/retry").status, deliveries)
            )
        assert sorted(set(answers)) == [202, 429]
        assert answers.count(202) == 60

    def test_the_log_shows_each_deliverys_newest_20_attempts(self, api: Api, db: SQL) -> None:
        """Replays add attempts without end; the log signs and shows the newest 20."""
        hook = db.webhook("https://example.com/hook", account=api.main)
        delivery = add_delivery(db, hook, attempts=25)
        (logged,) = api("GET", f"/api/v1/webhooks/{hook}/deliveries").json["deliveries"]
        assert logged["attempts"] == 25
        assert [a["attempt"] for a in logged["attempt_log"]] == list(range(6, 26))
        assert delivery == logged["id"]


class TestHeadersAndTokens:
    def test_every_answer_says_nosniff(self, api: Api) -> None:
        for answer in (
            api("GET", "/api/v1/webhooks"),
            api("GET", "/api/v1/webhooks", anonymous=True),
            api("GET", "/api/v1/webhooks/nope"),
            api("GET", "/healthz", anonymous=True),
            api("GET", "/metrics", anonymous=True),
        ):
            assert answer.headers.get("X-Content-Type-Options") == "nosniff", answer

    def test_made_up_tokens_are_401_and_a_new_one_works_at_once(self, api: Api, db: SQL) -> None:
        """Tokens of our form that nobody issued are refused (from the roster of digests,
        not a query each); a token made a moment ago is let in on its first call."""
        import secrets

        from tests.e2e.test_api import make_token

        # Each stranger waits for the roster's next refresh (up to a second): a few show
        # the answer as well as many.
        for _ in range(3):
            fake = "obx_" + secrets.token_urlsafe(32)
            assert api("GET", "/api/v1/webhooks", token=fake).status == 401
        fresh = make_token(db, api.other)
        assert api("GET", "/api/v1/webhooks", token=fresh).status == 200
        revoked = make_token(db, api.other)
        assert api("GET", "/api/v1/webhooks", token=revoked).status == 200
        db(
            "DELETE FROM outbox.api_tokens WHERE token_sha256 = sha256(%s::bytea)",
            (revoked.encode(),),
        )
        assert api("GET", "/api/v1/webhooks", token=revoked).status == 401

    def test_tokens_not_of_our_form_are_401(self, api: Api) -> None:
        valid = api.tokens[api.main]
        for token in ("obx_short", valid + "x", valid[:-1] + "!", "x" * 47, "obx_" + "é" * 43):
            answer = api("GET", "/api/v1/webhooks", token=token)
            assert answer.status == 401, token
            assert answer.error == ("unauthorized", "unknown or revoked token")
        assert api("GET", "/api/v1/webhooks").status == 200


def test_a_listen_address_in_use_is_one_line_and_exit_2(database_url: str, ca_file: str) -> None:
    """`outbox run` on a port another process holds: one line naming it, exit 2."""
    import socket

    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        env = sidecar_environment(database_url, ca_file, OUTBOX_API_LISTEN=f"127.0.0.1:{port}")
        done = subprocess.run(
            [sys.executable, "-m", "outbox", "run"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"OUTBOX_API_LISTEN=127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in done.stderr
