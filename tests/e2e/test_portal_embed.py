"""The settings page inside the SaaS (contract 10, 20), in Debian's Chromium against a
real `outbox run`: framed by another site with third-party cookies blocked, branded,
and a page a customer learns from (a sample delivery, how to verify it, every form
error at once, a phone's width).

The sidecar here allows one origin to frame the page, names a product and an accent
colour; the host application's page is served from ``localhost``, another site than
the sidecar's ``127.0.0.1``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from playwright.sync_api import Browser, Page, expect, sync_playwright

from outbox.events import EVENTS
from outbox.web.api import EXAMPLE_SECRET
from tests.conftest import ROOT, SQL, Sidecar, cloned_database, wait_until
from tests.e2e.test_api import outbox, sidecar_env
from tests.e2e.test_portal_page import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Site,
    field_error,
    row,
)
from tests.receiver import Receiver, Reply
from tools import localpg

PRODUCT = "AutoReach"
ACCENT = "#7a3e9d"
PHONE_SCREENSHOT = ROOT / "docs" / "settings-webhooks-phone.png"
# Chromium's switch that blocks third-party cookies as its "phase-out" does.
BLOCK_THIRD_PARTY_COOKIES = "--test-third-party-cookie-phaseout"


class HostApp:
    """The SaaS's own settings page on another site, showing ``frame_src`` in an iframe."""

    def __init__(self) -> None:
        self.frame_src = "about:blank"
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    "<!doctype html><title>AutoReach · Settings</title><h1>Settings</h1>"
                    f'<iframe id="webhooks" title="Webhooks" src="{host.frame_src}" '
                    'width="1100" height="760"></iframe>'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.port}"


@pytest.fixture(scope="module")
def host_app() -> Iterator[HostApp]:
    app = HostApp()
    yield app
    app.server.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, BLOCK_THIRD_PARTY_COOKIES]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def site(
    pg_server: localpg.Server,
    template_db: str,
    ca: trustme.CA,
    ca_file: str,
    host_app: HostApp,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    with cloned_database(pg_server, template_db, "outbox_embed") as url:
        env = sidecar_env(url, ca_file)
        env.update(
            OUTBOX_PORTAL_FRAME_ANCESTORS=f"https://app.example.com {host_app.origin}",
            OUTBOX_PORTAL_PRODUCT_NAME=PRODUCT,
            OUTBOX_PORTAL_ACCENT_COLOR=ACCENT,
        )
        log_path = Path(tmp_path_factory.mktemp("embed")) / "sidecar.log"
        sidecar = Sidecar(env, log_path).start()
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


@pytest.fixture
def problems() -> list[str]:
    """Page errors and CSP violations seen; any left at the end fails the test."""
    return []


@pytest.fixture
def new_page(browser: Browser, problems: list[str]) -> Iterator[Page]:
    """A page in a fresh context; page errors and CSP violations fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    yield page
    context.close()
    assert problems == []


def operator_link(site: Site, account: str, display_name: str | None = None) -> str:
    """A portal link made the way a SaaS's backend makes it: with an operator token."""
    made = outbox("tokens", "create", "--operator", env=site.sidecar.env)
    assert made.returncode == 0, made.stderr
    body = {"ttl": "15m", **({"display_name": display_name} if display_name else {})}
    conn = http.client.HTTPConnection("127.0.0.1", site.sidecar.api_port, timeout=30)
    conn.request(
        "POST",
        "/api/v1/portal-links",
        body=json.dumps(body),
        headers={
            "Authorization": f"Bearer {made.stdout.strip()}",
            "Outbox-Account": account,
            "Content-Type": "application/json",
        },
    )
    answer = conn.getresponse()
    data = json.loads(answer.read())
    conn.close()
    assert answer.status == 201, data
    url: str = data["url"]
    return url


def signed_in(page: Page, site: Site, account: str, display_name: str | None = None) -> Page:
    page.goto(operator_link(site, account, display_name))
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/settings/webhooks")
    expect(page.locator("#usage")).to_contain_text("of 10 used")
    return page


class TestEmbedding:
    def test_inside_another_sites_iframe_without_third_party_cookies(
        self, new_page: Page, site: Site, host_app: HostApp
    ) -> None:
        """The SaaS's page on localhost frames a link made with an operator token; with
        third-party cookies blocked, Continue signs in inside the frame, every action
        works there, no cookie is stored for the sidecar, and Sign out ends the
        session."""
        account = site.account()
        host_app.frame_src = operator_link(site, account, "Ada's Bakery")
        page = new_page
        page.goto(f"{host_app.origin}/")
        frame = page.frame_locator("#webhooks")
        expect(frame.locator(".account-id")).to_have_text("Ada's Bakery")
        frame.get_by_role("button", name="Continue").click()
        expect(frame.get_by_role("heading", name="Webhooks", exact=True)).to_be_visible()
        expect(frame.locator(".account-id")).to_have_text("Ada's Bakery")
        expect(frame.locator("#usage")).to_have_text("0 of 10 used")

        # Add, switch off and on, test, read the log, delete: all through X-Outbox-Session.
        frame.get_by_role("button", name="Add Webhook").click()
        frame.get_by_label("Name", exact=True).fill("CRM Sync")
        frame.get_by_label("URL", exact=True).fill(site.url())
        frame.get_by_label("Event", exact=True).select_option(label="Lead Scored")
        frame.locator("#f-secret").fill("a-signing-secret-0123456789")
        frame.get_by_role("button", name="Create").click()
        hook = frame.locator("#webhook-rows tr", has_text="CRM Sync")
        expect(hook).to_be_visible()
        hook_id = site.sql.one(
            "SELECT id FROM outbox.webhooks WHERE account_id = %s AND name = 'CRM Sync'",
            (account,),
        )
        switch = hook.get_by_role("switch")
        switch.click()
        expect(frame.locator("#notice")).to_have_text("“CRM Sync” is disabled.")
        switch.click()
        expect(frame.locator("#notice")).to_have_text("“CRM Sync” is enabled.")
        hook.get_by_role("button", name="Edit").click()
        frame.get_by_role("button", name="Send Test Payload").click()
        expect(frame.locator("#test-result")).to_contain_text("Succeeded")
        frame.get_by_role("dialog").get_by_role("button", name="Cancel").click()
        site.sql.emit(account, "lead.scored", {"lead": {"id": 7}})
        wait_until(lambda: site.status(hook_id) == "succeeded", what="the delivery")
        hook.get_by_role("button", name="Delivery log").click()
        expect(frame.locator("#log-list .delivery")).to_have_count(1)
        frame.get_by_role("dialog").get_by_role("button", name="Close").click()
        hook.get_by_role("button", name="Delete").click()
        frame.get_by_role("button", name="Delete", exact=True).click()
        expect(frame.locator("#usage")).to_have_text("0 of 10 used")

        assert [c for c in page.context.cookies() if c["domain"] == "127.0.0.1"] == []
        sessions = "SELECT count(*) FROM outbox.portal_sessions WHERE account_id = %s"
        assert site.sql.one(sessions, (account,)) == 1
        frame.get_by_role("button", name="Sign out").click()
        expect(frame.get_by_role("heading", level=1)).to_have_text("You are signed out")
        assert site.sql.one(sessions, (account,)) == 0

    def test_only_the_allowed_origins_may_frame_it(
        self, new_page: Page, site: Site, host_app: HostApp, problems: list[str]
    ) -> None:
        """The policy names the allowed origins and nothing else; the same host page on
        another port (another origin) gets no page in its frame."""
        link = operator_link(site, site.account())
        answer = new_page.request.get(link)
        policy = answer.headers["content-security-policy"]
        assert f"frame-ancestors https://app.example.com {host_app.origin};" in policy
        assert "x-frame-options" not in answer.headers
        other = HostApp()
        try:
            other.frame_src = link
            new_page.goto(f"{other.origin}/")
            frame = new_page.frame_locator("#webhooks")
            expect(frame.get_by_role("button", name="Continue")).to_have_count(0)
            wait_until(
                lambda: any(f.url.startswith("chrome-error:") for f in new_page.frames),
                what="Chromium to refuse the frame",
            )
            wait_until(lambda: problems, what="Chromium to say why")
            (refused,) = problems
            assert "frame-ancestors" in refused and "has been blocked" in refused
            problems.clear()
        finally:
            other.server.shutdown()

    def test_top_level_still_uses_the_cookie(self, new_page: Page, site: Site) -> None:
        """Opened as a page of its own, the link signs in with the HttpOnly cookie, and
        the page carries no session of its own."""
        page = signed_in(new_page, site, site.account())
        assert [c["name"] for c in page.context.cookies()] == ["outbox_session"]
        assert page.locator('meta[name="outbox-session"]').count() == 0
        assert page.locator('#signout input[name="session"]').input_value() == ""


class TestBranding:
    def test_product_name_accent_and_display_name(self, new_page: Page, site: Site) -> None:
        """The product's name in the title and header, its colour on the buttons, the
        customer's display name instead of the account id, and the events of the
        catalogue in the introduction."""
        account = site.account()
        page = signed_in(new_page, site, account, "Ada's Bakery")
        expect(page).to_have_title(f"Webhooks · Settings · {PRODUCT}")
        expect(page.locator(".product")).to_have_text(PRODUCT)
        expect(page.locator(".account")).to_have_text("Ada's Bakery")
        assert account not in page.locator("header").inner_text()
        intro = page.locator(".intro p").inner_text()
        assert f"in {PRODUCT}" in intro
        assert all(name in intro for name in EVENTS.values())
        red, green, blue = (int(ACCENT[i : i + 2], 16) for i in (1, 3, 5))
        expect(page.get_by_role("button", name="Add Webhook")).to_have_css(
            "background-color", f"rgb({red}, {green}, {blue})"
        )

    def test_a_bad_colour_stops_the_start(self, site: Site) -> None:
        """One line naming the setting, exit 2."""
        env = {**site.sidecar.env, "OUTBOX_PORTAL_ACCENT_COLOR": "purple"}
        started = outbox("serve", env=env)
        assert started.returncode == 2
        assert started.stderr.count("\n") == 1
        assert "OUTBOX_PORTAL_ACCENT_COLOR" in started.stderr and "#RRGGBB" in started.stderr


class TestLearning:
    def test_a_sample_delivery_that_verifies(self, new_page: Page, site: Site) -> None:
        """For the chosen event the form shows the request an endpoint gets; with a
        secret its X-Webhook-Signature verifies, by the page's own instructions, with
        the example secret it names; without one there is no signature."""
        page = signed_in(new_page, site, site.account())
        page.get_by_role("button", name="Add Webhook").click()
        page.get_by_label("Event", exact=True).select_option(label="Meeting Booked")
        page.get_by_text("What your endpoint receives").click()
        sample = page.locator("#sample-request")
        expect(sample).to_contain_text("X-Webhook-Event: meeting.booked")
        expect(sample).not_to_contain_text("X-Webhook-Signature")
        expect(page.locator("#sample-intro")).to_contain_text("no signature")
        page.locator("#f-secret").fill("my-own-secret-0123456789")
        expect(sample).to_contain_text("X-Webhook-Signature: sha256=")
        expect(page.locator("#sample-intro")).to_contain_text(EXAMPLE_SECRET)
        text = sample.inner_text()
        head, _, body = text.partition("\n\n")
        headers = dict(line.split(": ", 1) for line in head.splitlines()[1:])
        expected = hmac.new(EXAMPLE_SECRET.encode(), body.encode(), hashlib.sha256).hexdigest()
        assert headers["X-Webhook-Signature"] == f"sha256={expected}"
        assert '"event": "meeting.booked"' in body
        steps = page.locator(".verify li").all_inner_texts()
        assert len(steps) == 3 and "X-Webhook-Signature" in steps[2]
        assert "constant-time" in steps[2]

    def test_every_form_error_at_once_and_cleared_as_fixed(
        self, new_page: Page, site: Site
    ) -> None:
        """Create on an empty form names each missing field at once; correcting a field
        takes its error away and leaves the others."""
        page = signed_in(new_page, site, site.account())
        page.get_by_role("button", name="Add Webhook").click()
        page.locator("#f-secret").fill("short")
        page.get_by_role("button", name="Create").click()
        for name in ("name", "url", "event", "secret"):
            expect(field_error(page, name)).to_be_visible()
        expect(page.locator("#form-error")).to_have_text("Correct the 4 fields marked below.")
        page.get_by_label("Name", exact=True).fill("CRM Sync")
        expect(field_error(page, "name")).to_be_hidden()
        expect(field_error(page, "url")).to_be_visible()
        page.get_by_label("URL", exact=True).fill("http://")
        expect(field_error(page, "url")).to_have_text(
            "url must be an absolute https:// URL with a host"
        )
        page.get_by_label("URL", exact=True).fill("https://crm.example.com/hooks")
        page.get_by_label("Event", exact=True).select_option(label="Lead Scored")
        page.locator("#f-secret").fill("")
        for name in ("url", "event", "secret"):
            expect(field_error(page, name)).to_be_hidden()
        expect(page.locator("#form-error")).to_be_hidden()

    def test_a_phone_sees_status_and_actions_without_scrolling_sideways(
        self, new_page: Page, site: Site, tmp_path: Path
    ) -> None:
        """At 390 pixels each webhook is a card whose status, reason and buttons lie
        inside the screen, and the page is no wider than the screen."""
        account = site.account()
        failing = site.hook(account, name="Slack Alerts", event="reply.received", url=site.url(503))
        site.hook(
            account,
            name="A webhook with a rather long name for a small screen",
            event="enrichment.completed",
            url="https://pipeline.example.com/" + "very-long-path-segment/" * 6,
        )
        site.sql.emit(account, "reply.received", {"lead": {"id": 1}})
        wait_until(lambda: site.status(failing) == "failed", what="the failed delivery")
        # An address a reader recognises, rather than the test receiver's.
        site.sql(
            "UPDATE outbox.webhooks SET url = 'https://hooks.slack.example.com/services/T000/B000'"
            " WHERE id = %s",
            (failing,),
        )
        page = signed_in(new_page, site, account, "Ada's Bakery")
        page.set_viewport_size({"width": 390, "height": 844})
        expect(row(page, "Slack Alerts").locator(".reason")).to_have_text("HTTP 503")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for card in page.locator("#webhook-rows tr").all():
            for part in [
                card.locator("td.last .status"),
                card.get_by_role("switch"),
                *card.get_by_role("button").all(),
            ]:
                box = part.bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        # docs/settings-webhooks-phone.png changes only on purpose (`make screenshot`).
        shot = tmp_path / PHONE_SCREENSHOT.name
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("OUTBOX_UPDATE_SCREENSHOT") == "1" or not PHONE_SCREENSHOT.exists():
            shutil.copyfile(shot, PHONE_SCREENSHOT)
