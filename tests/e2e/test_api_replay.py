"""The delivery log and replays (retry one, recover many), by API and by CLI."""

from __future__ import annotations

import json
from collections import Counter
from urllib.parse import urlencode

from tests.conftest import SQL, wait_until
from tests.e2e import test_api as shared
from tests.e2e.test_api import RETRY_DELAYS, Api, Server, add_delivery, outbox, owned_rows
from tests.receiver import Received, Receiver, Reply

# The fixtures of test_api.py: a sidecar and database for this module, two accounts a test.
server = shared.server
api = shared.api
db = shared.db

RETRIES = len(RETRY_DELAYS.split(","))


def status_of(db: SQL, delivery: int) -> str:
    return str(db.one("SELECT status FROM outbox.deliveries WHERE id = %s", (delivery,)))


def settled(db: SQL, *deliveries: int) -> None:
    """Wait until none of ``deliveries`` is pending."""
    wait_until(
        lambda: all(status_of(db, d) != "pending" for d in deliveries),
        what=f"deliveries {deliveries} to finish",
    )


class TestDeliveryLog:
    def test_shows_real_deliveries_with_their_attempts(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """After real deliveries (one retried once, one delivered at once), the log has
        each with its event, status and every attempt's status code, duration, error;
        newest first."""
        seen: Counter[str] = Counter()

        def respond(request: Received) -> Reply:
            message = request.headers["X-Webhook-Id"]
            seen[message] += 1
            return Reply(500 if b'"retry"' in request.body and seen[message] == 1 else 200)

        receiver.respond = respond
        hook = db.webhook(receiver.url(), account=api.main)
        first = db.emit(api.main, data={"retry": True})
        second = db.emit(api.main, data={"n": 2})
        ids = [
            db.one("SELECT id FROM outbox.deliveries WHERE event_id = %s", (e,))
            for e in (first, second)
        ]
        settled(db, *ids)

        page = api("GET", f"/api/v1/webhooks/{hook}/deliveries")
        assert page.status == 200
        body = page.json
        assert body["next_cursor"] is None
        newest, oldest = body["deliveries"]
        assert [newest["id"], oldest["id"]] == ids[::-1]
        assert newest["event_id"] == second and oldest["event_id"] == first
        assert oldest["event"] == "lead.scored" and oldest["status"] == "succeeded"
        assert oldest["attempts"] == 2 and oldest["finished_at"] is not None
        assert oldest["next_attempt_at"] is None
        assert [
            (a["attempt"], a["response_status"], a["error"]) for a in oldest["attempt_log"]
        ] == [
            (1, 500, "HTTP 500"),
            (2, 200, None),
        ]
        assert all(isinstance(a["duration_ms"], int) for a in oldest["attempt_log"])
        assert all(a["started_at"].endswith("Z") for a in oldest["attempt_log"])
        assert [a["response_status"] for a in newest["attempt_log"]] == [200]

    def test_pages_with_a_cursor(self, api: Api, db: SQL) -> None:
        """limit and next_cursor walk the whole log, newest first, each delivery once."""
        hook = db.webhook("https://example.com/h", account=api.main)
        made = [add_delivery(db, hook) for _ in range(5)]
        seen, cursor, pages = [], None, 0
        while True:
            query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
            body = api("GET", f"/api/v1/webhooks/{hook}/deliveries{query}").json
            seen += [d["id"] for d in body["deliveries"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == made[::-1] and pages == 3
        for bad in ("limit=0", "limit=101", "limit=x", "cursor=abc", "cursor=-1"):
            answer = api("GET", f"/api/v1/webhooks/{hook}/deliveries?{bad}")
            assert answer.status == 400, bad
            assert answer.error[0] == "bad_request"

    def test_filters_by_status_and_time(self, api: Api, db: SQL) -> None:
        """status= keeps deliveries of that status, since= those created at or after
        that time, both together too; a bad value of either is a 400 naming it."""
        hook = db.webhook("https://example.com/h", account=api.main)
        failed = [add_delivery(db, hook) for _ in range(3)]
        fine = add_delivery(db, hook, status="succeeded")
        db("UPDATE outbox.deliveries SET created_at = now() - interval '2 days' WHERE id = %s",
           (failed[0],))  # fmt: skip
        since = db.one("SELECT now() - interval '1 day'").isoformat()
        path = f"/api/v1/webhooks/{hook}/deliveries"

        def ids(query: dict[str, str]) -> list[int]:
            answer = api("GET", f"{path}?{urlencode(query)}")
            assert answer.status == 200, answer
            return [d["id"] for d in answer.json["deliveries"]]

        assert ids({"status": "failed"}) == failed[::-1]
        assert ids({"status": "succeeded"}) == [fine]
        assert ids({"since": since}) == [fine, failed[2], failed[1]]
        assert ids({"status": "failed", "since": since, "limit": "1"}) == [failed[2]]
        for bad, named in (({"status": "broken"}, "status"), ({"since": "yesterday"}, "since")):
            answer = api("GET", f"{path}?{urlencode(bad)}")
            assert answer.status == 400 and answer.error[0] == "bad_request", bad
            assert named in answer.error[1]


class TestRetry:
    def test_a_failed_delivery_is_sent_again_with_the_same_id(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """A delivery that failed for good is re-queued: the receiver gets it again,
        same X-Webhook-Id, attempt numbers going on; it ends succeeded."""
        hook = db.webhook(receiver.url(), account=api.main)
        delivery = add_delivery(db, hook, attempts=2)
        answer = api("POST", f"/api/v1/deliveries/{delivery}/retry")
        assert answer.status == 202, answer
        assert answer.json["id"] == delivery and answer.json["status"] == "pending"
        assert answer.json["last_error"] == "HTTP 500"
        (got,) = receiver.wait_for(1)
        assert got.headers["X-Webhook-Id"] == str(delivery)
        assert got.headers["X-Webhook-Attempt"] == "3"
        assert json.loads(got.body)["data"] == {"made": "by the test"}
        settled(db, delivery)
        after = api("GET", f"/api/v1/webhooks/{hook}/deliveries").json["deliveries"][0]
        assert after["status"] == "succeeded" and after["attempts"] == 3
        assert after["last_error"] is None
        assert [a["response_status"] for a in after["attempt_log"]] == [500, 500, 200]

    def test_a_replay_gets_a_fresh_series_of_retries(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """A delivery that used up every retry, replayed to a target that still fails,
        is retried the full number of times again before it fails again."""
        receiver.respond = lambda _: Reply(500)
        hook = db.webhook(receiver.url(), account=api.main)
        delivery = add_delivery(db, hook, attempts=RETRIES + 1)
        assert api("POST", f"/api/v1/deliveries/{delivery}/retry").status == 202
        got = receiver.wait_for(RETRIES + 1)
        settled(db, delivery)
        assert status_of(db, delivery) == "failed"
        assert [r.headers["X-Webhook-Attempt"] for r in receiver.received()] == [
            str(n) for n in range(RETRIES + 2, 2 * RETRIES + 3)
        ]
        assert {r.headers["X-Webhook-Id"] for r in got} == {str(delivery)}
        assert db.one(
            "SELECT count(*) FROM outbox.delivery_attempts WHERE delivery_id = %s", (delivery,)
        ) == 2 * (RETRIES + 1)

    def test_succeeded_and_cancelled_deliveries_replay_too(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """Any finished delivery can be replayed: a succeeded one (the receiver lost
        it), a cancelled one (its webhook was disabled, and is enabled again)."""
        hook = db.webhook(receiver.url(), account=api.main)
        succeeded = add_delivery(db, hook, status="succeeded")
        cancelled = add_delivery(db, hook, status="cancelled", attempts=0)
        for delivery in (succeeded, cancelled):
            assert api("POST", f"/api/v1/deliveries/{delivery}/retry").status == 202
        got = receiver.wait_for(2)
        assert sorted(r.headers["X-Webhook-Id"] for r in got) == sorted(
            [str(succeeded), str(cancelled)]
        )
        settled(db, succeeded, cancelled)
        assert status_of(db, cancelled) == "succeeded"

    def test_pending_deliveries_and_disabled_webhooks_are_409(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """A delivery still pending cannot be replayed; neither can one whose webhook is
        disabled (it would be cancelled at once). Nothing changes."""
        hook = db.webhook(receiver.url(), account=api.main)
        pending = add_delivery(db, hook, status="pending")
        failed = add_delivery(db, hook)
        before = owned_rows(db, api.main)
        answer = api("POST", f"/api/v1/deliveries/{pending}/retry")
        assert answer.status == 409
        code, message = answer.error
        assert code == "conflict" and "pending" in message
        assert owned_rows(db, api.main) == before
        db("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        before = owned_rows(db, api.main)
        disabled = api("POST", f"/api/v1/deliveries/{failed}/retry")
        assert disabled.status == 409 and "disabled" in disabled.error[1]
        assert owned_rows(db, api.main) == before
        assert receiver.received() == []


class TestRecover:
    def test_every_failed_delivery_since_then_is_sent_again(
        self, api: Api, db: SQL, receiver: Receiver
    ) -> None:
        """Recover re-queues the webhook's deliveries that failed at or after "since":
        not older failures, not successes, not other webhooks'. Each arrives again with
        its own X-Webhook-Id."""
        hook = db.webhook(receiver.url(), account=api.main)
        sibling = db.webhook(receiver.url("/sibling"), account=api.main)
        old = [add_delivery(db, hook, finished_ago=7200) for _ in range(2)]
        recent = [add_delivery(db, hook, finished_ago=60) for _ in range(3)]
        fine = add_delivery(db, hook, status="succeeded", finished_ago=60)
        elsewhere = add_delivery(db, sibling, finished_ago=60)
        since = db.one("SELECT now() - interval '1 hour'").isoformat()
        answer = api("POST", f"/api/v1/webhooks/{hook}/recover", {"since": since})
        assert answer.status == 202, answer
        assert answer.json == {"requeued": 3}
        got = receiver.wait_for(3)
        settled(db, *recent)
        assert sorted(r.headers["X-Webhook-Id"] for r in got) == sorted(map(str, recent))
        assert all(r.path == "/hook" for r in got)
        assert [status_of(db, d) for d in recent] == ["succeeded"] * 3
        assert [status_of(db, d) for d in old] == ["failed"] * 2
        assert status_of(db, fine) == "succeeded" and status_of(db, elsewhere) == "failed"
        assert len(receiver.received()) == 3

    def test_bad_since_or_a_disabled_webhook_changes_nothing(self, api: Api, db: SQL) -> None:
        """since must be an ISO 8601 time with an offset (422); a disabled webhook
        cannot recover (409)."""
        hook = db.webhook("https://example.com/h", account=api.main)
        add_delivery(db, hook)
        before = owned_rows(db, api.main)
        path = f"/api/v1/webhooks/{hook}/recover"
        for body in ({}, {"since": "yesterday"}, {"since": "2026-11-27T10:00:00"}, {"since": 5}):
            answer = api("POST", path, body)
            assert answer.status == 422, (body, answer)
            assert "since" in answer.error[1]
        assert api("POST", path, {"since": "2020-01-01T00:00:00Z", "x": 1}).status == 422
        db("UPDATE outbox.webhooks SET enabled = false WHERE id = %s", (hook,))
        before = owned_rows(db, api.main)
        disabled = api("POST", path, {"since": "2020-01-01T00:00:00Z"})
        assert disabled.status == 409 and "disabled" in disabled.error[1]
        assert owned_rows(db, api.main) == before


class TestCli:
    def test_deliveries_retry_and_webhooks_recover(
        self, api: Api, db: SQL, server: Server, receiver: Receiver
    ) -> None:
        """`outbox deliveries retry ID` and `outbox webhooks recover ID --since T` do
        what the API does; bad input is one line on stderr and exit 2."""
        env = server.sidecar.env
        hook = db.webhook(receiver.url(), account=api.main)
        one = add_delivery(db, hook, finished_ago=7200)
        many = [add_delivery(db, hook, finished_ago=60) for _ in range(2)]

        retried = outbox("deliveries", "retry", str(one), env=env)
        assert retried.returncode == 0, retried.stderr
        assert receiver.wait_for(1)[0].headers["X-Webhook-Id"] == str(one)
        settled(db, one)

        since = db.one("SELECT now() - interval '1 hour'").isoformat()
        recovered = outbox("webhooks", "recover", str(hook), "--since", since, env=env)
        assert recovered.returncode == 0, recovered.stderr
        assert "2" in recovered.stdout
        got = receiver.wait_for(3)
        assert sorted(r.headers["X-Webhook-Id"] for r in got[1:]) == sorted(map(str, many))
        settled(db, *many)

        pending = add_delivery(db, hook, status="pending")
        for args in (
            ("deliveries", "retry", str(pending)),
            ("deliveries", "retry", "999999999"),
            ("deliveries", "retry", "x"),
            ("webhooks", "recover", str(hook), "--since", "2026-11-27"),
            ("webhooks", "recover", "999999999", "--since", "2026-11-27T00:00Z"),
        ):
            refused = outbox(*args, env=env)
            assert refused.returncode == 2, (args, refused)
            assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert status_of(db, pending) == "pending"
