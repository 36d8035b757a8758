"""Settings > Webhooks in a real browser: Debian's Chromium driven by Playwright, against
a real `outbox run`, a real database and a real HTTPS receiver.

One sidecar, one receiver and one browser for the module; each test signs in to an
account of its own in a browser context of its own. Every test also fails if the page
breaks its Content-Security-Policy, throws, or opens an alert.

Chromium is Debian's package, never a browser Playwright downloads: `make test`
installs it (as root), and without it these tests fail saying how to get it.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme

from outbox import tokens
from outbox.web import portal
from tests.conftest import ROOT, SQL, Sidecar, cloned_database, wait_until
from tests.e2e.test_api import add_delivery, outbox, sidecar_env
from tests.e2e.test_portal import CSP
from tests.receiver import Receiver, Reply
from tools import localpg

try:
    from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    raise ImportError(
        "the browser tests need the playwright package: run `make test`, "
        "or `.venv/bin/pip install -e '.[dev]'`"
    ) from None

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "settings-webhooks.png"

pytestmark = pytest.mark.browser
SECRET = "whsec_page_secret_0123456789"
EVENT_NAMES = [
    "Lead Created",
    "Lead Scored",
    "Reply Received",
    "Message Sent",
    "AI Response Sent",
    "Meeting Booked",
    "Enrichment Completed",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"the browser tests need Debian's Chromium at {CHROMIUM}: run `make test` "
            "(which installs it when run as root) or `sudo apt-get install chromium`",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Site:
    """The sidecar, its database, and a receiver whose answer is chosen by path."""

    sidecar: Sidecar
    sql: SQL
    receiver: Receiver
    replies: dict[str, int] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.api_port}"

    def account(self, prefix: str = "acct") -> str:
        return f"{prefix}_{uuid.uuid4().hex[:10]}"

    def url(self, status: int = 200) -> str:
        """A new receiver URL that answers ``status``."""
        path = f"/{uuid.uuid4().hex[:8]}"
        self.replies[path] = status
        return self.receiver.url(path)

    def link(self, account: str) -> str:
        """A portal link for ``account``, made through the API with a token."""
        # Written straight to the table: Playwright's loop rules out asyncio.run here.
        token = tokens.generate()
        self.sql(
            "INSERT INTO outbox.api_tokens (account_id, token_sha256) VALUES (%s, %s)",
            (account, tokens.digest(token)),
        )
        conn = http.client.HTTPConnection("127.0.0.1", self.sidecar.api_port, timeout=10)
        conn.request("POST", "/api/v1/portal-links", headers={"Authorization": f"Bearer {token}"})
        answer = conn.getresponse()
        assert answer.status == 201
        url: str = json.loads(answer.read())["url"]
        conn.close()
        return url

    def token(self, account: str) -> str:
        """A new API token of ``account``, written straight to the table."""
        token = tokens.generate()
        self.sql(
            "INSERT INTO outbox.api_tokens (account_id, token_sha256) VALUES (%s, %s)",
            (account, tokens.digest(token)),
        )
        return token

    def recover(self, token: str, hook: int, since: str) -> int:
        """POST /api/v1/webhooks/{hook}/recover with a token; the answer's status."""
        conn = http.client.HTTPConnection("127.0.0.1", self.sidecar.api_port, timeout=10)
        conn.request(
            "POST",
            f"/api/v1/webhooks/{hook}/recover",
            body=json.dumps({"since": since}),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        status = conn.getresponse().status
        conn.close()
        return status

    def hook_url(self, hook: int) -> str:
        return str(self.sql.one("SELECT url FROM outbox.webhooks WHERE id = %s", (hook,)))

    def hook(self, account: str, **fields: Any) -> int:
        fields.setdefault("secret", SECRET)
        return self.sql.webhook(fields.pop("url", self.url()), account=account, **fields)

    def status(self, hook: int) -> Any:
        return self.sql.one(
            "SELECT last_delivery_status FROM outbox.webhook_status WHERE id = %s", (hook,)
        )


@pytest.fixture(scope="module")
def site(
    pg_server: localpg.Server,
    template_db: str,
    ca: trustme.CA,
    ca_file: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    with cloned_database(pg_server, template_db, "outbox_page") as url:
        log_path = Path(tmp_path_factory.mktemp("page")) / "sidecar.log"
        sidecar = Sidecar(sidecar_env(url, ca_file), log_path).start()
        receiver = Receiver(ca).start()
        sql = SQL(url)
        site = Site(sidecar, sql, receiver)
        receiver.respond = lambda got: Reply(status=site.replies.get(got.path, 200))
        try:
            yield site
        finally:
            receiver.stop()
            sidecar.stop()
            sql.conn.close()


Opener = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser, site: Site) -> Iterator[Opener]:
    """open_page(account) signs a new browser context in to ``account`` through a
    portal link and its Continue button, and returns the loaded settings page;
    open_page(link=...) only goes to a link. What breaks the page is collected and
    fails the test."""
    contexts = []
    problems: list[str] = []

    def new_page() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console: {message.text}")
                if "Content Security Policy" in message.text or "Refused to" in message.text
                else None
            ),
        )

        def dialog(d: Any) -> None:
            problems.append(f"a {d.type} opened: {d.message}")
            d.dismiss()

        page.on("dialog", dialog)
        return page

    def open_(account: str | None = None, *, link: str | None = None) -> Page:
        page = new_page()
        if link is not None:
            page.goto(link)
            return page
        assert account is not None
        page.goto(site.link(account))
        page.get_by_role("button", name="Continue").click()
        page.wait_for_url("**/settings/webhooks")
        expect(page.locator("#usage")).to_contain_text("of 10 used")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert problems == []


def row(page: Page, name: str) -> Locator:
    return page.locator("#webhook-rows tr", has_text=name)


def field_error(page: Page, field_name: str) -> Locator:
    return page.locator(f"#f-{field_name}-error")


class TestSigningIn:
    def test_a_link_clicked_on_another_site_opens_the_page(
        self, open_page: Opener, site: Site
    ) -> None:
        """The host application shows a link made by `outbox portal-link`; clicking it
        there shows a Continue button for that account, and pressing it signs the
        browser in (an HttpOnly, SameSite=Strict cookie that scripts cannot read) and
        lands on Settings > Webhooks for that account."""
        account = site.account()
        made = outbox("portal-link", "--account", account, env=site.sidecar.env)
        assert made.returncode == 0, made.stderr
        link = made.stdout.strip()
        page = open_page(link="about:blank")
        page.route(
            "https://app.example.com/**",
            lambda route: route.fulfill(
                body=f'<a id="settings" href="{link}">Settings</a>', content_type="text/html"
            ),
        )
        page.goto("https://app.example.com/")
        page.click("#settings")
        page.wait_for_url(link)
        expect(page.get_by_role("heading", level=1)).to_have_text("Open your webhook settings")
        expect(page.locator(".account-id")).to_have_text(account)
        assert page.context.cookies() == []
        page.get_by_role("button", name="Continue").click()
        page.wait_for_url(f"{site.base_url}/settings/webhooks")
        expect(page.get_by_role("heading", name="Webhooks", exact=True)).to_be_visible()
        expect(page.locator(".account-id")).to_have_text(account)
        expect(page.locator("#usage")).to_have_text("0 of 10 used")
        expect(page.locator("#empty")).to_be_visible()
        (cookie,) = page.context.cookies()
        assert cookie["name"] == portal.SESSION_COOKIE
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""
        response = page.request.get(f"{site.base_url}/settings/webhooks")
        assert response.headers["content-security-policy"] == CSP

    def test_a_fetched_link_still_signs_in(self, open_page: Opener, site: Site) -> None:
        """A mail scanner or a chat preview that fetches the link first (twice, even)
        uses nothing up: the person who opens it afterwards gets the Continue page and
        is signed in by it."""
        account = site.account()
        link = site.link(account)
        for _ in range(2):
            preview = open_page(link=link)
            expect(preview.get_by_role("button", name="Continue")).to_be_visible()
            assert preview.context.cookies() == []
        page = open_page(link=link)
        page.get_by_role("button", name="Continue").click()
        page.wait_for_url("**/settings/webhooks")
        expect(page.locator(".account-id")).to_have_text(account)

    def test_another_site_cannot_sign_the_browser_in(self, open_page: Opener, site: Site) -> None:
        """Login CSRF: a page on another site whose form posts its owner's link to
        this server signs nobody in, says why, and leaves the link unused."""
        attacker = site.account("attacker")
        link = site.link(attacker)
        page = open_page(link="about:blank")
        page.route(
            "https://attacker.example/**",
            lambda route: route.fulfill(
                body=f'<form method="post" action="{link}"><button>Win a prize</button></form>',
                content_type="text/html",
            ),
        )
        page.goto("https://attacker.example/")
        page.get_by_role("button", name="Win a prize").click()
        page.wait_for_url(link)
        expect(page.get_by_role("heading", level=1)).to_have_text("This sign-in was not completed")
        assert page.context.cookies() == []
        page.goto(f"{site.base_url}/settings/webhooks")
        expect(page.get_by_role("heading", level=1)).to_have_text("You are not signed in")
        victim = open_page(link=link)
        victim.get_by_role("button", name="Continue").click()
        victim.wait_for_url("**/settings/webhooks")
        expect(victim.locator(".account-id")).to_have_text(attacker)

    def test_sign_out(self, open_page: Opener, site: Site) -> None:
        """Sign out ends this browser's session (not the account's other ones), lands
        on a page that says so, and the settings page is closed to this browser."""
        account = site.account()
        page = open_page(account)
        other = open_page(account)
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{site.base_url}/settings/signout")
        expect(page.get_by_role("heading", level=1)).to_have_text("You are signed out")
        assert page.context.cookies() == []
        page.goto(f"{site.base_url}/settings/webhooks")
        expect(page.get_by_role("heading", level=1)).to_have_text("You are not signed in")
        assert (
            site.sql.one(
                "SELECT count(*) FROM outbox.portal_sessions WHERE account_id = %s", (account,)
            )
            == 1
        )
        other.get_by_role("button", name="Refresh").click()
        expect(other.locator("#usage")).to_have_text("0 of 10 used")
        expect(other.locator("#banner")).to_be_hidden()

    def test_a_reused_an_expired_and_a_forged_link_show_an_error_and_no_session(
        self, open_page: Opener, site: Site
    ) -> None:
        """Each gets a page that says what is wrong and what to do, sets no cookie, and
        the settings page stays closed to that browser. An expired or forged link says
        so at once; a used one when Continue is pressed."""
        account = site.account()
        link = site.link(account)
        first = open_page(link=link)
        first.get_by_role("button", name="Continue").click()
        first.wait_for_url("**/settings/webhooks")

        secret = bytes(site.sql.one("SELECT secret FROM outbox.portal_secret"))
        expired = portal.sign(secret, portal.Claims(account, int(time.time()) - 1, "n1"))
        path = urlsplit(link).path
        forged = path[:-3] + ("xyz" if not path.endswith("xyz") else "abc")
        cases = [
            (link, "This link has already been used"),
            (f"{site.base_url}/portal/{expired}", "This link has expired"),
            (site.base_url + forged, "This link is not valid"),
        ]
        for url, title in cases:
            page = open_page(link=url)
            if url == link:
                page.get_by_role("button", name="Continue").click()
            expect(page.get_by_role("heading", level=1)).to_have_text(title)
            expect(page.locator("main")).to_contain_text("open Settings > Webhooks again")
            assert page.context.cookies() == []
            page.goto(f"{site.base_url}/settings/webhooks")
            expect(page.get_by_role("heading", level=1)).to_have_text("You are not signed in")

    def test_an_ended_session_says_so(self, open_page: Opener, site: Site) -> None:
        """When the session ends under an open page, the next request shows why and
        the page stops offering changes."""
        account = site.account()
        page = open_page(account)
        site.sql("DELETE FROM outbox.portal_sessions WHERE account_id = %s", (account,))
        page.get_by_role("button", name="Refresh").click()
        expect(page.locator("#banner")).to_contain_text("Your session has ended")
        expect(page.get_by_role("button", name="Add Webhook")).to_be_disabled()


class TestAdding:
    def test_add_webhook_with_the_apis_messages_at_each_field(
        self, open_page: Opener, site: Site
    ) -> None:
        """An http:// URL and a 10-character secret are refused with the API's own
        words, shown at the field; a generated secret is shown once; Create adds the
        webhook to the list."""
        account = site.account()
        page = open_page(account)
        page.get_by_role("button", name="Add Webhook").click()
        dialog = page.get_by_role("dialog", name="Add Webhook")
        expect(dialog).to_be_visible()
        options = page.locator("#f-event option").all_inner_texts()
        assert options == ["Select an event", *EVENT_NAMES]

        page.get_by_label("Name", exact=True).fill("CRM Sync")
        page.get_by_label("URL", exact=True).fill("http://crm.example.com/hooks")
        page.get_by_label("Event", exact=True).select_option(label="Lead Scored")
        page.get_by_role("button", name="Create").click()
        url_error = "url must be an absolute https:// URL with a host"
        expect(field_error(page, "url")).to_have_text(url_error)
        expect(page.get_by_label("URL", exact=True)).to_have_attribute("aria-invalid", "true")

        page.get_by_label("URL", exact=True).fill("https://crm.example.com/hooks")
        page.locator("#f-secret").fill("0123456789")
        page.get_by_role("button", name="Create").click()
        secret_error = "secret must be at least 16 characters"
        expect(field_error(page, "secret")).to_have_text(secret_error)
        expect(field_error(page, "url")).to_be_hidden()
        assert (
            site.sql.one("SELECT count(*) FROM outbox.webhooks WHERE account_id = %s", (account,))
            == 0
        )
        # The same words as the API's, for the same input.
        api = page.request.post(
            f"{site.base_url}/api/v1/webhooks",
            data={"name": "x", "url": "http://crm.example.com/hooks", "event": "lead.scored"},
            headers={
                "X-CSRF-Token": page.locator('meta[name="outbox-csrf-token"]').get_attribute(
                    "content"
                )
                or ""
            },
        )
        assert api.status == 422 and api.json()["error"]["message"] == url_error

        page.get_by_role("button", name="Generate").click()
        generated = page.locator("#f-secret").input_value()
        # Standard base64 of 32 bytes, padded: Standard Webhooks libraries decode it.
        assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", generated)
        assert len(base64.b64decode(generated[6:], validate=True)) == 32
        expect(page.locator("#f-secret")).to_have_attribute("type", "text")
        expect(page.locator("#f-secret-once")).to_contain_text("it will not be shown again")
        page.get_by_role("button", name="Create").click()

        expect(dialog).to_be_hidden()
        expect(page.locator("#notice")).to_have_text("“CRM Sync” was created.")
        hook = row(page, "CRM Sync")
        expect(hook).to_contain_text("https://crm.example.com/hooks")
        expect(hook.locator("td.event")).to_have_text("Lead Scored")
        expect(hook.locator("td.last")).to_have_text("None yet")
        expect(hook.locator("td.pending")).to_have_text("0")
        expect(page.locator("#usage")).to_have_text("1 of 10 used")
        stored = site.sql(
            "SELECT name, url, event, secret, enabled FROM outbox.webhooks WHERE account_id = %s",
            (account,),
        )
        assert stored == [
            ("CRM Sync", "https://crm.example.com/hooks", "lead.scored", generated, True)
        ]

        # Shown once: the edit dialog does not show it again.
        hook.get_by_role("button", name="Edit").click()
        expect(page.locator("#f-secret")).to_have_value("")
        expect(page.locator("#f-secret-hint")).to_contain_text("A signing secret is set")
        assert generated not in page.content()
        expect(page.locator("#f-secret-rotation")).to_be_hidden()
        page.locator("#f-secret").fill("a-brand-new-secret-0123")
        # Contract 12: X-Webhook-Signature changes at once; only webhook-signature
        # carries both secrets for 24 hours.
        rotation = page.locator("#f-secret-rotation")
        expect(rotation).to_contain_text(
            "X-Webhook-Signature uses the new secret as soon as you save"
        )
        expect(rotation).to_contain_text("For 24 hours, webhook-signature carries two signatures")
        expect(rotation).not_to_contain_text("keeps signing beside the new one")

    def test_the_limit_of_ten(self, open_page: Opener, site: Site) -> None:
        """The tenth webhook fills the account: "10 of 10 used", Add Webhook disabled
        with the reason. If another tab took the last place meanwhile, Create shows the
        API's message."""
        account = site.account()
        for number in range(8):
            site.hook(account, name=f"hook {number}")
        page = open_page(account)
        expect(page.locator("#usage")).to_have_text("8 of 10 used")

        page.get_by_role("button", name="Add Webhook").click()
        site.hook(account, name="made elsewhere")  # the ninth, while the dialog is open
        page.get_by_label("Name", exact=True).fill("The tenth")
        page.get_by_label("URL", exact=True).fill("https://example.com/tenth")
        page.get_by_label("Event", exact=True).select_option(label="Message Sent")
        page.get_by_role("button", name="Create").click()
        expect(page.locator("#usage")).to_have_text("10 of 10 used")
        expect(page.get_by_role("button", name="Add Webhook")).to_be_disabled()
        expect(page.locator("#limit-note")).to_have_text(
            re.compile(r"You can create up to 10 webhooks per account\.\s+Delete one")
        )

        site.sql(
            "DELETE FROM outbox.webhooks WHERE account_id = %s AND name = 'hook 0'", (account,)
        )
        page.get_by_role("button", name="Refresh").click()
        expect(page.locator("#usage")).to_have_text("9 of 10 used")
        page.get_by_role("button", name="Add Webhook").click()
        site.hook(account, name="made elsewhere too")
        page.get_by_label("Name", exact=True).fill("One too many")
        page.get_by_label("URL", exact=True).fill("https://example.com/eleventh")
        page.get_by_label("Event", exact=True).select_option(label="Message Sent")
        page.get_by_role("button", name="Create").click()
        expect(page.locator("#form-error")).to_have_text(
            f"account {account} already has 10 webhooks, the limit"
        )


class TestChanging:
    def test_the_switch_disables_and_enables(self, open_page: Opener, site: Site) -> None:
        """The list's switch (by mouse, then by keyboard) disables the webhook, which
        is then marked Disabled, and enables it again."""
        account = site.account()
        hook = site.hook(account, name="Slack Alerts", event="reply.received")
        page = open_page(account)
        line = row(page, "Slack Alerts")
        switch = line.get_by_role("switch", name="Enabled: Slack Alerts")
        expect(switch).to_be_checked()
        switch.click()
        expect(line).to_have_class(re.compile(r"\bdisabled\b"))
        expect(line.locator(".badge")).to_have_text("Disabled")
        expect(page.locator("#notice")).to_have_text("“Slack Alerts” is disabled.")
        assert site.sql.one("SELECT enabled FROM outbox.webhooks WHERE id = %s", (hook,)) is False

        switch = line.get_by_role("switch", name="Enabled: Slack Alerts")
        switch.focus()
        page.keyboard.press("Space")
        expect(line).not_to_have_class(re.compile(r"\bdisabled\b"))
        expect(line.locator(".badge")).to_have_count(0)
        wait_until(
            lambda: site.sql.one("SELECT enabled FROM outbox.webhooks WHERE id = %s", (hook,)),
            what="enabled again",
        )
        expect(line.get_by_role("switch")).to_be_focused()

    def test_edit_every_field_and_save(self, open_page: Opener, site: Site) -> None:
        """The edit dialog changes name, URL, event, secret and enabled; it can remove
        the secret too."""
        account = site.account()
        hook = site.hook(account, name="CRM Sync", event="lead.scored")
        page = open_page(account)
        row(page, "CRM Sync").get_by_role("button", name="Edit").click()
        dialog = page.get_by_role("dialog", name="Edit Webhook")
        expect(dialog).to_be_visible()
        expect(page.get_by_label("Name", exact=True)).to_have_value("CRM Sync")
        expect(page.get_by_label("Event", exact=True)).to_have_value("lead.scored")

        page.get_by_label("Name", exact=True).fill("CRM Sync v2")
        page.get_by_label("URL", exact=True).fill("https://crm.example.com/v2/hook")
        page.get_by_label("Event", exact=True).select_option(label="Meeting Booked")
        page.locator("#f-secret").fill("whsec_a-brand-new-secret")
        page.get_by_label("Enabled", exact=True).uncheck()
        page.get_by_role("button", name="Save").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#notice")).to_have_text("Changes to “CRM Sync v2” were saved.")
        line = row(page, "CRM Sync v2")
        expect(line.locator("td.event")).to_have_text("Meeting Booked")
        expect(line.locator(".badge")).to_have_text("Disabled")
        stored = site.sql(
            "SELECT name, url, event, secret, enabled FROM outbox.webhooks WHERE id = %s",
            (hook,),
        )
        assert stored == [
            (
                "CRM Sync v2",
                "https://crm.example.com/v2/hook",
                "meeting.booked",
                "whsec_a-brand-new-secret",
                False,
            )
        ]

        line.get_by_role("button", name="Edit").click()
        page.get_by_label("Remove the signing secret").check()
        page.get_by_label("Enabled", exact=True).check()
        page.get_by_role("button", name="Save").click()
        expect(dialog).to_be_hidden()
        expect(line.locator(".badge")).to_have_count(0)
        stored = site.sql("SELECT secret, enabled FROM outbox.webhooks WHERE id = %s", (hook,))
        assert stored == [(None, True)]

    def test_delete_asks_first(self, open_page: Opener, site: Site) -> None:
        """Delete names the webhook and waits for a confirmation; Cancel keeps it."""
        account = site.account()
        hook = site.hook(account, name="Lead Router")
        page = open_page(account)
        row(page, "Lead Router").get_by_role("button", name="Delete").click()
        confirm = page.get_by_role("dialog", name="Delete webhook?")
        expect(confirm).to_contain_text("“Lead Router” will stop receiving events immediately")
        expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
        confirm.get_by_role("button", name="Cancel").click()
        expect(confirm).to_be_hidden()
        expect(row(page, "Lead Router")).to_be_visible()
        assert site.sql.one("SELECT count(*) FROM outbox.webhooks WHERE id = %s", (hook,)) == 1

        row(page, "Lead Router").get_by_role("button", name="Delete").click()
        confirm.get_by_role("button", name="Delete").click()
        expect(confirm).to_be_hidden()
        expect(page.locator("#notice")).to_have_text("“Lead Router” was deleted.")
        expect(row(page, "Lead Router")).to_have_count(0)
        expect(page.locator("#usage")).to_have_text("0 of 10 used")
        assert site.sql.one("SELECT count(*) FROM outbox.webhooks WHERE id = %s", (hook,)) == 0


class TestFormat:
    def test_the_format_follows_the_url_until_picked_by_hand(
        self, open_page: Opener, site: Site
    ) -> None:
        """Typing a Slack or Discord webhook URL picks that format, with a hint of what
        arrives; once the user picks one by hand, the URL no longer changes it. The list
        shows the format where it is not JSON, and the edit dialog keeps it."""
        account = site.account()
        page = open_page(account)
        page.get_by_role("button", name="Add Webhook").click()
        url = page.get_by_label("URL", exact=True)
        select = page.get_by_label("Format", exact=True)
        hint = page.locator("#f-format-hint")
        expect(select).to_have_value("json")
        expect(hint).to_contain_text("as JSON")

        url.fill("https://hooks.slack.com/services/T000/B000/XXXX")
        expect(select).to_have_value("slack")
        expect(hint).to_contain_text("Slack channel gets a message")
        url.fill("https://discord.com/api/webhooks/123/abc")
        expect(select).to_have_value("discord")
        expect(hint).to_contain_text("Discord channel")
        url.fill("https://crm.example.com/hooks")
        expect(select).to_have_value("json")

        select.select_option(label="Slack message")
        url.fill("https://discord.com/api/webhooks/123/abc")
        expect(select).to_have_value("slack")
        page.get_by_label("Name", exact=True).fill("Deal alerts")
        page.get_by_label("Event", exact=True).select_option(label="Meeting Booked")
        page.get_by_role("button", name="Create").click()
        expect(page.get_by_role("dialog", name="Add Webhook")).to_be_hidden()

        line = row(page, "Deal alerts")
        expect(line.locator(".badge.format")).to_have_text("Slack")
        stored = site.sql(
            "SELECT format FROM outbox.webhooks WHERE account_id = %s AND name = %s",
            (account, "Deal alerts"),
        )
        assert stored == [("slack",)]
        site.hook(account, name="CRM Sync")
        page.get_by_role("button", name="Refresh").click()
        expect(row(page, "CRM Sync").locator("td.event")).to_have_text("Lead Scored")
        expect(row(page, "CRM Sync").locator(".badge")).to_have_count(0)

        row(page, "Deal alerts").get_by_role("button", name="Edit").click()
        expect(select).to_have_value("slack")
        url.fill("https://crm.example.com/hooks")
        expect(select).to_have_value("slack")
        select.select_option(label="JSON")
        page.get_by_role("button", name="Save").click()
        expect(row(page, "Deal alerts").locator(".badge")).to_have_count(0)


class TestDeliveries:
    def test_send_test_payload_to_a_working_then_a_failing_endpoint(
        self, open_page: Opener, site: Site
    ) -> None:
        """Send Test Payload with a chosen event: success with status code and duration;
        then, saved to a failing URL, failure with its status code."""
        account = site.account()
        good = site.url(200)
        site.hook(account, name="CRM Sync", url=good)
        page = open_page(account)
        row(page, "CRM Sync").get_by_role("button", name="Edit").click()
        test_event = page.locator("#t-event")
        expect(test_event).to_have_value("lead.scored")
        test_event.select_option(label="Meeting Booked")
        page.get_by_role("button", name="Send Test Payload").click()
        result = page.locator("#test-result")
        expect(result).to_contain_text("Succeeded")
        expect(result).to_contain_text(re.compile(r"Status code\s*200"))
        expect(result).to_contain_text(re.compile(r"Duration\s*\d+ ms"))
        (sent,) = site.receiver.received(urlsplit(good).path)
        assert sent.headers["X-Webhook-Test"] == "true"
        assert sent.headers["X-Webhook-Event"] == "meeting.booked"

        failing = site.url(503)
        page.get_by_label("URL", exact=True).fill(failing)
        page.get_by_role("button", name="Save").click()
        expect(row(page, "CRM Sync")).to_contain_text(failing)
        row(page, "CRM Sync").get_by_role("button", name="Edit").click()
        expect(result).to_be_empty()
        page.get_by_role("button", name="Send Test Payload").click()
        expect(result).to_contain_text("Failed")
        expect(result).to_contain_text(re.compile(r"Status code\s*503"))
        expect(result).to_contain_text("HTTP 503")
        assert len(site.receiver.received(urlsplit(failing).path)) == 1

    def test_send_test_payload_past_the_limit_shows_the_apis_message(
        self, open_page: Opener, site: Site
    ) -> None:
        """An account that has made its 10 test sends this minute (here through the
        API) is told so on the page, in the API's words, and nothing is sent."""
        account = site.account()
        url = site.url(200)
        hook = site.hook(account, name="CRM Sync", url=url)
        token = tokens.generate()
        site.sql(
            "INSERT INTO outbox.api_tokens (account_id, token_sha256) VALUES (%s, %s)",
            (account, tokens.digest(token)),
        )
        for _ in range(10):
            conn = http.client.HTTPConnection("127.0.0.1", site.sidecar.api_port, timeout=10)
            conn.request(
                "POST",
                f"/api/v1/webhooks/{hook}/test",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert conn.getresponse().status == 200
            conn.close()
        page = open_page(account)
        row(page, "CRM Sync").get_by_role("button", name="Edit").click()
        page.get_by_role("button", name="Send Test Payload").click()
        result = page.locator("#test-result")
        expect(result).to_contain_text(
            re.compile(
                r"The test payload was not sent: at most 10 test sends a minute per account;"
                r" try again in \d+ s"
            )
        )
        assert len(site.receiver.received(urlsplit(url).path)) == 10

    def test_real_deliveries_show_up_and_a_failed_one_can_be_retried(
        self, open_page: Opener, site: Site
    ) -> None:
        """Real events reach a working and a failing endpoint; the list shows, without
        reloading, Succeeded and Failed with the reason; the failing one's delivery log
        has every attempt with its code; Retry sends it again, and it succeeds."""
        account = site.account()
        flaky = site.url(503)
        site.hook(account, name="CRM Sync", url=site.url(200))
        failing = site.hook(account, name="Slack Alerts", url=flaky)
        page = open_page(account)
        site.sql.emit(account, "lead.scored", {"lead": {"id": 42}})

        ok_row, bad_row = row(page, "CRM Sync"), row(page, "Slack Alerts")
        expect(ok_row.locator("td.last")).to_contain_text("Succeeded", timeout=15_000)
        expect(bad_row.locator("td.last")).to_contain_text("Failed", timeout=15_000)
        expect(bad_row.locator(".reason")).to_have_text("HTTP 503")
        expect(bad_row.locator("td.last time")).to_have_text("just now")

        bad_row.get_by_role("button", name="Delivery log").click()
        log = page.get_by_role("dialog", name="Delivery log")
        delivery = log.locator("li.delivery")
        expect(delivery).to_have_count(1)
        expect(delivery.locator(".status")).to_have_text("Failed")
        expect(delivery.locator(".event")).to_have_text("Lead Scored")
        attempts = delivery.locator("table.attempts tbody tr")
        expect(attempts).to_have_count(4)
        expect(delivery.locator("td.code")).to_have_text(["503"] * 4)
        expect(delivery.locator("td.error").first).to_have_text("HTTP 503")

        site.replies[urlsplit(flaky).path] = 200
        delivery.get_by_role("button", name="Retry").click()
        expect(log.locator("#log-notice")).to_contain_text("queued to be sent again")
        expect(delivery.locator(".status")).to_have_text("Succeeded", timeout=15_000)
        expect(delivery.locator("td.code")).to_have_text(["503"] * 4 + ["200"])
        expect(delivery.get_by_role("button", name="Retry")).to_have_count(0)
        assert site.status(failing) == "succeeded"
        log.get_by_role("button", name="Close").click()
        expect(bad_row.locator("td.last")).to_contain_text("Succeeded", timeout=10_000)

    def test_a_day_of_failures_is_sent_again_from_the_log(
        self, open_page: Opener, site: Site
    ) -> None:
        """A webhook failing since last night says so in its row (since when, how many
        failed). Its log filters to failed deliveries; "Send again everything that
        failed since" (a day ago by default) queues the day's failures and what the
        automatic disable cancelled, not older ones nor a person's cancellation, and
        says how many; past the account's 60 replays a minute it shows the API's 429."""
        account = site.account()
        hook = site.hook(account, name="Nightly CRM", url=site.url(200))
        day = [add_delivery(site.sql, hook, finished_ago=hours * 3600) for hours in (2, 5, 19)]
        older = add_delivery(site.sql, hook, finished_ago=2 * 86400)
        auto = add_delivery(site.sql, hook, status="cancelled", finished_ago=3 * 3600)
        by_hand = add_delivery(site.sql, hook, status="cancelled", finished_ago=3 * 3600)
        site.sql(
            "UPDATE outbox.deliveries SET last_error = %s WHERE id = %s",
            ("webhook disabled automatically", auto),
        )
        site.sql(
            "INSERT INTO outbox.webhook_health (webhook_id, last_attempt_at,"
            " last_attempt_status, last_attempt_error, failing_since)"
            " VALUES (%s, now() - interval '2 hours', 'failed', 'HTTP 500',"
            "         now() - interval '20 hours')",
            (hook,),
        )
        page = open_page(account)
        streak = row(page, "Nightly CRM").locator(".streak")
        expect(streak).to_have_text("Failing since 20 hours ago · 3 failed")

        row(page, "Nightly CRM").get_by_role("button", name="Delivery log").click()
        log = page.get_by_role("dialog", name="Delivery log")
        expect(log.locator("li.delivery")).to_have_count(6)
        log.get_by_label("Show").select_option("failed")
        expect(log.locator("li.delivery")).to_have_count(4)
        expect(log.locator("li.delivery .status")).to_have_text(["Failed"] * 4)

        picker = log.get_by_label("Send again everything that failed since")
        yesterday = picker.input_value()
        assert yesterday, "the picker starts a day ago"
        log.get_by_role("button", name="Send again").click()
        expect(log.locator("#log-notice")).to_have_text(
            "4 deliveries were queued to be sent again."
        )
        got = site.receiver.wait_for(4, urlsplit(site.hook_url(hook)).path, timeout=20)
        assert sorted(int(r.headers["X-Webhook-Id"]) for r in got) == sorted([*day, auto])
        wait_until(lambda: all(status_of(site, d) == "succeeded" for d in [*day, auto]))
        assert status_of(site, older) == "failed" and status_of(site, by_hand) == "cancelled"

        token = site.token(account)
        for _ in range(59):
            site.recover(token, hook, "2020-01-01T00:00:00Z")
        log.get_by_role("button", name="Send again").click()
        expect(log.locator("#log-error")).to_contain_text("try again in")
        expect(log.locator("#log-error")).to_be_visible()


def status_of(site: Site, delivery: int) -> str:
    return str(site.sql.one("SELECT status FROM outbox.deliveries WHERE id = %s", (delivery,)))


class TestSafety:
    def test_user_strings_are_shown_as_text_and_never_run(
        self, open_page: Opener, site: Site
    ) -> None:
        """A name, a URL and an account id written as HTML show those characters in
        the list, the dialogs and the header, and nothing runs (an alert would fail the
        test; no element is created from them)."""
        account = site.account("acct_<img src=x onerror=alert(3)>")
        page = open_page(account)
        expect(page.locator(".account-id")).to_have_text(account)

        name = "<img src=x onerror=alert(1)>"
        url = 'https://example.com/"><script>alert(2)</script>'
        page.get_by_role("button", name="Add Webhook").click()
        page.get_by_label("Name", exact=True).fill(name)
        page.get_by_label("URL", exact=True).fill(url)
        page.get_by_label("Event", exact=True).select_option(label="Lead Created")
        page.get_by_role("button", name="Create").click()
        line = row(page, name)
        expect(line.locator(".name-text")).to_have_text(name)
        expect(line.locator(".url")).to_have_text(url)
        expect(page.locator("#notice")).to_have_text(f"“{name}” was created.")

        line.get_by_role("button", name="Delivery log").click()
        expect(page.locator("#log-name")).to_have_text(name)
        page.keyboard.press("Escape")
        line.get_by_role("button", name="Delete").click()
        expect(page.locator("#delete-name")).to_have_text(name)
        page.keyboard.press("Escape")
        line.get_by_role("button", name="Edit").click()
        expect(page.get_by_label("Name", exact=True)).to_have_value(name)
        page.keyboard.press("Escape")

        assert page.locator("img, main script, dialog script").count() == 0
        assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0


class TestAccessibility:
    def test_every_control_has_a_label(self, open_page: Opener, site: Site) -> None:
        """Every input, select and button on the page, dialogs included, has an
        accessible name (hidden inputs are no controls)."""
        account = site.account()
        site.hook(account, name="CRM Sync")
        page = open_page(account)
        unnamed = page.evaluate(
            """() => [...document.querySelectorAll(
                'input:not([type=hidden]), select, button, textarea')]
                .filter((c) => !(c.getAttribute('aria-label')
                    || (c.labels && c.labels.length)
                    || c.textContent.trim()))
                .map((c) => c.outerHTML)"""
        )
        assert unnamed == []

    def test_add_a_webhook_with_the_keyboard_alone(self, open_page: Opener, site: Site) -> None:
        """Tab, Enter, arrows and Escape are enough: open Add Webhook, fill it in (the
        Format select follows the URL), generate a secret, Create; then open and close
        the edit dialog, with the focus back where it was."""
        account = site.account()
        page = open_page(account)
        add = page.get_by_role("button", name="Add Webhook")
        add.focus()
        page.keyboard.press("Enter")
        expect(page.get_by_label("Name", exact=True)).to_be_focused()
        page.keyboard.type("Keyboard Hook")
        page.keyboard.press("Tab")
        expect(page.get_by_label("URL", exact=True)).to_be_focused()
        page.keyboard.type("https://example.com/keys")
        page.keyboard.press("Tab")
        expect(page.get_by_label("Format", exact=True)).to_be_focused()
        expect(page.get_by_label("Format", exact=True)).to_have_value("json")
        page.keyboard.press("Tab")
        expect(page.get_by_label("Event", exact=True)).to_be_focused()
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        expect(page.get_by_label("Event", exact=True)).to_have_value("lead.scored")
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        expect(page.get_by_role("button", name="Generate")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#f-secret")).to_be_focused()
        page.keyboard.press("Enter")  # submits the form
        line = row(page, "Keyboard Hook")
        expect(line.locator("td.event")).to_have_text("Lead Scored")
        assert site.sql.one(
            "SELECT secret LIKE 'whsec_%%' FROM outbox.webhooks WHERE account_id = %s",
            (account,),
        )

        edit = line.get_by_role("button", name="Edit")
        edit.focus()
        page.keyboard.press("Enter")
        expect(page.get_by_role("dialog", name="Edit Webhook")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.get_by_role("dialog", name="Edit Webhook")).to_be_hidden()
        expect(edit).to_be_focused()


def test_the_readme_screenshot(open_page: Opener, site: Site, tmp_path: Path) -> None:
    """docs/settings-webhooks.png, which docs/settings-page.md shows: four webhooks after real
    deliveries, one succeeded, one failed with its reason, one disabled, one new."""
    account = "acct_1"
    crm = site.hook(account, name="CRM Sync", event="lead.scored")
    slack = site.hook(account, name="Slack Alerts", event="reply.received", url=site.url(503))
    site.hook(account, name="Meeting Router", event="meeting.booked", enabled=False)
    site.hook(account, name="Enrichment Pipeline", event="enrichment.completed", secret=None)
    site.sql.emit(account, "lead.scored", {"lead": {"id": 42}})
    site.sql.emit(account, "reply.received", {"lead": {"id": 42}})
    wait_until(lambda: site.status(crm) == "succeeded", what="the CRM Sync delivery")
    wait_until(lambda: site.status(slack) == "failed", what="the Slack Alerts delivery")
    # Addresses a reader recognises, rather than the test receiver's.
    for hook, url in [
        (crm, "https://crm.example.com/hooks/autoreach"),
        (slack, "https://hooks.slack.example.com/services/T000/B000"),
    ]:
        site.sql("UPDATE outbox.webhooks SET url = %s WHERE id = %s", (url, hook))
    site.sql(
        "UPDATE outbox.webhooks SET url = 'https://calendar.example.com/hooks/meetings'"
        " WHERE account_id = %s AND name = 'Meeting Router'",
        (account,),
    )
    site.sql(
        "UPDATE outbox.webhooks SET url = 'https://pipeline.example.com/enrichment'"
        " WHERE account_id = %s AND name = 'Enrichment Pipeline'",
        (account,),
    )

    page = open_page(account)
    expect(page.locator("#usage")).to_have_text("4 of 10 used")
    expect(row(page, "Slack Alerts").locator(".reason")).to_have_text("HTTP 503")
    expect(row(page, "CRM Sync").locator("td.last")).to_contain_text("Succeeded")
    page.set_viewport_size({"width": 1200, "height": 700})
    shot = tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # The committed picture changes only on purpose (`make screenshot`), so an ordinary
    # test run leaves the work tree clean.
    if os.environ.get("OUTBOX_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
