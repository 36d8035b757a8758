"""Who is asking the admin server, and for which account.

An ``/api/`` call is made for one account: the one its bearer token belongs to; for an
operator token, the one named in the ``Outbox-Account`` header; or, for the settings
page's own calls, the one its session was signed in to (then every change must also
carry the session's CSRF token in ``X-CSRF-Token``, which only the page itself can
read). The page sends its session as the cookie, or, inside another site's iframe where
browsers keep third-party cookies away, as the ``X-Outbox-Session`` header. A request
with an Authorization header is judged by its token alone.

``Outbox-Account`` on anything but an operator token is refused (403) unless it names
the credential's own account: a header never widens what a credential may see.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from outbox import db, tokens
from outbox.web import http, portal
from outbox.web.http import ApiError

__all__ = [
    "ACCOUNT",
    "ACCOUNT_HEADER",
    "CREDENTIALS",
    "CSRF_HEADER",
    "ROSTER",
    "SESSION",
    "SESSION_HEADER",
    "Credentials",
    "Roster",
    "account",
    "authenticate",
    "session_cookie",
    "session_of",
]

# Set by the auth middleware on every /api/ request that got past it: the account, or
# None for an operator token that named none (see ``account``).
ACCOUNT = "outbox.account"
# Set as well when that request was signed in by the settings page's session.
SESSION = "outbox.session"
CSRF_HEADER = "X-CSRF-Token"
# The account an operator token acts for.
ACCOUNT_HEADER = "Outbox-Account"
# The settings page's session when no cookie can carry it (a page inside an iframe).
SESSION_HEADER = "X-Outbox-Session"
_ACCOUNT_MAX = 256
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A credential that answered for an account this recently takes the open lane.
KNOWN_FOR = 3600.0
KNOWN_MAX = 10_000
# Credentials never seen valid wait their turn in a lane of one connection; past this
# many waiting, more are turned away at once.
STRANGERS_WAITING = 64
# How often the roster of tokens may be read again, and how many requests with tokens
# not in it may wait for that at once (more are refused as unknown).
ROSTER_EVERY = 1.0
ROSTER_WAITING = 1000


class Credentials:
    """Two lanes to the database for looking session cookies up (tokens have the
    Roster).

    A cookie that answered for an account lately takes the open lane: the pool, like any
    request. One never seen valid takes a lane of one connection, so that however many
    clients send made-up cookies, they hold at most one of the pool's connections and
    valid clients are not queued behind them. Both lanes ask the database every time:
    an ended session stops at once.
    """

    def __init__(self) -> None:
        # Digest of a credential -> when it last answered for an account.
        self._known: OrderedDict[bytes, float] = OrderedDict()
        self._strangers = asyncio.Semaphore(1)
        self._waiting = 0

    async def look_up(
        self, credential: str, ask: Callable[[], Awaitable[Any | None]]
    ) -> Any | None:
        """What ``ask()`` finds for ``credential``, through the lane it deserves."""
        key = tokens.digest(credential)
        now = time.monotonic()
        seen = self._known.get(key)
        if seen is not None and now - seen < KNOWN_FOR:
            found = await ask()
        else:
            if self._waiting >= STRANGERS_WAITING:
                raise ApiError(
                    503,
                    "unavailable",
                    "too many requests with unknown credentials; try again",
                    {"Retry-After": "1"},
                )
            self._waiting += 1
            try:
                async with self._strangers:
                    found = await ask()
            finally:
                self._waiting -= 1
        if found is None:
            self._known.pop(key, None)
        else:
            self._known[key] = now
            self._known.move_to_end(key)
            while len(self._known) > KNOWN_MAX:
                self._known.popitem(last=False)
        return found


CREDENTIALS = web.AppKey("credentials", Credentials)


class Roster:
    """The digests of every API token there is, read in full from the database at most
    once every ROSTER_EVERY seconds, by one query however many requests ask.

    A token whose digest is not in it waits for the next reading (a token made a moment
    ago is in it then) and, still absent, is refused without a query of its own: a
    flood of made-up tokens costs one small query a second, and a valid token never
    queues behind it. Tokens in the roster are still looked up every time, so a
    revoked one stops at once.
    """

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._digests: set[bytes] = set()
        self._read_at = -ROSTER_EVERY
        self._reading: asyncio.Future[None] | None = None
        self._waiting = 0

    async def may_exist(self, token: str) -> bool:
        digest = tokens.digest(token)
        if digest in self._digests:
            return True
        if self._waiting >= ROSTER_WAITING:
            return False
        self._waiting += 1
        try:
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read())
            await asyncio.shield(self._reading)
        finally:
            self._waiting -= 1
        return digest in self._digests

    async def _read(self) -> None:
        try:
            await asyncio.sleep(max(0.0, self._read_at + ROSTER_EVERY - time.monotonic()))
            async with self._pool.connection(timeout=http.DB_WAIT) as conn:
                self._digests = await db.access.token_digests(conn)
            self._read_at = time.monotonic()
        finally:
            self._reading = None


ROSTER = web.AppKey("roster", Roster)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="outbox"'})


def session_cookie(request: web.Request) -> str | None:
    """The session cookie of the name this server gives it (see portal.cookie_name)."""
    return request.cookies.get(portal.cookie_name(http.secure(request)))


async def authenticate(request: web.Request) -> str | None:
    """The account an /api/ request acts for; None for an operator token that names
    none (routes that need an account then answer 400, see ``account``)."""
    if "Authorization" not in request.headers:
        sent = request.headers.get(SESSION_HEADER) or session_cookie(request)
        if sent is not None:
            return _own_account(request, await _authenticate_session(request, sent))
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("send a token: Authorization: Bearer <token>")
    if not tokens.well_formed(token) or not await request.app[ROSTER].may_exist(token):
        raise _unauthorized("unknown or revoked token")

    # A token in the roster exists (or did a moment ago): asked about at once, on the
    # pool like any request, so that a revoked one stops at once.
    async with http.connection(request) as conn:
        holder = await tokens.account(conn, token)
    if holder is None:
        raise _unauthorized("unknown or revoked token")
    if holder.operator:
        named = request.headers.get(ACCOUNT_HEADER)
        return None if named is None else _account_named(named)
    assert holder.account_id is not None
    return _own_account(request, holder.account_id)


def _account_named(raw: str) -> str:
    """The account an operator token names in Outbox-Account, checked."""
    named = raw.strip()
    if not named:
        raise ApiError(400, "bad_request", f"{ACCOUNT_HEADER} must name an account")
    if len(named) > _ACCOUNT_MAX or any(ord(c) < 32 or ord(c) == 127 for c in named):
        raise ApiError(
            400,
            "bad_request",
            f"{ACCOUNT_HEADER} must be an account id of at most {_ACCOUNT_MAX} characters, "
            "without control characters",
        )
    return named


def _own_account(request: web.Request, own: str) -> str:
    """``own``, the credential's account; Outbox-Account may only repeat it."""
    named = request.headers.get(ACCOUNT_HEADER)
    if named is not None and named.strip() != own:
        raise ApiError(
            403,
            "forbidden",
            f"this credential acts for one account only: {ACCOUNT_HEADER} is for operator "
            "tokens (outbox tokens create --operator)",
        )
    return own


async def _authenticate_session(request: web.Request, sent: str) -> str:
    """The settings page's calls: the session (cookie or header) stands for a token, and
    a change must also send the session's CSRF token, which only the page itself can
    read."""
    current = await session_of(request, sent)
    if current is None:
        raise _unauthorized("the session has ended: open a new link to the settings page")
    if request.method not in SAFE_METHODS:
        csrf = request.headers.get(CSRF_HEADER, "").encode(errors="replace")
        if not hmac.compare_digest(csrf, current.csrf_token.encode()):
            raise ApiError(
                403, "forbidden", f"missing or wrong {CSRF_HEADER}: reload the settings page"
            )
    request[SESSION] = current
    return current.account_id


async def session_of(request: web.Request, cookie: str) -> portal.Session | None:
    """The page session ``cookie`` stands for, or None; a cookie we cannot have made
    is refused without asking the database."""
    if not portal.well_formed(cookie):
        return None

    async def ask() -> portal.Session | None:
        async with http.connection(request) as conn:
            return await portal.session(conn, cookie)

    current: portal.Session | None = await request.app[CREDENTIALS].look_up(cookie, ask)
    return current


def account(request: web.Request) -> str:
    """The account the request acts for; 400 for an operator token that names none."""
    account: str | None = request[ACCOUNT]
    if account is None:
        raise ApiError(
            400,
            "missing_account",
            f"an operator token acts for the account named in the {ACCOUNT_HEADER} header: "
            f"send {ACCOUNT_HEADER}: <account id>",
        )
    return account
