"""Portal links and the settings page's sessions, over HTTP, against a real `outbox run`.
What a browser does with them is in test_portal_page.py.

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
from urllib.parse import urlencode, urlsplit

import psycopg
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from outbox.web import portal
from tests.conftest import SQL, Sidecar, free_port, wait_until
from tests.e2e.test_api import (
    DEEP_JSON,
    JSON_ROUTES,
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
from tools import localpg

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_UNSET: Any = object()
# What a browser sends with the Continue button's POST.
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}


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
        """Open a fresh link as a browser would (fetch it, press Continue): the
        session cookie and the CSRF token the page carries."""
        api = on or self.api
        path = path_of(self.mint(account, on=on))
        assert api("GET", path, anonymous=True).status == 200
        opened = api("POST", path, anonymous=True, headers=SAME_ORIGIN)
        assert opened.status == 303, opened
        name = cookie_name(api)
        cookie = session_cookie(opened, name)
        page = api(
            "GET", "/settings/webhooks", anonymous=True, headers=cookie_header(cookie.value, name)
        )
        assert page.status == 200, page
        match = re.search(rb'<meta name="outbox-csrf-token" content="([^"]+)">', page.body)
        assert match is not None
        return Session(api, cookie.value, match[1].decode(), name)

    def secret(self) -> bytes:
        return bytes(self.sql.one("SELECT secret FROM outbox.portal_secret"))


class Session:
    """Calls to the API as the settings page makes them: cookie, and CSRF on changes."""

    def __init__(self, api: Api, cookie: str, csrf: str, name: str) -> None:
        self.api = api
        self.cookie = cookie
        self.csrf = csrf
        self.name = name

    def __call__(
        self, method: str, path: str, body: Any = _UNSET, *, csrf: str | None = None
    ) -> Answer:
        headers = cookie_header(self.cookie, self.name)
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        if body is _UNSET:
            return self.api(method, path, anonymous=True, headers=headers)
        return self.api(method, path, body, anonymous=True, headers=headers)


def path_of(url: str) -> str:
    return urlsplit(url).path


def cookie_name(api: Api) -> str:
    """The session cookie's name on ``api``'s sidecar: prefixed when its public URL is
    https."""
    public_url = api.sidecar.env.get("OUTBOX_PUBLIC_URL", "")
    return portal.cookie_name(public_url.startswith("https://"))


def cookie_header(value: str, name: str = portal.SESSION_COOKIE) -> dict[str, str]:
    return {"Cookie": f"{name}={value}"}


def session_cookie(answer: Answer, name: str = portal.SESSION_COOKIE) -> Any:
    cookies: SimpleCookie = SimpleCookie()
    cookies.load(answer.headers["Set-Cookie"])
    return cookies[name]


def sessions_of(sql: SQL, account: str) -> int:
    return int(
        sql.one("SELECT count(*) FROM outbox.portal_sessions WHERE account_id = %s", (account,))
    )


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
        "body",
        # A DURATION string ("15m") is a ttl too (contract 20): test_api_operator.py.
        [
            {"ttl": 0},
            {"ttl": 86401},
            {"ttl": "25h"},
            {"ttl": "soon"},
            {"ttl": 1.5},
            {"account": "x"},
        ],
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
    def test_fetching_a_link_uses_nothing_up(self, p: Portal) -> None:
        """A GET, as a mail scanner or a chat preview makes it, answers a page with a
        Continue button that posts the link to itself, names the account, sets no
        cookie and records nothing; any number of times."""
        path = path_of(p.mint())
        for _ in range(3):
            shown = p.api("GET", path, anonymous=True)
            assert shown.status == 200, shown
            assert shown.headers["Content-Type"].startswith("text/html")
            assert b'<form method="post" class="continue">' in shown.body
            assert b">Continue</button>" in shown.body
            assert p.api.main.encode() in shown.body
            assert "Set-Cookie" not in shown.headers
            assert shown.headers["Cache-Control"] == "no-store"
            assert shown.headers["Referrer-Policy"] == "same-origin"
        used = "SELECT count(*) FROM outbox.portal_links_used WHERE account_id = %s"
        assert p.sql.one(used, (p.api.main,)) == 0
        assert sessions_of(p.sql, p.api.main) == 0
        assert p.api("POST", path, anonymous=True, headers=SAME_ORIGIN).status == 303

    def test_continue_signs_in_once_with_a_strict_cookie(self, p: Portal) -> None:
        """The POST answers a redirect to the settings page with an HttpOnly,
        SameSite=Strict cookie for the whole server, plainly named and not Secure over
        plain HTTP; a second POST is a 410 error page that sets nothing."""
        path = path_of(p.mint())
        opened = p.api("POST", path, anonymous=True, headers=SAME_ORIGIN)
        assert opened.status == 303
        assert opened.headers["Location"] == "../settings/webhooks"
        cookie = session_cookie(opened)
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert not cookie["secure"] and not cookie["domain"]
        assert int(cookie["max-age"]) == portal.SESSION_SECONDS
        assert opened.headers["Cache-Control"] == "no-store"
        assert opened.headers["Referrer-Policy"] == "no-referrer"
        assert sessions_of(p.sql, p.api.main) == 1

        again = p.api("POST", path, anonymous=True, headers=SAME_ORIGIN)
        assert again.status == 410
        assert b"This link has already been used" in again.body
        assert "Set-Cookie" not in again.headers

    def test_links_work_on_every_replica_and_the_cookie_is_host_prefixed_behind_https(
        self, p: Portal
    ) -> None:
        """A link made by one sidecar signs in on another (the key is in the database);
        a sidecar whose public URL is https names its cookie __Host-outbox_session,
        Secure, for /, with no Domain; and the link is used up everywhere."""
        path = path_of(p.mint())
        assert p.replica("GET", path, anonymous=True).status == 200
        opened = p.replica("POST", path, anonymous=True, headers=SAME_ORIGIN)
        assert opened.status == 303
        assert portal.SESSION_COOKIE + "=" not in opened.headers["Set-Cookie"].replace(
            portal.SECURE_SESSION_COOKIE, ""
        )
        cookie = session_cookie(opened, portal.SECURE_SESSION_COOKIE)
        assert cookie["secure"] and cookie["path"] == "/" and not cookie["domain"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        assert p.api("POST", path, anonymous=True, headers=SAME_ORIGIN).status == 410

    def test_each_server_reads_only_its_own_cookie_name(self, p: Portal) -> None:
        """Over https only the __Host- cookie signs in, and over http only the plain
        one: a cookie planted under the other name is worth nothing."""
        secure = p.sign_in(on=p.replica)
        plain = p.sign_in()
        assert secure.name == portal.SECURE_SESSION_COOKIE
        assert secure("GET", "/api/v1/webhooks").status == 200
        assert plain("GET", "/api/v1/webhooks").status == 200
        wrong_on_replica = cookie_header(plain.cookie, portal.SESSION_COOKIE)
        answer = p.replica("GET", "/api/v1/webhooks", anonymous=True, headers=wrong_on_replica)
        assert answer.status == 401
        page = p.replica("GET", "/settings/webhooks", anonymous=True, headers=wrong_on_replica)
        assert page.status == 401
        wrong_on_api = cookie_header(secure.cookie, portal.SECURE_SESSION_COOKIE)
        assert p.api("GET", "/api/v1/webhooks", anonymous=True, headers=wrong_on_api).status == 401

    def test_an_expired_link_is_refused(self, p: Portal) -> None:
        """A correctly signed link past its expiry: 410 to GET and POST, no cookie, no
        session."""
        claims = portal.Claims(p.api.main, int(time.time()) - 1, uuid.uuid4().hex)
        path = f"/portal/{portal.sign(p.secret(), claims)}"
        for method in ("GET", "POST"):
            answer = p.api(method, path, anonymous=True, headers=SAME_ORIGIN)
            assert answer.status == 410
            assert b"This link has expired" in answer.body
            assert "Set-Cookie" not in answer.headers
        assert sessions_of(p.sql, p.api.main) == 0

    def test_a_link_expires_by_its_ttl(self, p: Portal) -> None:
        """A one-second link made by the CLI no longer opens two seconds later."""
        made = outbox("portal-link", "--account", p.api.main, "--ttl", "1s", env=p.api.sidecar.env)
        time.sleep(2.1)
        path = path_of(made.stdout.strip())
        assert p.api("GET", path, anonymous=True).status == 410
        assert p.api("POST", path, anonymous=True, headers=SAME_ORIGIN).status == 410

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
        """Anything this server did not sign: 400 to GET and POST, no cookie; the real
        link still works."""
        url = p.mint()
        token = path_of(url).rsplit("/", 1)[1]
        forged = mangle(token, p.secret())
        for method in ("GET", "POST"):
            answer = p.api(method, f"/portal/{forged}", anonymous=True, headers=SAME_ORIGIN)
            assert answer.status == 400, forged
            assert b"This link is not valid" in answer.body
            assert "Set-Cookie" not in answer.headers
        assert p.api("POST", path_of(url), anonymous=True, headers=SAME_ORIGIN).status == 303

    @pytest.mark.parametrize(
        "headers",
        [
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:{port}"},
            {"Origin": "https://attacker.example"},
            {"Origin": "http://127.0.0.1:{port}.attacker.example"},
            {"Origin": "null"},
        ],
        ids=["cross-site", "same-site", "cross-site, own origin", "origin", "lookalike", "null"],
    )
    def test_another_site_cannot_sign_a_browser_in(
        self, p: Portal, headers: dict[str, str]
    ) -> None:
        """A POST that the browser says came from elsewhere (another site's form with
        the attacker's own link): 403, no cookie, and the link is not used up."""
        path = path_of(p.mint())
        headers = {k: v.format(port=p.api.port) for k, v in headers.items()}
        refused = p.api("POST", path, anonymous=True, headers=headers)
        assert refused.status == 403
        assert b"This sign-in was not completed" in refused.body
        assert "Set-Cookie" not in refused.headers
        assert sessions_of(p.sql, p.api.main) == 0
        assert p.api("POST", path, anonymous=True, headers=SAME_ORIGIN).status == 303

    def test_a_post_from_this_server_by_its_origin_signs_in(self, p: Portal) -> None:
        """Without Sec-Fetch-Site, an Origin of this server's address or of its public
        URL passes, and so does a client that sends neither (curl)."""
        own = {"Origin": f"http://127.0.0.1:{p.api.port}"}
        assert p.api("POST", path_of(p.mint()), anonymous=True, headers=own).status == 303
        public = {"Origin": "https://settings.example.com"}
        path = path_of(p.mint())
        assert p.replica("POST", path, anonymous=True, headers=public).status == 303
        assert p.api("POST", path_of(p.mint()), anonymous=True).status == 303

    def test_signed_in_twice_at_once_it_signs_in_once(self, p: Portal) -> None:
        """Eight simultaneous Continue presses of one link: exactly one session."""
        path = path_of(p.mint())
        barrier = threading.Barrier(8)
        statuses: list[int] = []

        def open_it() -> None:
            barrier.wait()
            statuses.append(p.api("POST", path, anonymous=True, headers=SAME_ORIGIN).status)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [303] + [410] * 7
        assert sessions_of(p.sql, p.api.main) == 1

    def test_used_nonces_are_kept_only_until_their_links_expire(self, p: Portal) -> None:
        """Signing in sweeps the nonces of expired links, and keeps the rest."""
        p.sql(
            "INSERT INTO outbox.portal_links_used (nonce, account_id, expires_at)"
            " VALUES ('old', 'a', now() - interval '1 second'),"
            " ('live', 'a', now() + interval '1 hour')"
        )
        p.api("POST", path_of(p.mint()), anonymous=True, headers=SAME_ORIGIN)
        nonces = {r[0] for r in p.sql("SELECT nonce FROM outbox.portal_links_used")}
        assert "old" not in nonces and "live" in nonces


def test_links_are_checked_before_the_database(sidecars: Any, sql: SQL) -> None:
    """Once a sidecar has read the link key, forged, mangled and expired links are
    answered with no database at all, and a good link still shows its Continue page:
    here the database refuses every connection, and only signing in needs it (503)."""
    sidecar = sidecars()
    api = new_api(sidecar, sql)
    good = path_of(Portal(api, api, sql).mint())
    assert api("GET", good, anonymous=True).status == 200
    secret = bytes(sql.one("SELECT secret FROM outbox.portal_secret"))
    expired = portal.sign(secret, portal.Claims(api.main, int(time.time()) - 1, "n"))
    forged = portal.sign(b"k" * 32, portal.Claims(api.main, 2**31, "n"))
    name = sql.one("SELECT current_database()")
    # A database cannot refuse connections while altered from within.
    admin = SQL(sql.url)
    admin.conn.close()
    admin.conn = psycopg.connect(sql.url, dbname="postgres", autocommit=True)
    admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        wait_until(
            lambda: (
                sql.one(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                == 0
            ),
            what="the sidecar's connections to end",
        )
        for method in ("GET", "POST"):
            for path, status in [
                (f"/portal/{forged}", 400),
                (f"{good[:-2]}xx", 400),
                ("/portal/garbage", 400),
                (f"/portal/{expired}", 410),
            ]:
                answer = api(method, path, anonymous=True, headers=SAME_ORIGIN)
                assert answer.status == status, (method, path, answer)
        assert api("GET", good, anonymous=True).status == 200
        assert api("POST", good, anonymous=True, headers=SAME_ORIGIN).status == 503
        assert (
            sql.one(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            == 0
        )
    finally:
        admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.conn.close()
    wait_until(
        lambda: api("POST", good, anonymous=True, headers=SAME_ORIGIN).status == 303,
        what="signing in once the database is back",
    )


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

    def test_json_nested_too_deep_is_400_for_the_page_too(
        self, p: Portal, receiver_url: str
    ) -> None:
        """The page's calls read their bodies like the API's: too deep is bad JSON."""
        session = p.sign_in()
        hook = p.sql.webhook(receiver_url, account=p.api.main)
        before = owned_rows(p.sql, p.api.main)
        headers = cookie_header(session.cookie) | {"X-CSRF-Token": session.csrf}
        for raw in DEEP_JSON:
            for method, template in JSON_ROUTES:
                path = template.format(webhook=hook)
                answer = p.api(method, path, anonymous=True, raw=raw, headers=headers)
                expected = 403 if path == "/api/v1/portal-links" else 400
                assert answer.status == expected, (method, path, answer)
        assert owned_rows(p.sql, p.api.main) == before

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


class TestSigningOut:
    def sign_out(self, p: Portal, session: Session, csrf: str | None = None) -> Answer:
        form = urlencode({"csrf_token": session.csrf if csrf is None else csrf}).encode()
        headers = cookie_header(session.cookie, session.name) | {
            "Content-Type": "application/x-www-form-urlencoded"
        }
        return session.api("POST", "/settings/signout", anonymous=True, raw=form, headers=headers)

    def test_sign_out_ends_this_browsers_session_only(self, p: Portal) -> None:
        """The page's Sign out form: a page saying so, the cookie cleared, the session
        gone; the account's other browsers stay signed in."""
        session, other = p.sign_in(), p.sign_in()
        answer = self.sign_out(p, session)
        assert answer.status == 200
        assert b"You are signed out" in answer.body
        assert answer.headers["Content-Security-Policy"] == CSP
        cleared = session_cookie(answer)
        assert cleared.value == "" and int(cleared["max-age"]) == 0 and cleared["path"] == "/"
        assert session("GET", "/api/v1/webhooks").status == 401
        assert other("GET", "/api/v1/webhooks").status == 200
        assert sessions_of(p.sql, p.api.main) == 1

    def test_sign_out_over_https_clears_the_prefixed_cookie(self, p: Portal) -> None:
        session = p.sign_in(on=p.replica)
        answer = self.sign_out(p, session)
        assert answer.status == 200
        cleared = session_cookie(answer, portal.SECURE_SESSION_COOKIE)
        assert cleared.value == "" and cleared["secure"] and int(cleared["max-age"]) == 0
        assert session("GET", "/api/v1/webhooks").status == 401

    def test_sign_out_needs_the_sessions_csrf_token(self, p: Portal) -> None:
        """Without the form's CSRF token (another page posting it) nothing ends."""
        session, other = p.sign_in(), p.sign_in()
        for wrong in ("", other.csrf, session.csrf[:-1]):
            answer = self.sign_out(p, session, wrong)
            assert answer.status == 403
            assert b"You are still signed in" in answer.body
            assert "Set-Cookie" not in answer.headers
        assert session("GET", "/api/v1/webhooks").status == 200

    def test_sign_out_without_a_session_only_says_so(self, p: Portal) -> None:
        answer = p.api("POST", "/settings/signout", anonymous=True)
        assert answer.status == 200 and b"You are signed out" in answer.body
        ended = p.api("POST", "/settings/signout", anonymous=True, headers=cookie_header("x"))
        assert ended.status == 200

    def test_the_api_ends_every_session_of_the_tokens_account(self, p: Portal) -> None:
        """DELETE /api/v1/portal-sessions with a token: 204, every session of that
        account ends on every replica, another account's do not."""
        mine = [p.sign_in(), p.sign_in(), p.sign_in(on=p.replica)]
        theirs = p.sign_in(p.api.other)
        answer = p.api("DELETE", "/api/v1/portal-sessions")
        assert answer.status == 204 and answer.body == b""
        for session in mine:
            assert session("GET", "/api/v1/webhooks").status == 401
        assert theirs("GET", "/api/v1/webhooks").status == 200
        assert sessions_of(p.sql, p.api.main) == 0
        assert p.api("DELETE", "/api/v1/portal-sessions").status == 204

    def test_the_api_call_needs_a_token_not_a_session(self, p: Portal) -> None:
        session = p.sign_in()
        assert p.api("DELETE", "/api/v1/portal-sessions", anonymous=True).status == 401
        refused = session("DELETE", "/api/v1/portal-sessions")
        assert refused.status == 403 and refused.error[0] == "forbidden"
        assert session("GET", "/api/v1/webhooks").status == 200

    def test_the_cli_ends_every_session_of_the_account(self, p: Portal) -> None:
        """`outbox portal-signout --account A` ends A's sessions and says how many."""
        mine = [p.sign_in(), p.sign_in()]
        theirs = p.sign_in(p.api.other)
        env = p.api.sidecar.env
        ended = outbox("portal-signout", "--account", p.api.main, env=env)
        assert ended.returncode == 0, ended.stderr
        assert ended.stdout == f"ended 2 settings-page sessions of account {p.api.main}\n"
        for session in mine:
            assert session("GET", "/api/v1/webhooks").status == 401
        assert theirs("GET", "/api/v1/webhooks").status == 200
        again = outbox("portal-signout", "--account", p.api.main, env=env)
        assert again.stdout == f"ended 0 settings-page sessions of account {p.api.main}\n"

    @pytest.mark.parametrize(
        ("args", "says"),
        [([], "--account"), (["--account", ""], "account_id"), (["--account", " "], "account_id")],
    )
    def test_the_cli_refuses_bad_input(self, p: Portal, args: list[str], says: str) -> None:
        made = outbox("portal-signout", *args, env=p.api.sidecar.env)
        assert made.returncode == 2 and made.stdout == ""
        assert says in made.stderr and len(made.stderr.splitlines()) == 1

    def test_revoking_the_last_token_leaves_sessions_open(self, p: Portal) -> None:
        """What docs/settings-page.md warns about: tokens and page sessions are separate,
        so revoking an account's tokens does not sign its browsers out; portal-signout
        does."""
        session = p.sign_in()
        p.sql("DELETE FROM outbox.api_tokens WHERE account_id = %s", (p.api.main,))
        assert p.api("GET", "/api/v1/webhooks").status == 401
        assert session("GET", "/api/v1/webhooks").status == 200


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
        """The templates and anything outside outbox/web/static stay unserved."""
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
