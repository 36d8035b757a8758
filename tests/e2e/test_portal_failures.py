"""Settings > Webhooks in Chromium, for an endpoint that fails: the retrying state with
the reason and the next attempt, a webhook disabled because it kept failing (and how to
bring it back), and the delivery log's request and response of each attempt.

Each test starts its own `outbox run` with the retry settings it needs (see
tests/e2e/test_portal_page.py for the browser and how pages are opened).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.conftest import SQL, Sidecar, wait_until
from tests.e2e import test_portal_page as shared
from tests.e2e.test_api import sidecar_env
from tests.e2e.test_portal_page import Opener, Site, row
from tests.receiver import Receiver, Reply

browser = shared.browser
open_page = shared.open_page

pytestmark = pytest.mark.browser

MAINTENANCE = '{"error": "down for maintenance until 11:00 UTC"}'


@pytest.fixture
def site(
    request: pytest.FixtureRequest,
    database_url: str,
    ca_file: str,
    receiver: Receiver,
    tmp_path: Path,
) -> Iterator[Site]:
    """A sidecar of this test's own, with the settings given as the fixture's param."""
    settings: dict[str, str] = getattr(request, "param", {})
    env = sidecar_env(database_url, ca_file) | settings
    sidecar = Sidecar(env, tmp_path / "sidecar.log").start()
    sql = SQL(database_url)
    try:
        yield Site(sidecar, sql, receiver)
    finally:
        sidecar.stop()
        sql.conn.close()


def answer_with(receiver: Receiver, replies: list[Reply]) -> None:
    """Answer with ``replies`` in turn, then with the last one for ever."""
    remaining = list(replies)

    def respond(_: Any) -> Reply:
        return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    receiver.respond = respond


@pytest.mark.parametrize("site", [{"OUTBOX_RETRY_DELAYS": "600,600,600"}], indirect=True)
def test_a_retrying_webhook_and_its_delivery_log(open_page: Opener, site: Site) -> None:
    """After a success, a delivery answered 503 shows as Retrying with the reason, when
    the next attempt is and which of four it is; the footnote gives the retry settings;
    the delivery log shows the answer and, unfolded, the request and the response."""
    account = site.account()
    answer_with(site.receiver, [Reply(200), Reply(503, body=MAINTENANCE.encode())])
    hook = site.hook(account, name="CRM Sync", url=site.receiver.url("/crm"))
    site.sql.emit(account, "lead.scored", {"lead": {"id": 1}})
    wait_until(lambda: site.status(hook) == "succeeded", what="the first delivery")
    site.sql.emit(account, "lead.scored", {"lead": {"id": 2, "name": "Ada"}})
    wait_until(
        lambda: site.sql.one("SELECT retrying FROM outbox.webhook_status WHERE id = %s", (hook,)),
        what="the retrying delivery",
    )

    page = open_page(account)
    crm = row(page, "CRM Sync")
    expect(crm.locator(".status")).to_have_text("Retrying")
    expect(crm.locator("td.last")).to_contain_text(
        re.compile(r"^Retrying\s*HTTP 503 · next attempt")
    )
    expect(crm.locator(".retrying-reason")).to_have_text(
        re.compile(r"^HTTP 503 · next attempt in \d+ minutes \(attempt 2 of 4\)$")
    )
    expect(crm.locator("td.last time")).to_contain_text("Last attempt")
    expect(page.locator("#retry-note")).to_contain_text(
        "retried up to 3 times: after about 10 minutes, 10 minutes and 10 minutes, about 30"
        " minutes in all. "
        "Each attempt waits up to 2 seconds for an answer."
    )

    crm.get_by_role("button", name="Delivery log").click()
    log = page.get_by_role("dialog", name="Delivery log")
    deliveries = log.locator("li.delivery")
    expect(deliveries).to_have_count(2)
    retrying = deliveries.first
    expect(retrying.locator(".status")).to_have_text("Pending")
    expect(retrying.locator("td.code")).to_have_text(["503"])
    expect(retrying.locator("td.answer")).to_have_text([MAINTENANCE])
    exchange = retrying.locator("details.exchange")
    expect(exchange.locator(".request-headers")).to_be_hidden()
    exchange.locator("summary").click()
    expect(exchange.locator(".request-line")).to_have_text(f"POST {site.receiver.url('/crm')}")
    headers = exchange.locator(".request-headers")
    expect(headers).to_contain_text("X-Webhook-Attempt: 1")
    expect(headers).to_contain_text("X-Webhook-Event: lead.scored")
    expect(headers).to_contain_text(re.compile(r"X-Webhook-Signature: sha256=[0-9a-f]{64}"))
    expect(headers).not_to_contain_text("whsec_")
    expect(exchange.locator(".request-body")).to_contain_text('"name": "Ada"')
    expect(exchange.locator(".response-line")).to_have_text("HTTP 503")
    expect(exchange.locator(".response-body")).to_have_text(MAINTENANCE)
    expect(exchange.locator(".duration")).to_have_text(re.compile(r"^\d+ ms$"))
    (received,) = [r for r in site.receiver.received("/crm") if b'"Ada"' in r.body]
    expect(exchange.locator(".request-body")).to_have_text(received.body.decode())

    # Unfolded stays unfolded when the log refreshes itself.
    log.get_by_role("button", name="Refresh").click()
    expect(exchange.locator(".request-headers")).to_be_visible()


@pytest.mark.parametrize(
    "site", [{"OUTBOX_RETRY_DELAYS": "none", "OUTBOX_AUTO_DISABLE_AFTER": "1m"}], indirect=True
)
def test_a_webhook_disabled_for_failing_says_why_and_how_back(
    open_page: Opener, site: Site
) -> None:
    """A webhook that never succeeded, older than the setting, is disabled when a
    delivery fails for good: the page says so, why, and how to bring it back; switching
    it on clears the reason."""
    account = site.account()
    site.receiver.respond = lambda _: Reply(503, body=MAINTENANCE.encode())
    hook = site.hook(account, name="Slack Alerts", url=site.receiver.url("/slack"))
    site.sql("UPDATE outbox.webhooks SET created_at = now() - interval '2 hours'")
    site.sql.emit(account, "lead.scored", {"lead": {"id": 3}})
    wait_until(
        lambda: site.sql.one("SELECT NOT enabled FROM outbox.webhooks WHERE id = %s", (hook,)),
        what="the webhook to be disabled",
    )

    page = open_page(account)
    slack = row(page, "Slack Alerts")
    expect(slack.locator(".badge.off")).to_have_text("Disabled")
    expect(slack.locator(".status")).to_have_text("Disabled: kept failing")
    expect(slack.locator(".reason")).to_have_text(
        re.compile(
            r"^disabled automatically at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: deliveries kept "
            r"failing and none succeeded for 1 minute \(last success: never\)$"
        )
    )
    expect(slack.locator(".how-back")).to_contain_text("switch Enabled back on")
    expect(page.locator("#retry-note")).to_contain_text(
        "none succeeding for 1 minute, is disabled; fix the endpoint, then enable the "
        "webhook again."
    )

    site.receiver.respond = lambda _: Reply(200)
    slack.get_by_role("switch").check()
    expect(page.locator("#notice")).to_contain_text("is enabled")
    expect(slack.locator(".reason")).to_have_text("HTTP 503")
    expect(slack.locator(".status")).to_have_text("Failed")
    expect(slack.locator(".how-back")).to_have_count(0)
    assert (
        site.sql.one("SELECT disabled_reason FROM outbox.webhooks WHERE id = %s", (hook,)) is None
    )
