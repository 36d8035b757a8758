"""The settings page's pure parts: link tokens, TTLs, templates, static files, and the
OUTBOX_PUBLIC_URL setting."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest

from outbox import portal
from outbox.config import ConfigError, Settings
from outbox.webhooks import Invalid

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


class TestTtl:
    @pytest.mark.parametrize(
        ("raw", "seconds"),
        [("15m", 900), ("1h", 3600), ("90s", 90), ("90", 90), (" 2H ", 7200), ("1.5m", 90)],
    )
    def test_durations(self, raw: str, seconds: int) -> None:
        assert portal.parse_ttl(raw) == seconds

    @pytest.mark.parametrize("raw", ["0", "0s", "25h", "86401", "-1m", "soon", "", "1d"])
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
        page = _parse(portal.settings_page(session))
        meta = [a for t, a in page.tags if t == "meta" and a.get("name") == "outbox-csrf-token"]
        assert meta == [{"name": "outbox-csrf-token", "content": "csrf-token_1"}]
        assert not any(t == "script" and "src" not in a for t, a in page.tags)
        assert 'acct_<script>"x"</script>' in "".join(page.text)

    def test_message_pages_escape_their_words(self) -> None:
        page = portal.message_page("<b>title</b>", "a & <i>b</i>")
        assert "<b>" not in page and "&lt;b&gt;title" in page and "a &amp; &lt;i&gt;" in page

    @pytest.mark.parametrize("name", ["webhooks.html", "message.html", "signed-in.html"])
    def test_no_template_has_inline_script_or_style(self, name: str) -> None:
        """The CSP forbids them, so none may be there: scripts come from files, styles
        from the stylesheet, and no element has an on* handler or a style attribute."""
        page = _parse((portal.STATIC_DIR / name).read_text())
        for tag, attributes in page.tags:
            assert not (tag == "script" and "src" not in attributes), name
            assert tag != "style", name
            assert not any(key.startswith("on") or key == "style" for key in attributes), tag

    def test_the_script_never_parses_strings_as_html(self) -> None:
        """Every string reaches the page through textContent or a DOM attribute: the
        script uses none of the ways to turn a string into markup or code."""
        script = (portal.STATIC_DIR / "webhooks.js").read_text()
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

    def test_the_signed_in_page_moves_on_within_the_site(self) -> None:
        page = _parse(portal.signed_in_page())
        refresh = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "refresh"]
        assert refresh == [{"http-equiv": "refresh", "content": "0; url=../settings/webhooks"}]


class TestStaticFiles:
    def test_only_the_stylesheet_and_script(self) -> None:
        assert portal.static_path("webhooks.js") == portal.STATIC_DIR / "webhooks.js"
        assert portal.static_path("webhooks.css") == portal.STATIC_DIR / "webhooks.css"
        for name in ("webhooks.html", "../portal.py", "", "WEBHOOKS.JS", "webhooks.js/"):
            assert portal.static_path(name) is None

    def test_every_served_file_exists(self) -> None:
        for name in portal.STATIC_FILES:
            assert (portal.STATIC_DIR / name).is_file()

    def test_the_policy_is_the_strict_one(self) -> None:
        assert portal.CONTENT_SECURITY_POLICY == (
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
