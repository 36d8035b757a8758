"""The settings page's pure parts: link tokens, TTLs, templates, static files, and the
OUTBOX_PUBLIC_URL setting."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import psycopg
import pytest

from outbox import db
from outbox.config import ConfigError, Settings
from outbox.errors import Invalid
from outbox.web import page as webpage
from outbox.web import portal

KEY = b"k" * 32
CLAIMS = portal.Claims("acct_1", 1_900_000_000, "nonce")


class TestLinkTokens:
    def test_a_signed_token_verifies_to_its_claims(self) -> None:
        token = portal.sign(KEY, CLAIMS)
        assert portal.verify(KEY, token) == CLAIMS

    def test_tokens_are_url_safe(self) -> None:
        """Any account id, markup and all, gives a token that fits a URL path as is."""
        token = portal.sign(KEY, portal.Claims('acct_<é>/"?#', 1, "n"))
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)
        assert portal.verify(KEY, token).account_id == 'acct_<é>/"?#'

    def test_another_key_does_not_verify(self) -> None:
        with pytest.raises(portal.LinkRefused) as refused:
            portal.verify(b"x" * 32, portal.sign(KEY, CLAIMS))
        assert refused.value.reason == "invalid" and refused.value.status == 400

    @pytest.mark.parametrize(
        "token",
        [
            "",
            ".",
            "abc",
            "a.b.c",
            "é.x",
            "x" * (portal.TOKEN_MAX + 1),
        ],
    )
    def test_malformed_tokens_are_invalid(self, token: str) -> None:
        with pytest.raises(portal.LinkRefused, match="not valid"):
            portal.verify(KEY, token)

    def test_a_changed_payload_is_invalid(self) -> None:
        """Swapping in the payload of another account's token breaks the signature."""
        mine = portal.sign(KEY, CLAIMS)
        theirs = portal.sign(KEY, portal.Claims("acct_2", CLAIMS.expires, "nonce"))
        forged = theirs.split(".")[0] + "." + mine.split(".")[1]
        with pytest.raises(portal.LinkRefused):
            portal.verify(KEY, forged)

    @pytest.mark.parametrize(
        "payload",
        [b"[]", b'{"a": "", "e": 1, "n": "n"}', b'{"a": "x", "e": "1", "n": "n"}', b"{", b"\xff"],
    )
    def test_signed_nonsense_is_invalid(self, payload: bytes) -> None:
        """Even a correctly signed payload must be well-formed claims."""
        body = portal._b64encode(payload)
        with pytest.raises(portal.LinkRefused):
            portal.verify(KEY, f"{body}.{portal._mac(KEY, body)}")

    def test_refusals_say_what_to_do(self) -> None:
        for reason, status in (("invalid", 400), ("expired", 410), ("used", 410)):
            refused = portal.LinkRefused(reason)
            assert refused.status == status
            assert "open Settings > Webhooks again" in refused.explanation


class TestCheck:
    def test_a_link_is_good_until_its_expiry(self) -> None:
        token = portal.sign(KEY, CLAIMS)
        assert portal.check(KEY, token, CLAIMS.expires - 0.5) == CLAIMS
        with pytest.raises(portal.LinkRefused) as refused:
            portal.check(KEY, token, CLAIMS.expires)
        assert refused.value.reason == "expired" and refused.value.status == 410

    def test_a_forged_link_is_invalid_whatever_the_time(self) -> None:
        with pytest.raises(portal.LinkRefused) as refused:
            portal.check(b"x" * 32, portal.sign(KEY, CLAIMS), CLAIMS.expires + 1)
        assert refused.value.reason == "invalid"


class _Conn:
    """Answers the portal_secret query the way the database does, and counts it."""

    def __init__(self, key: bytes, now: float) -> None:
        self.key = key
        self.now = now
        self.queries = 0
        self.away = False

    async def execute(self, query: str) -> _Conn:
        assert query == db.query("portal_secret")
        self.queries += 1
        if self.away:
            raise psycopg.OperationalError("the database is away")
        await asyncio.sleep(0)  # a round trip: other requests run meanwhile
        return self

    async def fetchone(self) -> tuple[bytes, float]:
        return self.key, self.now

    def __call__(self) -> Any:
        @asynccontextmanager
        async def connect() -> AsyncIterator[_Conn]:
            yield self

        return connect()


class TestLinkKeys:
    async def test_the_key_is_read_once_and_garbage_costs_nothing(self) -> None:
        """The first link reads the key; later ones, good, forged or mangled, are
        checked without a query."""
        conn = _Conn(KEY, time.time())
        keys = portal.LinkKeys()
        good = portal.sign(KEY, portal.Claims("acct_1", int(time.time()) + 60, "n"))
        assert (await keys.check(good, conn)).account_id == "acct_1"
        for bad in ("x" * 5000, "nonsense", good[:-2] + "AA", portal.sign(b"x" * 32, CLAIMS)):
            with pytest.raises(portal.LinkRefused, match="not valid"):
                await keys.check(bad, conn)
        assert conn.queries == 1

    async def test_a_malformed_link_needs_no_key_at_all(self) -> None:
        conn = _Conn(KEY, time.time())
        with pytest.raises(portal.LinkRefused):
            await portal.LinkKeys().check("not-a-link", conn)
        assert conn.queries == 0

    async def test_expiry_goes_by_the_databases_clock(self) -> None:
        """A database clock an hour ahead of this process's makes a link that expires
        in half an hour (by this process's clock) already expired."""
        conn = _Conn(KEY, time.time() + 3600)
        link = portal.sign(KEY, portal.Claims("acct_1", int(time.time()) + 1800, "n"))
        with pytest.raises(portal.LinkRefused, match="expired"):
            await portal.LinkKeys().check(link, conn)

    async def test_a_rotated_key_is_read_again_once_the_old_one_is_old_enough(self) -> None:
        """A link under a new key is refused while the key in hand is young, and
        accepted once a failure finds it older than reread_after."""
        conn = _Conn(KEY, time.time())
        new_key = b"n" * 32
        link = portal.sign(new_key, portal.Claims("acct_1", int(time.time()) + 60, "n"))
        young = portal.LinkKeys(reread_after=3600)
        await young.check(portal.sign(KEY, portal.Claims("a", int(time.time()) + 60, "m")), conn)
        conn.key = new_key
        with pytest.raises(portal.LinkRefused):
            await young.check(link, conn)
        assert conn.queries == 1
        old = portal.LinkKeys(reread_after=0)
        conn.key = KEY
        await old.check(portal.sign(KEY, portal.Claims("a", int(time.time()) + 60, "m")), conn)
        conn.key = new_key
        assert (await old.check(link, conn)).account_id == "acct_1"

    async def test_a_burst_of_garbage_reads_a_stale_key_once(self) -> None:
        """Fifty forged links arriving together, when the key is due to be read
        again, make one read between them, not fifty."""
        conn = _Conn(KEY, time.time())
        keys = portal.LinkKeys(reread_after=0)
        await keys.check(portal.sign(KEY, portal.Claims("a", int(time.time()) + 60, "m")), conn)
        forged = portal.sign(b"x" * 32, CLAIMS)

        async def refused() -> str:
            try:
                await keys.check(forged, conn)
            except portal.LinkRefused as exc:
                return exc.reason
            return "accepted"

        reasons = await asyncio.gather(*(refused() for _ in range(50)))
        assert reasons == ["invalid"] * 50
        assert conn.queries == 2

    async def test_with_the_database_away_garbage_is_refused_under_the_key_in_hand(
        self,
    ) -> None:
        """When the key is due to be read again but the database does not answer, a
        forged link is still refused as invalid (not an error), and the next ones do
        not try again before reread_after."""
        conn = _Conn(KEY, time.time())
        now = [0.0]
        keys = portal.LinkKeys(reread_after=10, clock=lambda: now[0])
        await keys.check(portal.sign(KEY, portal.Claims("a", int(time.time()) + 60, "m")), conn)
        conn.away = True
        forged = portal.sign(b"x" * 32, CLAIMS)
        for at, queries in ((11, 2), (12, 2), (20, 2), (21.5, 3)):
            now[0] = at
            with pytest.raises(portal.LinkRefused, match="not valid"):
                await keys.check(forged, conn)
            assert conn.queries == queries, at


class TestSameOrigin:
    HOSTS = {"127.0.0.1:8080", "settings.example.com"}

    @pytest.mark.parametrize(
        "headers",
        [
            {"Sec-Fetch-Site": "same-origin"},
            {"Sec-Fetch-Site": "same-origin", "Origin": "https://evil.example"},
            {"Origin": "http://127.0.0.1:8080"},
            {"Origin": "https://Settings.Example.com"},
            {},
        ],
    )
    def test_posts_from_this_server_pass(self, headers: dict[str, str]) -> None:
        assert portal.same_origin(headers, self.HOSTS)

    @pytest.mark.parametrize(
        "headers",
        [
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Sec-Fetch-Site": "none"},
            {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:8080"},
            {"Origin": "https://evil.example"},
            {"Origin": "https://settings.example.com.evil.example"},
            {"Origin": "null"},
            {"Origin": ""},
        ],
    )
    def test_posts_from_elsewhere_fail(self, headers: dict[str, str]) -> None:
        assert not portal.same_origin(headers, self.HOSTS)

    def test_an_empty_host_matches_nothing(self) -> None:
        assert not portal.same_origin({"Origin": "null"}, {""})


def test_the_cookie_has_the_host_prefix_over_https_only() -> None:
    assert portal.cookie_name(True) == "__Host-outbox_session"
    assert portal.cookie_name(False) == "outbox_session"


class TestTtl:
    @pytest.mark.parametrize(
        ("raw", "seconds"),
        [
            ("15m", 900),
            ("1h", 3600),
            ("90s", 90),
            ("90", 90),
            (" 2H ", 7200),
            ("1.5m", 90),
            ("1d", 86400),
        ],
    )
    def test_durations(self, raw: str, seconds: int) -> None:
        assert portal.parse_ttl(raw) == seconds

    @pytest.mark.parametrize("raw", ["0", "0s", "25h", "86401", "-1m", "soon", "", "2d", "1w"])
    def test_out_of_range_or_unreadable(self, raw: str) -> None:
        with pytest.raises(Invalid, match="ttl"):
            portal.parse_ttl(raw)


class _Collector(HTMLParser):
    """Every start tag with its attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Collector:
    collector = _Collector()
    collector.feed(html)
    return collector


class TestPages:
    def test_the_settings_page_carries_the_session_escaped(self) -> None:
        session = portal.Session('acct_<script>"x"</script>', "csrf-token_1", datetime.now(UTC))
        page = _parse(webpage.settings_page(session, Settings()))
        meta = [a for t, a in page.tags if t == "meta" and a.get("name") == "outbox-csrf-token"]
        assert meta == [{"name": "outbox-csrf-token", "content": "csrf-token_1"}]
        assert not any(t == "script" and "src" not in a for t, a in page.tags)
        assert 'acct_<script>"x"</script>' in "".join(page.text)

    def test_message_pages_escape_their_words(self) -> None:
        page = webpage.message_page("<b>title</b>", "a & <i>b</i>")
        assert "<b>" not in page and "&lt;b&gt;title" in page and "a &amp; &lt;i&gt;" in page

    @pytest.mark.parametrize("name", ["webhooks.html", "message.html", "continue.html"])
    def test_no_template_has_inline_script_or_style(self, name: str) -> None:
        """The CSP forbids them, so none may be there: scripts come from files, styles
        from the stylesheet, and no element has an on* handler or a style attribute."""
        page = _parse((webpage.STATIC_DIR / name).read_text())
        for tag, attributes in page.tags:
            assert not (tag == "script" and "src" not in attributes), name
            assert tag != "style", name
            assert not any(key.startswith("on") or key == "style" for key in attributes), tag

    def test_the_script_never_parses_strings_as_html(self) -> None:
        """Every string reaches the page through textContent or a DOM attribute: the
        script uses none of the ways to turn a string into markup or code."""
        script = (webpage.STATIC_DIR / "webhooks.js").read_text()
        for sink in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            'setTimeout("',
            "createContextualFragment",
        ):
            assert sink not in script, sink

    def test_the_continue_page_posts_the_link_to_itself(self) -> None:
        """Its one form posts to the page's own address (the link), with no field, and
        it names the account, escaped; its referrer policy lets the browser send its
        Origin with the post."""
        page = _parse(webpage.continue_page(portal.Claims("acct_<i>1</i>", 2**31, "n")))
        forms = [a for t, a in page.tags if t == "form"]
        assert forms == [{"method": "post", "class": "continue"}]
        assert not any(t in ("input", "textarea", "select") for t, _ in page.tags)
        assert "acct_<i>1</i>" in "".join(page.text)
        referrer = [a for t, a in page.tags if t == "meta" and a.get("name") == "referrer"]
        assert referrer == [{"name": "referrer", "content": "same-origin"}]

    def test_the_settings_page_signs_out_with_its_csrf_token(self) -> None:
        """Sign out is a form that posts the session's CSRF token to ../settings/signout."""
        session = portal.Session("acct_1", "csrf-token_1", datetime.now(UTC))
        page = _parse(webpage.settings_page(session, Settings()))
        forms = [a for t, a in page.tags if t == "form" and a.get("method") == "post"]
        assert forms == [{"method": "post", "action": "signout", "id": "signout"}]
        hidden = [a for t, a in page.tags if t == "input" and a.get("type") == "hidden"]
        assert hidden == [
            {"type": "hidden", "name": "csrf_token", "value": "csrf-token_1"},
            # Filled in by the page's script only inside an iframe (no cookie there).
            {"type": "hidden", "name": "session", "value": ""},
        ]

    def test_the_signed_out_page_says_so(self) -> None:
        page = _parse(webpage.signed_out_page())
        assert "You are signed out" in "".join(page.text)


class TestStaticFiles:
    def test_only_the_stylesheet_and_script(self) -> None:
        assert webpage.static_path("webhooks.js") == webpage.STATIC_DIR / "webhooks.js"
        assert webpage.static_path("webhooks.css") == webpage.STATIC_DIR / "webhooks.css"
        for name in ("webhooks.html", "../portal.py", "", "WEBHOOKS.JS", "webhooks.js/"):
            assert webpage.static_path(name) is None

    def test_every_served_file_exists(self) -> None:
        for name in webpage.STATIC_FILES:
            assert (webpage.STATIC_DIR / name).is_file()

    def test_the_policy_is_the_strict_one(self) -> None:
        assert webpage.CONTENT_SECURITY_POLICY == (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
        )


class TestPublicUrl:
    def test_default_is_the_admin_address(self) -> None:
        assert Settings.from_env({}).public_url == "http://127.0.0.1:8080"
        assert Settings().public_url == Settings.from_env({}).public_url

    @pytest.mark.parametrize(
        ("listen", "url"),
        [
            ("127.0.0.1:9000", "http://127.0.0.1:9000"),
            ("0.0.0.0:8080", "http://127.0.0.1:8080"),
            (":8080", "http://127.0.0.1:8080"),
            ("[::]:8080", "http://[::1]:8080"),
            ("[::1]:8080", "http://[::1]:8080"),
            ("admin.internal:80", "http://admin.internal:80"),
            ("off", ""),
        ],
    )
    def test_follows_outbox_api_listen(self, listen: str, url: str) -> None:
        assert Settings.from_env({"OUTBOX_API_LISTEN": listen}).public_url == url

    @pytest.mark.parametrize(
        ("raw", "url"),
        [
            ("https://app.example.com", "https://app.example.com"),
            ("https://app.example.com/outbox/", "https://app.example.com/outbox"),
            ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ],
    )
    def test_outbox_public_url_wins(self, raw: str, url: str) -> None:
        env = {"OUTBOX_PUBLIC_URL": raw, "OUTBOX_API_LISTEN": "off"}
        assert Settings.from_env(env).public_url == url

    @pytest.mark.parametrize("raw", ["app.example.com", "ftp://x", "https://", "https://x/?a=1"])
    def test_anything_else_is_refused(self, raw: str) -> None:
        with pytest.raises(ConfigError, match="OUTBOX_PUBLIC_URL"):
            Settings.from_env({"OUTBOX_PUBLIC_URL": raw})


class TestRetryNote:
    """The page's footnote about retries (outbox.retry.retry_note says it)."""

    def test_the_page_shows_it_and_the_number_of_attempts(self) -> None:
        session = portal.Session("acct_1", "csrf", datetime.now(UTC))
        page = _parse(webpage.settings_page(session, Settings(retry_delays=(1.0, 2.0))))
        meta = [a for t, a in page.tags if t == "meta" and a.get("name") == "outbox-max-attempts"]
        assert meta == [{"name": "outbox-max-attempts", "content": "3"}]
        assert "retried up to 2 times: after about 1 second and 2 seconds" in "".join(page.text)


class TestInsideTheSaas:
    """Display names, frames and branding (contract 20)."""

    def test_a_display_name_is_signed_with_the_link(self) -> None:
        """It survives the round trip, and changing it breaks the signature."""
        key = b"k" * 32
        claims = portal.Claims("acct_1", 2**31, "nonce", "Ada's Bakery")
        token = portal.sign(key, claims)
        assert portal.verify(key, token) == claims
        signature = token.split(".")[1]
        other = portal.sign(key, portal.Claims("acct_1", 2**31, "nonce", "Mallory"))
        with pytest.raises(portal.LinkRefused):
            portal.verify(key, f"{other.split('.')[0]}.{signature}")
        assert (
            portal.verify(key, portal.sign(key, portal.Claims("a", 2**31, "n"))).display_name
            is None
        )

    @pytest.mark.parametrize("bad", ["", "   ", "x" * 101, "two\nlines", "tab\there"])
    def test_bad_display_names(self, bad: str) -> None:
        with pytest.raises(Invalid, match="display_name"):
            portal.check_display_name(bad)

    def test_the_page_names_the_customer_and_the_product(self) -> None:
        session = portal.Session("acct_1", "c", datetime.now(UTC), display_name="Ada's Bakery")
        page = webpage.settings_page(session, Settings(portal_product_name="AutoReach"))
        assert "Ada&#x27;s Bakery" in page and "acct_1" not in page
        assert "<title>Webhooks · Settings · AutoReach</title>" in page
        assert "Lead Created" in page and "Enrichment Completed" in page

    def test_framing_is_refused_unless_origins_are_given(self) -> None:
        assert webpage.page_headers(()) == webpage.PAGE_HEADERS
        headers = webpage.page_headers(("https://app.example.com", "http://localhost:3000"))
        assert "X-Frame-Options" not in headers
        policy = headers["Content-Security-Policy"]
        assert "frame-ancestors https://app.example.com http://localhost:3000;" in policy
        assert "'none'" not in policy.split("frame-ancestors")[1].split(";")[0]

    def test_the_theme(self) -> None:
        """The accent colour, a darker shade, and text that reads on it."""
        assert "--primary" not in webpage.theme_css("")
        dark = webpage.theme_css("#1f5fd6")
        assert "--primary: #1f5fd6;" in dark and "--on-primary: #ffffff;" in dark
        assert "--primary-dark: #194cab;" in dark
        assert "--on-primary: #111111;" in webpage.theme_css("#ffd84a")
