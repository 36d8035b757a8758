"""Portal links and the settings page's sessions, over HTTP, against a real `outbox run`
(contract sections 7, 9 and 10). What a browser does with them is in
test_portal_page.py.

One sidecar and database per module, as in test_api.py: each test works as accounts
of its own.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from outbox import localpg, portal
from tests.conftest import SQL, Sidecar, free_port
from tests.e2e.test_api import (
    ROUTES,
    Answer,
    Api,
    every_text_in_database,
    finished_delivery,
    hook_body,
    make_token,
    new_api,
    outbox,
    owned_rows,
    sidecar_env,
)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_UNSET: Any = object()


class Portal:
    """Two sidecars on one database: ``api`` (links printed with its own address) and
    ``replica`` (links printed with an https OUTBOX_PUBLIC_URL, as behind a proxy)."""

    def __init__(self, api: Api, replica: Api, sql: SQL) -> None:
        self.api = api
        self.replica = replica
        self.sql = sql

    def mint(self, account: str | None = None, body: Any = _UNSET, *, on: Api | None = None) -> str:
        """A link for ``account`` (default: the api's main account) made through the API."""
        api = on or self.api
        account = account or api.main
        answer = api(
            "POST", "/api/v1/portal-links", {} if body is _UNSET else body, account=account
        )
        assert answer.status == 201, answer
        url: str = answer.json["url"]
        return url

    def sign_in(self, account: str | None = None, *, on: Api | None = None) -> Session:
        """Open a fresh link as a browser would: the session cookie and the CSRF token
        the page carries."""
        api = on or self.api
        opened = api("GET", path_of(self.mint(account, on=on)), anonymous=True)
        assert opened.status == 200, opened
        cookie = session_cookie(opened)
        page = api("GET", "/settings/webhooks", anonymous=True, headers=cookie_header(cookie.value))
        assert page.status == 200, page
        match = re.search(rb'<meta name="outbox-csrf-token" content="([^"]+)">', page.body)
        assert match is not None
        return Session(api, cookie.value, match[1].decode())

    def secret(self) -> bytes:
        return bytes(self.sql.one("SELECT secret FROM outbox.portal_secret"))


class Session:
    """Calls to the API as the settings page makes them: cookie, and CSRF on changes."""

    def __init__(self, api: Api, cookie: str, csrf: str) -> None:
        self.api = api
        self.cookie = cookie
        self.csrf = csrf

    def __call__(
        self, method: str, path: str, body: Any = _UNSET, *, csrf: str | None = None
    ) -> Answer:
        headers = cookie_header(self.cookie)
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        if body is _UNSET:
            return self.api(method, path, anonymous=True, headers=headers)
        return self.api(method, path, body, anonymous=True, headers=headers)


def path_of(url: str) -> str:
    return urlsplit(url).path


def cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"{portal.SESSION_COOKIE}={value}"}


def session_cookie(answer: Answer) -> Any:
    cookies: SimpleCookie = SimpleCookie()
    cookies.load(answer.headers["Set-Cookie"])
    return cookies[portal.SESSION_COOKIE]


def _janitor(pg_server: localpg.Server, name: str, template: str) -> DatabaseJanitor:
    return DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        dbname=name,
        template_dbname=template,
    )


@pytest.fixture(scope="module")
def sidecars_pair(
    pg_server: localpg.Server,
    template_db: str,
    ca_file: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Sidecar, Sidecar, SQL]]:
    name = f"outbox_portal_{uuid.uuid4().hex[:12]}"
    janitor = _janitor(pg_server, name, template_db)
    janitor.init()
    url = pg_server.url(name)
    logs = Path(tmp_path_factory.mktemp("portal"))
    first = Sidecar(sidecar_env(url, ca_file), logs / "first.log").start()
    env = sidecar_env(url, ca_file) | {"OUTBOX_PUBLIC_URL": "https://settings.example.com/"}
    second = Sidecar(env, logs / "second.log").start()
    sql = SQL(url)
    try:
        yield first, second, sql
    finally:
        first.stop()
        second.stop()
        sql.conn.close()
        janitor.drop()


@pytest.fixture
def p(sidecars_pair: tuple[Sidecar, Sidecar, SQL]) -> Portal:
    first, second, sql = sidecars_pair
    api = new_api(first, sql)
    replica = Api(second, api.main, api.other, api.tokens)
    return Portal(api, replica, sql)


class TestMinting:
    def test_the_cli_prints_the_link_alone(self, p: Portal) -> None:
        """`outbox portal-link` prints one URL on stdout, on the admin server's address,
        and says on stderr until when it opens; the link works."""
        made = outbox("portal-link", "--account", p.api.main, env=p.api.sidecar.env)
        assert made.returncode == 0, made.stderr
        url = made.stdout.strip()
        assert made.stdout == url + "\n"
        assert url.startswith(f"http://127.0.0.1:{p.api.port}/portal/")
        assert "opens once" in made.stderr and url not in made.stderr
        assert p.api("GET", path_of(url), anonymous=True).status == 200

    def test_the_cli_uses_outbox_public_url_and_ttl(self, p: Portal) -> None:
        """OUTBOX_PUBLIC_URL is the base of printed links; --ttl sets their expiry."""
        env = p.replica.sidecar.env
        before = datetime.now(UTC)
        made = outbox("portal-link", "--account", p.api.main, "--ttl", "2h", env=env)
        assert made.returncode == 0, made.stderr
        assert made.stdout.startswith("https://settings.example.com/portal/")
        token = path_of(made.stdout.strip()).rsplit("/", 1)[1]
        claims = portal.verify(p.secret(), token)
        assert claims.account_id == p.api.main
        expires = datetime.fromtimestamp(claims.expires, UTC)
        assert (
            timedelta(hours=2) - timedelta(seconds=5)
            < expires - before
            < timedelta(hours=2, seconds=5)
        )

    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["--ttl", "0"], "ttl"),
            (["--ttl", "25h"], "ttl"),
            (["--ttl", "soon"], "ttl"),
        ],
    )
    def test_the_cli_refuses_bad_input(self, p: Portal, args: list[str], says: str) -> None:
        made = outbox("portal-link", "--account", p.api.main, *args, env=p.api.sidecar.env)
        assert made.returncode == 2 and made.stdout == ""
        assert says in made.stderr and len(made.stderr.splitlines()) == 1

    def test_the_cli_refuses_an_empty_account_and_a_missing_address(self, p: Portal) -> None:
        env = p.api.sidecar.env
        empty = outbox("portal-link", "--account", "", env=env)
        assert empty.returncode == 2 and "account_id" in empty.stderr
        off = outbox("portal-link", "--account", "a", env=env | {"OUTBOX_API_LISTEN": "off"})
        assert off.returncode == 2 and "OUTBOX_PUBLIC_URL" in off.stderr
        bad = outbox("portal-link", "--account", "a", env=env | {"OUTBOX_PUBLIC_URL": "ftp://x"})
        assert bad.returncode == 2 and "OUTBOX_PUBLIC_URL" in bad.stderr

    def test_the_api_makes_links_for_the_tokens_account(self, p: Portal) -> None:
        """201 with the url and its expiry (default 15 minutes, or ttl seconds); the
        link is for the token's account."""
        answer = p.api("POST", "/api/v1/portal-links")
        assert answer.status == 201, answer
        assert set(answer.json) == {"url", "expires_at"}
        expires = datetime.fromisoformat(answer.json["expires_at"])
        assert abs((expires - datetime.now(UTC)).total_seconds() - 900) < 5
        token = path_of(answer.json["url"]).rsplit("/", 1)[1]
        assert portal.verify(p.secret(), token).account_id == p.api.main
        short = p.api("POST", "/api/v1/portal-links", {"ttl": 60}, account=p.api.other)
        token = path_of(short.json["url"]).rsplit("/", 1)[1]
        assert portal.verify(p.secret(), token).account_id == p.api.other
        assert (
            p.replica("POST", "/api/v1/portal-links")
            .json["url"]
            .startswith("https://settings.example.com/portal/")
        )

    @pytest.mark.parametrize(
        "body", [{"ttl": 0}, {"ttl": 86401}, {"ttl": "15m"}, {"ttl": 1.5}, {"account": "x"}]
    )
    def test_the_api_refuses_bad_input(self, p: Portal, body: dict[str, Any]) -> None:
        answer = p.api("POST", "/api/v1/portal-links", body)
        assert answer.status == 422 and answer.error[0] == "invalid"

    def test_the_api_needs_a_token_not_a_session(self, p: Portal) -> None:
        """No token: 401. A session cookie, even with its CSRF token: 403, so a page
        cannot prolong its own access."""
        assert p.api("POST", "/api/v1/portal-links", anonymous=True).status == 401
        session = p.sign_in()
        refused = session("POST", "/api/v1/portal-links", {})
        assert refused.status == 403 and refused.error[0] == "forbidden"


class TestOpening:
    def test_a_link_opens_once_and_sets_a_strict_cookie(self, p: Portal) -> None:
        """The first opening answers the signed-in page with an HttpOnly, SameSite=Strict
        cookie for the whole server, not Secure over plain HTTP; a second opening is a
        410 error page that sets nothing."""
        path = path_of(p.mint())
        opened = p.api("GET", path, anonymous=True)
        assert opened.status == 200
        assert opened.headers["Content-Type"].startswith("text/html")
        assert b"../settings/webhooks" in opened.body
        cookie = session_cookie(opened)
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert not cookie["secure"]
        assert int(cookie["max-age"]) == portal.SESSION_SECONDS
        assert opened.headers["Cache-Control"] == "no-store"
        assert opened.headers["Referrer-Policy"] == "no-referrer"

        again = p.api("GET", path, anonymous=True)
        assert again.status == 410
        assert b"This link has already been used" in again.body
        assert "Set-Cookie" not in again.headers

    def test_links_work_on_every_replica_and_secure_behind_https(self, p: Portal) -> None:
        """A link made by one sidecar opens on another (the key is in the database); a
        sidecar whose public URL is https sets a Secure cookie; and it is used up
        everywhere."""
        path = path_of(p.mint())
        opened = p.replica("GET", path, anonymous=True)
        assert opened.status == 200
        assert session_cookie(opened)["secure"]
        assert p.api("GET", path, anonymous=True).status == 410

    def test_an_expired_link_is_refused(self, p: Portal) -> None:
        """A correctly signed link past its expiry: 410, no cookie, no session."""
        claims = portal.Claims(p.api.main, int(time.time()) - 1, uuid.uuid4().hex)
        answer = p.api("GET", f"/portal/{portal.sign(p.secret(), claims)}", anonymous=True)
        assert answer.status == 410
        assert b"This link has expired" in answer.body
        assert "Set-Cookie" not in answer.headers
        assert (
            p.sql.one(
                "SELECT count(*) FROM outbox.portal_sessions WHERE account_id = %s", (p.api.main,)
            )
            == 0
        )

    def test_a_link_expires_by_its_ttl(self, p: Portal) -> None:
        """A one-second link made by the CLI no longer opens two seconds later."""
        made = outbox("portal-link", "--account", p.api.main, "--ttl", "1s", env=p.api.sidecar.env)
        time.sleep(2.1)
        assert p.api("GET", path_of(made.stdout.strip()), anonymous=True).status == 410

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda t, key: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
            lambda t, key: "e" + t,
            lambda t, key: t.split(".")[0],
            lambda t, key: portal.sign(b"k" * 32, portal.verify(key, t)),
            lambda t, key: portal.sign(b"k" * 32, portal.Claims("acct_victim", 2**31, "n")),
            lambda t, key: "not-a-token",
            lambda t, key: "%C3%A9." + t,
        ],
        ids=[
            "signature changed",
            "payload changed",
            "no signature",
            "signed with another key",
            "made up",
            "not a token",
            "not ascii",
        ],
    )
    def test_a_forged_or_mangled_link_is_refused(self, p: Portal, mangle: Any) -> None:
        """Anything this server did not sign: 400, no cookie; the real link still works."""
        url = p.mint()
        token = path_of(url).rsplit("/", 1)[1]
        forged = mangle(token, p.secret())
        answer = p.api("GET", f"/portal/{forged}", anonymous=True)
        assert answer.status == 400, forged
        assert b"This link is not valid" in answer.body
        assert "Set-Cookie" not in answer.headers
        assert p.api("GET", path_of(url), anonymous=True).status == 200

    def test_opened_twice_at_once_it_opens_once(self, p: Portal) -> None:
        """Eight simultaneous openings of one link: exactly one session."""
        path = path_of(p.mint())
        barrier = threading.Barrier(8)
        statuses: list[int] = []

        def open_it() -> None:
            barrier.wait()
            statuses.append(p.api("GET", path, anonymous=True).status)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [200] + [410] * 7

    def test_used_nonces_are_kept_only_until_their_links_expire(self, p: Portal) -> None:
        """Opening a link sweeps the nonces of expired links, and keeps the rest."""
        p.sql(
            "INSERT INTO outbox.portal_links_used (nonce, account_id, expires_at)"
            " VALUES ('old', 'a', now() - interval '1 second'),"
            " ('live', 'a', now() + interval '1 hour')"
        )
        p.api("GET", path_of(p.mint()), anonymous=True)
        nonces = {r[0] for r in p.sql("SELECT nonce FROM outbox.portal_links_used")}
        assert "old" not in nonces and "live" in nonces


class TestSessions:
    def test_the_cookie_stands_for_a_token_of_its_account(self, p: Portal) -> None:
        """With the cookie and its CSRF token the page can do what a token can, for its
        own account only: another account's webhook answers 404."""
        session = p.sign_in()
        created = session("POST", "/api/v1/webhooks", hook_body())
        assert created.status == 201, created
        hook = created.json["id"]
        assert p.sql.one("SELECT account_id FROM outbox.webhooks WHERE id = %s", (hook,)) == (
            p.api.main
        )
        listed = session("GET", "/api/v1/webhooks").json["webhooks"]
        assert [h["id"] for h in listed] == [hook]
        assert session("PATCH", f"/api/v1/webhooks/{hook}", {"enabled": False}).status == 200
        theirs = p.api("POST", "/api/v1/webhooks", hook_body(), account=p.api.other).json["id"]
        assert session("GET", f"/api/v1/webhooks/{theirs}").status == 404
        assert session("DELETE", f"/api/v1/webhooks/{theirs}").status == 404
        assert session("DELETE", f"/api/v1/webhooks/{hook}").status == 204

    def test_every_change_needs_the_csrf_token(self, p: Portal, receiver_url: str) -> None:
        """Every non-GET route called with the cookie but without its CSRF token, or with
        another session's: 403, nothing changes, nothing is sent."""
        session = p.sign_in()
        other_session = p.sign_in()
        hook, delivery = finished_delivery(p.sql, p.api.main, receiver_url)
        before = owned_rows(p.sql, p.api.main)
        changes = [r for r in ROUTES if r[0] != "GET"]
        assert changes
        for method, template, body in changes:
            path = template.format(webhook=hook, delivery=delivery)
            for wrong in ("", other_session.csrf, session.csrf[:-1]):
                payload = _UNSET if body is None else body
                answer = session(method, path, payload, csrf=wrong)
                assert answer.status == 403, (method, path, answer)
                assert answer.error[0] == "forbidden"
                assert "X-CSRF-Token" in answer.error[1]
        assert owned_rows(p.sql, p.api.main) == before
        # Reading needs no CSRF token.
        assert session("GET", f"/api/v1/webhooks/{hook}", csrf="").status == 200

    def test_a_token_always_wins_over_a_cookie(self, p: Portal) -> None:
        """An Authorization header is judged alone: a bad token with a good cookie is
        401, and a good token needs no CSRF token even with a cookie present."""
        session = p.sign_in()
        headers = cookie_header(session.cookie)
        bad = p.api("GET", "/api/v1/webhooks", token="obx_nope", headers=headers)
        assert bad.status == 401
        good = p.api("POST", "/api/v1/webhooks", hook_body(), headers=headers)
        assert good.status == 201

    def test_an_ended_session_is_401_and_the_page_says_so(self, p: Portal) -> None:
        """After its expiry, or once its row is deleted, the cookie is worth nothing:
        the API answers 401 and the page an error page."""
        session = p.sign_in()
        p.sql(
            "UPDATE outbox.portal_sessions SET expires_at = now() - interval '1 second'"
            " WHERE account_id = %s",
            (p.api.main,),
        )
        assert session("GET", "/api/v1/webhooks").status == 401
        page = p.api(
            "GET", "/settings/webhooks", anonymous=True, headers=cookie_header(session.cookie)
        )
        assert page.status == 401 and b"You are not signed in" in page.body

        again = p.sign_in()
        p.sql("DELETE FROM outbox.portal_sessions WHERE account_id = %s", (p.api.main,))
        assert again("GET", "/api/v1/webhooks").status == 401

    def test_a_made_up_cookie_is_401(self, p: Portal) -> None:
        for value in ("x", "a" * 500, portal.SESSION_COOKIE):
            answer = p.api("GET", "/api/v1/webhooks", anonymous=True, headers=cookie_header(value))
            assert answer.status == 401 and answer.error[0] == "unauthorized"

    def test_only_a_digest_of_the_session_is_stored(self, p: Portal) -> None:
        session = p.sign_in()
        assert session.cookie not in every_text_in_database(p.sql)


class TestPages:
    def test_the_page_needs_a_session(self, p: Portal) -> None:
        """Without a cookie: a 401 page that says how to get in."""
        page = p.api("GET", "/settings/webhooks", anonymous=True)
        assert page.status == 401
        assert b"You are not signed in" in page.body
        assert b"Settings &gt; Webhooks again" in page.body

    def test_every_page_and_file_has_the_strict_policy(self, p: Portal) -> None:
        """The page, the files it loads, the sign-in step and the error pages all carry
        the Content-Security-Policy, nosniff and DENY framing."""
        session = p.sign_in()
        answers = [
            p.api(
                "GET", "/settings/webhooks", anonymous=True, headers=cookie_header(session.cookie)
            ),
            p.api("GET", "/static/webhooks.js", anonymous=True),
            p.api("GET", "/static/webhooks.css", anonymous=True),
            p.api("GET", path_of(p.mint()), anonymous=True),
            p.api("GET", "/portal/forged.token", anonymous=True),
            p.api("GET", "/settings/webhooks", anonymous=True),
        ]
        for answer in answers:
            assert answer.headers["Content-Security-Policy"] == CSP
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
            assert answer.headers["X-Frame-Options"] == "DENY"
        assert answers[0].status == 200 and answers[0].headers["Cache-Control"] == "no-store"
        assert answers[1].headers["Content-Type"].startswith("text/javascript")
        assert answers[2].headers["Content-Type"].startswith("text/css")

    def test_only_the_pages_files_are_served(self, p: Portal) -> None:
        """The templates and anything outside outbox/static stay unserved."""
        for name in ("webhooks.html", "message.html", "..%2Fportal.py", "%2E%2E%2Fapi.py"):
            assert p.api("GET", f"/static/{name}", anonymous=True).status == 404, name

    def test_the_account_is_shown_as_text(self, p: Portal) -> None:
        """An account id with markup in it comes out escaped in the page."""
        account = f'acct_<b>"{uuid.uuid4().hex[:6]}"</b>'
        p.api.tokens[account] = make_token(p.sql, account)
        session = p.sign_in(account)
        page = p.api(
            "GET", "/settings/webhooks", anonymous=True, headers=cookie_header(session.cookie)
        )
        assert b"<b>" not in page.body
        assert b"acct_&lt;b&gt;&quot;" in page.body


@pytest.fixture
def receiver_url() -> str:
    """A URL that nothing is sent to in these tests."""
    return f"https://127.0.0.1:{free_port()}/hook"
