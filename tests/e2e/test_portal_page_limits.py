"""Settings > Webhooks in a real browser: a webhook's own headers and its rate limit
(CONTRACT sections 10, 18 and 19). The browser, sidecar and receiver are those of
test_portal_page.py, one set for this module."""

from __future__ import annotations

import json

from playwright.sync_api import Page, expect

from tests.e2e import test_portal_page as shared
from tests.e2e.test_portal_page import Opener, Site, field_error, row

browser = shared.browser
site = shared.site
open_page = shared.open_page

TOKEN = "Bearer page-token-0123456789"
KEY = "page-key-0123456789"


def stored(site: Site, account: str) -> list[tuple[object, ...]]:
    return site.sql(
        "SELECT headers, rate_limit FROM outbox.webhooks WHERE account_id = %s ORDER BY id",
        (account,),
    )


def new_header(page: Page, name: str, value: str) -> None:
    """Add Header, then fill in the new (last) row."""
    page.get_by_role("button", name="Add header").click()
    page.get_by_label("Header name").last.fill(name)
    page.get_by_label("Header value").last.fill(value)


class TestHeadersAndRateLimit:
    def test_add_then_edit_without_seeing_a_value(self, open_page: Opener, site: Site) -> None:
        """A webhook added with two headers and a limit shows their names and the limit
        in the list; editing shows the names only, and replaces one value, removes one
        header, adds another and removes the limit."""
        account = site.account()
        page = open_page(account)
        page.get_by_role("button", name="Add Webhook").click()
        page.get_by_label("Name", exact=True).fill("CRM Sync")
        page.get_by_label("URL", exact=True).fill("https://crm.example.com/hooks")
        page.get_by_label("Event", exact=True).select_option(label="Lead Scored")
        new_header(page, "Authorization", TOKEN)
        new_header(page, "X-Api-Key", KEY)
        page.get_by_label("Rate limit").fill("5")
        page.get_by_role("button", name="Create").click()
        expect(page.get_by_role("dialog", name="Add Webhook")).to_be_hidden()
        line = row(page, "CRM Sync")
        expect(line.locator(".extras")).to_have_text(
            "Headers: Authorization, X-Api-Key · At most 5 requests a second"
        )
        assert stored(site, account) == [({"Authorization": TOKEN, "X-Api-Key": KEY}, 5)]

        line.get_by_role("button", name="Edit").click()
        rows = page.locator("#header-rows li")
        expect(rows.locator(".header-name")).to_have_text(["Authorization", "X-Api-Key"])
        expect(page.get_by_label("New value of Authorization")).to_have_value("")
        expect(page.get_by_label("Rate limit")).to_have_value("5")
        assert TOKEN not in page.content() and KEY not in page.content()

        page.get_by_label("New value of Authorization").fill("Bearer rotated-0123")
        page.get_by_role("button", name="Remove X-Api-Key").click()
        expect(rows.nth(1)).to_have_class("header-row removed")
        new_header(page, "X-Team", "sales")
        page.get_by_label("Rate limit").fill("")
        page.get_by_role("button", name="Save").click()
        expect(page.get_by_role("dialog", name="Edit Webhook")).to_be_hidden()
        expect(line.locator(".extras")).to_have_text("Headers: Authorization, X-Team")
        assert stored(site, account) == [
            ({"Authorization": "Bearer rotated-0123", "X-Team": "sales"}, None)
        ]

    def test_the_apis_words_at_each_field(self, open_page: Opener, site: Site) -> None:
        """A header outbox sets itself and a limit of 0 are refused with the API's
        messages, shown at their fields; nothing is saved."""
        account = site.account()
        site.hook(account, name="CRM Sync")
        page = open_page(account)
        row(page, "CRM Sync").get_by_role("button", name="Edit").click()
        new_header(page, "Host", "evil.example.com")
        page.get_by_role("button", name="Save").click()
        expect(field_error(page, "headers")).to_have_text(
            "headers: Host is set by outbox itself and cannot be given"
        )
        expect(page.locator("#f-headers")).to_have_attribute("aria-invalid", "true")

        page.get_by_role("button", name="Remove this header").click()
        page.get_by_label("Rate limit").fill("0")
        page.get_by_role("button", name="Save").click()
        expect(field_error(page, "rate_limit")).to_have_text(
            "rate_limit must be at least 1 (attempts per second), or null for no limit"
        )
        expect(field_error(page, "headers")).to_be_hidden()
        assert stored(site, account) == [({}, None)]

    def test_the_delivery_log_masks_the_values(self, open_page: Opener, site: Site) -> None:
        """A delivery's request in the log shows the webhook's header as Name: ***."""
        account = site.account()
        hook = site.hook(account, name="CRM Sync")
        site.sql(
            "UPDATE outbox.webhooks SET headers = %s WHERE id = %s",
            (json.dumps({"Authorization": TOKEN}), hook),
        )
        site.sql.emit(account, "lead.scored", {"lead": {"id": 42}})
        page = open_page(account)
        line = row(page, "CRM Sync")
        expect(line.locator("td.last")).to_contain_text("Succeeded", timeout=15_000)
        line.get_by_role("button", name="Delivery log").click()
        log = page.get_by_role("dialog", name="Delivery log")
        log.get_by_text("Request and response of attempt 1").click()
        expect(log.locator("pre.request-headers")).to_contain_text("Authorization: ***")
        assert TOKEN not in page.content()
        # The receiver did get the credential.
        [got] = [r for r in site.receiver.received() if r.headers.get("Authorization")]
        assert got.headers["Authorization"] == TOKEN
