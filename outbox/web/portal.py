"""The one-time links that open the settings page, and the page's sessions.

A host application hands its customer a link (``outbox portal-link``, or
``POST /api/v1/portal-links`` with its token). Fetching the link (GET) only shows a
page with a Continue button, so that mail scanners and chat previews that fetch links
use nothing up; the button POSTs the same link, which signs that browser in to the one
account and moves on to the page (outbox.web.page): plain JavaScript that calls the
same JSON API as everyone else, with the session cookie instead of a token.

- A link is ``<payload>.<signature>``: the account, an expiry and a random nonce,
  signed with HMAC-SHA256 under the key in outbox.portal_secret, so every replica
  accepts what any replica minted, also after restarts. Expiry goes by the database's
  clock. Signing in with a link records its nonce in outbox.portal_links_used, so it
  works once.
- Each process keeps the key it last read (LinkKeys), with how far the database's
  clock is from its own, so that a forged, mangled or expired link is refused without
  a database round trip: a flood of garbage links costs no connection of the pool.
- A session is a row of outbox.portal_sessions. The cookie carries a random token, of
  which the row keeps the SHA-256, the account, the expiry and a CSRF token. Rows
  rather than signed cookies, so that sessions can be ended (deleting an account's rows
  signs it out everywhere at once), at the cost of one lookup per request, the same as
  an API token's.
- Every change the page makes carries the CSRF token in ``X-CSRF-Token`` (checked by
  outbox.web.auth), besides the cookie being HttpOnly and SameSite=Strict, and named with
  the ``__Host-`` prefix over https, so that no other host of the domain can plant one.
- Signing in must come from the Continue page itself (same_origin), so that another
  site cannot sign a visitor's browser in to an account of its choosing.
- Inside another site's iframe (OUTBOX_PORTAL_FRAME_ANCESTORS) browsers that block
  third-party cookies would drop the session cookie, so there the Continue button's
  POST answers the settings page itself, with the session token in the page; its script
  keeps it in memory and sends it as ``X-Outbox-Session``. The token is then readable
  by the page's own script, which the cookie never is: that is why a top-level page
  keeps the cookie.
- A link may carry a display name (the customer's name in the SaaS), shown instead of
  the account id; it is signed with the rest of the link, so no one can change it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg

from outbox import db
from outbox.config import parse_duration
from outbox.errors import Invalid

__all__ = [
    "DISPLAY_NAME_MAX",
    "KEY_REREAD_SECONDS",
    "LINK_SECONDS",
    "LINK_SECONDS_MAX",
    "SECURE_SESSION_COOKIE",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "TOKEN_MAX",
    "Claims",
    "Link",
    "LinkKey",
    "LinkKeys",
    "LinkRefused",
    "Session",
    "check",
    "check_display_name",
    "cookie_name",
    "end_session",
    "end_sessions",
    "mint",
    "open_link",
    "parse_ttl",
    "same_origin",
    "session",
    "sign",
    "verify",
    "well_formed",
]

# Over plain http (local development) the cookie has a plain name; over https it has
# the __Host- prefix, which browsers accept only from this very host, Secure, for the
# path /, without a Domain: no sibling subdomain can set or shadow it.
SESSION_COOKIE = "outbox_session"
SECURE_SESSION_COOKIE = "__Host-outbox_session"
# A session lasts a working day from the moment the link was opened.
SESSION_SECONDS = 8 * 3600
LINK_SECONDS = 15 * 60
LINK_SECONDS_MAX = 24 * 3600

# Domain separation: this key signs nothing else, but a signature says what it is for.
_CONTEXT = b"outbox portal link v1\x00"
# A link must fit comfortably in a URL: an account id of up to 256 characters (at most
# 1 KiB of UTF-8) makes a token of at most about 1.5 KiB.
TOKEN_MAX = 2048
_ACCOUNT_MAX = 256
# A session cookie is 32 random bytes in unpadded URL-safe base64 (see ``start``).
_COOKIE_FORM = re.compile(r"[A-Za-z0-9_-]{43}")
_AGAIN = "Go back to your account and open Settings > Webhooks again to get a new link."
DISPLAY_NAME_MAX = 100


@dataclass(frozen=True)
class Claims:
    """What a link says: whose settings page it opens, until when, and its nonce."""

    account_id: str
    expires: int  # Unix seconds, by the database's clock
    nonce: str
    display_name: str | None = None  # shown instead of the account id


class LinkRefused(Exception):
    """A link that does not open the page: forged or mangled, expired, or used."""

    _WHY = {
        "invalid": (
            400,
            "This link is not valid",
            "It may have been copied incompletely or changed.",
        ),
        "expired": (
            410,
            "This link has expired",
            "Links to the settings page work for a short time only.",
        ),
        "used": (
            410,
            "This link has already been used",
            "Each link to the settings page works once.",
        ),
    }

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.status, self.title, why = self._WHY[reason]
        self.explanation = f"{why} {_AGAIN}"
        super().__init__(f"{self.title}: {why}")


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> str:
    return _b64encode(hmac.new(secret, _CONTEXT + payload.encode(), hashlib.sha256).digest())


def sign(secret: bytes, claims: Claims) -> str:
    """The link token for ``claims``: URL-safe, ``<payload>.<signature>``."""
    body: dict[str, Any] = {"a": claims.account_id, "e": claims.expires, "n": claims.nonce}
    if claims.display_name is not None:
        body["d"] = claims.display_name
    payload = _b64encode(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    return f"{payload}.{_mac(secret, payload)}"


def _well_formed(token: str) -> None:
    if len(token) > TOKEN_MAX or not token.isascii() or token.count(".") != 1:
        raise LinkRefused("invalid")


def verify(secret: bytes, token: str) -> Claims:
    """The claims of a token this key signed; LinkRefused("invalid") for anything else.
    Whether it was used is for the database to say (see open_link)."""
    _well_formed(token)
    payload, signature = token.split(".")
    if not hmac.compare_digest(signature.encode(), _mac(secret, payload).encode()):
        raise LinkRefused("invalid")
    try:
        body = json.loads(_b64decode(payload))
    except (ValueError, binascii.Error):
        raise LinkRefused("invalid") from None
    if not (
        isinstance(body, dict)
        and isinstance(body.get("a"), str)
        and body["a"]
        and type(body.get("e")) is int
        and isinstance(body.get("n"), str)
        and body["n"]
        and isinstance(body.get("d", ""), str)
    ):
        raise LinkRefused("invalid")
    return Claims(body["a"], body["e"], body["n"], body.get("d"))


def check(secret: bytes, token: str, now: float) -> Claims:
    """The claims of a token this key signed that has not expired at ``now`` (Unix
    seconds by the database's clock); LinkRefused saying why not otherwise."""
    claims = verify(secret, token)
    if claims.expires <= now:
        raise LinkRefused("expired")
    return claims


# A link's ttl may have a space before its unit ("15 m"), which a DURATION setting may not.
_SPACE_BEFORE_UNIT = re.compile(r"(?<=[\d.])\s+(?=[A-Za-z]$)")


def parse_ttl(raw: str) -> int:
    """Seconds in a DURATION (``15m``, ``1h``, ``90s``, ``1d`` or ``90``); from 1 s to
    24 h."""
    try:
        seconds = math.ceil(parse_duration(_SPACE_BEFORE_UNIT.sub("", raw.strip())))
    except ValueError:
        seconds = 0
    if not 1 <= seconds <= LINK_SECONDS_MAX:
        raise Invalid(f"ttl must be a time like 15m, 1h or 90s, from 1s to 24h, not {raw!r}")
    return seconds


def check_display_name(display_name: str | None) -> str | None:
    """A display name for the page, trimmed: one line of 1 to 100 characters."""
    if display_name is None:
        return None
    name = display_name.strip()
    if not 1 <= len(name) <= DISPLAY_NAME_MAX or any(
        ord(c) < 32 or 127 <= ord(c) < 160 for c in name
    ):
        raise Invalid(
            f"display_name must be one line of 1 to {DISPLAY_NAME_MAX} characters, "
            f"not {display_name[:120]!r}"
        )
    try:
        name.encode()
    except UnicodeEncodeError:
        raise Invalid("display_name must be valid Unicode text") from None
    return name


def _check_account(account_id: str) -> str:
    if not account_id or not account_id.strip():
        raise Invalid("account_id must not be empty")
    if len(account_id) > _ACCOUNT_MAX or "\x00" in account_id:
        raise Invalid(f"account_id must be text of at most {_ACCOUNT_MAX} characters for a link")
    try:
        account_id.encode()
    except UnicodeEncodeError:
        raise Invalid("account_id must be valid Unicode text") from None
    return account_id


async def _secret(conn: psycopg.AsyncConnection[Any]) -> tuple[bytes, float]:
    """The signing key, and now by the database's clock."""
    key = await db.access.portal_key(conn)
    if key is None:
        raise RuntimeError("outbox.portal_secret is empty: run `outbox migrate`")
    return key


Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
# A link that fails under a key read this long ago or more makes the key be read again,
# so that a rotated key reaches every replica; sooner, it is refused outright.
KEY_REREAD_SECONDS = 10.0


@dataclass(frozen=True)
class LinkKey:
    """The signing key as read from the database, and when."""

    secret: bytes
    offset: float  # the database's clock minus this process's, in seconds
    read_at: float  # the LinkKeys clock (time.monotonic) when it was read

    def now(self) -> float:
        """Unix seconds by the database's clock, as far as this process can tell."""
        return time.time() + self.offset


class LinkKeys:
    """The key that links are checked with before anything else touches the database.

    It is read once, and again only when a link fails under a key read at least
    ``reread_after`` seconds ago: so garbage costs at most one query every ten seconds,
    and a rotated key (outbox.portal_secret) is picked up by the first link made with
    it. When that read fails, the link is refused under the key in hand.
    Passing this check is not the last word: signing in checks again in its
    transaction, under the key and the clock of the database.
    """

    def __init__(
        self,
        reread_after: float = KEY_REREAD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key: LinkKey | None = None
        self._reread_after = reread_after
        self._clock = clock
        # Requests that find the key missing or stale at the same moment wait here for
        # one read, rather than each taking a connection from the pool.
        self._reading = asyncio.Lock()

    async def _read(self, connect: Connect, stale: LinkKey | None) -> LinkKey:
        """A key newer than ``stale``: read now, or by whoever read it meanwhile."""
        async with self._reading:
            if self._key is not stale and self._key is not None:
                return self._key
            try:
                async with connect() as conn:
                    secret, now = await _secret(conn)
            except psycopg.OperationalError:
                if stale is not None:
                    # The database is away: keep the key in hand, and try again only
                    # after reread_after (those waiting here meanwhile take it as is).
                    self._key = dataclasses.replace(stale, read_at=self._clock())
                raise
            self._key = LinkKey(secret, now - time.time(), self._clock())
            return self._key

    async def check(self, token: str, connect: Connect) -> Claims:
        """The claims of an unexpired link signed with the current key, or
        LinkRefused; ``connect`` is called only when the key must be read."""
        _well_formed(token)
        key = self._key or await self._read(connect, None)
        try:
            return check(key.secret, token, key.now())
        except LinkRefused as refused:
            if refused.reason != "invalid" or self._clock() - key.read_at < self._reread_after:
                raise
            try:
                key = await self._read(connect, key)
            except psycopg.OperationalError:
                # A link that fails under the key in hand could not sign in now anyway.
                raise refused from None
        return check(key.secret, token, key.now())


@dataclass(frozen=True)
class Link:
    url: str
    expires_at: datetime


async def mint(
    conn: psycopg.AsyncConnection[Any],
    account_id: str,
    *,
    base_url: str,
    seconds: int = LINK_SECONDS,
    display_name: str | None = None,
) -> Link:
    """A one-time link to ``account_id``'s settings page, valid for ``seconds``; the
    page shows ``display_name`` instead of the account id."""
    _check_account(account_id)
    display_name = check_display_name(display_name)
    if not 1 <= seconds <= LINK_SECONDS_MAX:
        raise Invalid(f"ttl must be from 1 to {LINK_SECONDS_MAX} seconds")
    secret, now = await _secret(conn)
    expires = math.ceil(now + seconds)
    claims = Claims(account_id, expires, secrets.token_urlsafe(16), display_name)
    token = sign(secret, claims)
    return Link(f"{base_url}/portal/{token}", datetime.fromtimestamp(expires, UTC))


@dataclass(frozen=True)
class Session:
    """A signed-in browser. ``cookie`` is set only when the session was just made."""

    account_id: str
    csrf_token: str
    expires_at: datetime
    cookie: str = ""
    display_name: str | None = None


def _digest(cookie: str) -> bytes:
    return hashlib.sha256(cookie.encode()).digest()


async def open_link(conn: psycopg.AsyncConnection[Any], token: str) -> Session:
    """Use a link once: a new session for its account, or LinkRefused saying why not.
    The signature and expiry are checked again here, under the database's key and
    clock, whatever a LinkKeys said before."""
    async with conn.transaction():
        secret, _ = await _secret(conn)
        claims = verify(secret, token)
        use = await db.access.use_link(
            conn,
            nonce=claims.nonce,
            account_id=claims.account_id,
            expires_at=datetime.fromtimestamp(claims.expires, UTC),
        )
        if not use.fresh:
            raise LinkRefused("expired")
        if not use.first_use:
            raise LinkRefused("used")
        cookie, csrf_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        expires_at = await db.access.create_session(
            conn,
            account_id=claims.account_id,
            session_sha256=_digest(cookie),
            csrf_token=csrf_token,
            seconds=SESSION_SECONDS,
            display_name=claims.display_name,
        )
    return Session(claims.account_id, csrf_token, expires_at, cookie, claims.display_name)


def well_formed(cookie: str) -> bool:
    """Whether ``cookie`` could be a session cookie we made (see ``start``); anything
    else is refused without asking the database."""
    return _COOKIE_FORM.fullmatch(cookie) is not None


async def session(conn: psycopg.AsyncConnection[Any], cookie: str) -> Session | None:
    """The session a cookie belongs to, or None when unknown or expired."""
    if not well_formed(cookie):
        return None
    row = await db.access.session(conn, _digest(cookie))
    if row is None:
        return None
    return Session(row.account_id, row.csrf_token, row.expires_at, display_name=row.display_name)


async def end_session(conn: psycopg.AsyncConnection[Any], cookie: str) -> None:
    """Sign out the browser holding ``cookie`` (nothing happens for an unknown one)."""
    await db.access.end_session(conn, _digest(cookie))


async def end_sessions(conn: psycopg.AsyncConnection[Any], account_id: str) -> int:
    """Sign the account out of every browser; how many sessions were still open."""
    if not account_id or not account_id.strip():
        raise Invalid("account_id must not be empty")
    if "\x00" in account_id:
        raise Invalid("account_id must not contain NUL characters")
    try:
        account_id.encode()
    except UnicodeEncodeError:
        raise Invalid("account_id must be valid Unicode text") from None
    return await db.access.end_sessions(conn, account_id)


def cookie_name(secure: bool) -> str:
    """The session cookie's name for a page served over https (``secure``) or not."""
    return SECURE_SESSION_COOKIE if secure else SESSION_COOKIE


def same_origin(headers: Mapping[str, str], hosts: set[str]) -> bool:
    """Whether a browser's POST came from a page of this server, as far as its headers
    tell: Sec-Fetch-Site when the browser sends it, else Origin (whose host must be one
    of ``hosts``). A client that sends neither is no browser a page could drive, and
    passes."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = headers.get("Origin")
    if origin is None:
        return True
    netloc = urlsplit(origin).netloc.lower()
    return bool(netloc) and netloc in {host.lower() for host in hosts if host}
