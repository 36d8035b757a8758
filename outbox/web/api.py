"""The admin HTTP API (aiohttp.web).

Every ``/api/`` call is made for one account: the one its bearer token belongs to. An
id that another account owns answers 404, exactly like an id that does not exist, so
the API tells no one what other accounts have. Handlers raise; one middleware
(outbox.web.http) turns what they raise into the error shape ``{"error": {"code",
"message"}}``. The rules for webhooks are the database's (see outbox.webhooks); this
module only checks that values have the right JSON types before passing them on.
``GET /healthz``, ``GET /readyz`` and ``GET /metrics`` need no token: the first and the
last answer from memory, and ``/readyz`` runs one tiny query.

The settings page (outbox.web.page) calls the same routes with its session cookie instead
of a token; outbox.web.auth says how either is judged. make_app serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from typing import Any

import psycopg
import structlog
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from outbox import db, deliverylog, errors, metrics, testsend, webhooks, wire
from outbox.config import Settings
from outbox.delivery import BLOCKED_WITHOUT_ADDRESS, Sender, for_tenant
from outbox.events import EVENTS, check_event, sample
from outbox.supervisor import Supervisor
from outbox.throttle import REPLAYS_PER_MINUTE, PerMinute, Refused, Throttle
from outbox.web import auth, http, openapi, page, portal
from outbox.web.http import ApiError, Handler

__all__ = ["BODY_LIMIT", "Stage", "make_app"]

log = structlog.get_logger("outbox.api")

# Test sends have a Sender of their own, so that they never take the connections
# deliveries need, and a Throttle.
TEST_SENDER = web.AppKey("test_sender", Sender)
THROTTLE = web.AppKey("throttle", Throttle)
# Retries and recoveries an account may ask for: each queues requests again, and what
# comes of them is read back, so no path replays without limit.
REPLAYS = web.AppKey("replays", PerMinute)
# Delivery logs being read per account, at most LOG_SLOTS at once.
LOGS = web.AppKey("logs", dict[str, int])
LOG_SLOTS = 2


class Stage:
    """What the admin server answers for: the sidecar's parts now, and whether it waits
    for its schema (then only the probes and /metrics answer; the API and the page
    would read a schema this version does not know). One server serves the process
    from its start to its end, and each wait and each run in between sets this."""

    def __init__(self) -> None:
        self.parts = Supervisor(give_up_after=0.0)
        self.waiting = True

    def wait(self, parts: Supervisor) -> None:
        self.parts, self.waiting = parts, True

    def run(self, parts: Supervisor) -> None:
        self.parts, self.waiting = parts, False


STAGE = web.AppKey("stage", Stage)
# How often the backlog gauges of /metrics are read from the database.
BACKLOG_EVERY = 5.0

# Request bodies are a handful of short fields; anything bigger is refused with 413.
BODY_LIMIT = 64 * 1024
PAGE_SIZE = 20
PAGE_MAX = 100
_BIGINT_MAX = 2**63 - 1

# The webhook object's fields are the OpenAPI document's: one list, so that what the API
# answers and what it documents cannot drift apart (the status query must select each).
_WEBHOOK_FIELDS = tuple(openapi.DOCUMENT["components"]["schemas"]["Webhook"]["properties"])
# What the delivery log may be filtered by (GET .../deliveries?status=).
DELIVERY_STATUSES = ("pending", "succeeded", "failed", "cancelled")
_WRITABLE = ("name", "url", "event", "format", "secret", "enabled", "headers", "rate_limit")
_INT_MAX = 2**31 - 1
# A change may also end a rotated-out secret's overlap early, by setting this to null.
_END_OVERLAP = "previous_secret_expires_at"


@web.middleware
async def _schema_known(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.app[STAGE].waiting and request.path not in _PROBES:
        raise http.ApiError(
            503,
            "unavailable",
            "outbox is waiting for the database schema this version knows; try again",
            {"Retry-After": "30"},
        )
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        request[auth.ACCOUNT] = await auth.authenticate(request)
    return await handler(request)


def _id(request: web.Request, kind: str) -> int:
    """The path's id; anything that is not one answers 404, like an unknown id."""
    raw = request.match_info["id"]
    if raw.isascii() and raw.isdigit() and 0 < int(raw) <= _BIGINT_MAX:
        return int(raw)
    raise errors.NotFound(f"{kind} {raw} not found")


async def _body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object; an empty body is ``{}`` when ``required`` is False."""
    if request.content_length is not None and request.content_length > BODY_LIMIT:
        raise _too_large()
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large() from None
    if not raw.strip():
        if required:
            raise ApiError(400, "bad_request", "send a JSON object in the request body")
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_request", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        # No request of this API nests more than two levels; a parser that runs out of
        # stack on what a client sent is bad JSON too, not a server error.
        raise ApiError(
            400, "bad_request", "the body is not valid JSON: nested too deeply"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return data


def _too_large() -> ApiError:
    return ApiError(413, "too_large", f"the request body is over the {BODY_LIMIT} byte limit")


def _text(key: str, value: Any) -> str:
    """A JSON string that Postgres can store as text."""
    if not isinstance(value, str):
        raise errors.Invalid(f"{key} must be a string")
    if "\x00" in value:
        raise errors.Invalid(f"{key} must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise errors.Invalid(f"{key} must be valid Unicode text") from None
    return value


def webhook_fields(body: Mapping[str, Any], *, partial: bool) -> dict[str, Any]:
    """The fields of a create (``partial=False``) or a change, type-checked.

    The rules themselves (https, events, 16 characters, a name) are left to the
    database, which enforces them for every path; this only turns JSON into values.
    """
    for key in body:
        if key == _END_OVERLAP and partial:
            continue
        if key not in _WRITABLE:
            raise errors.Invalid(
                f"unknown field {key!r}: a webhook has name, url, event, format, secret, "
                "enabled, headers and rate_limit"
            )
    if not partial:
        for key in ("name", "url", "event"):
            if body.get(key) is None:
                raise errors.Invalid(f"{key} is required")
    fields: dict[str, Any] = {}
    for key, value in body.items():
        if key == _END_OVERLAP:
            if value is not None:
                raise errors.Invalid(
                    f"{_END_OVERLAP} can only be set to null, which ends the old secret's "
                    "overlap now"
                )
            fields["end_secret_overlap"] = True
        elif key == "enabled":
            if not isinstance(value, bool):
                raise errors.Invalid("enabled must be true or false")
        elif key == "headers":
            if value is None:
                # Like a JSON merge patch: null removes them all.
                if partial:
                    fields["clear_headers"] = True
                continue
            value = _headers(value, partial=partial)
        elif key == "rate_limit":
            if value is not None and (type(value) is not int or value > _INT_MAX):
                raise errors.Invalid(
                    f"rate_limit must be a whole number of attempts per second, at most "
                    f"{_INT_MAX}, or null for no limit"
                )
        elif value is None:
            if key != "secret":
                raise errors.Invalid(f"{key} must not be null")
        else:
            value = _text(key, value)
        fields[key] = value
    return fields


def _headers(value: Any, *, partial: bool) -> dict[str, Any]:
    """A webhook's headers, names to string values: in a change, a value of null removes
    that header and the others stay as they are. The rules for names and values are
    the database's; a value is also refused when it is the mask the API shows."""
    if not isinstance(value, dict):
        raise errors.Invalid(
            f"headers must be a JSON object of header names to values, not {_json_type(value)}"
        )
    for name, header in value.items():
        _text("headers: a header name", name)
        if header is None and partial:
            continue
        if not isinstance(header, str):
            raise errors.Invalid(
                f"headers: the value of {name} must be a string, not {_json_type(header)}"
            )
        _text(f"headers: the value of {name}", header)
        if header == webhooks.MASKED:
            raise errors.Invalid(
                f"headers: the value of {name} is {webhooks.MASKED!r}, which is how values "
                "are shown, not a value: give the value itself, or leave the header out to "
                "keep its value"
            )
    return value


def _json_type(value: Any) -> str:
    """What kind of JSON value ``value`` was, in JSON's words."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else "null"


def page_params(query: Mapping[str, str]) -> tuple[int | None, int]:
    """(cursor, limit) of a delivery log request; 400 for values we cannot use."""
    raw_limit = query.get("limit", str(PAGE_SIZE))
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= PAGE_MAX):
        raise ApiError(400, "bad_request", f"limit must be a whole number from 1 to {PAGE_MAX}")
    raw_cursor = query.get("cursor")
    if raw_cursor is None:
        return None, int(raw_limit)
    if not (raw_cursor.isascii() and raw_cursor.isdigit() and int(raw_cursor) <= _BIGINT_MAX):
        raise ApiError(400, "bad_request", "cursor must be a next_cursor this API returned")
    return int(raw_cursor), int(raw_limit)


# Failure reasons an account reads through the API and the page (see for_tenant).
_REASONS = ("last_error", "last_attempt_error")


def _webhook(row: Mapping[str, Any]) -> dict[str, Any]:
    """The webhook object: its headers' values are never shown, nor a refused
    target's address (see for_tenant)."""
    masked = {"headers": webhooks.masked(row["header_names"])}
    shown: dict[str, Any] = {
        key: masked[key] if key in masked else row[key] for key in _WEBHOOK_FIELDS
    }
    for key in _REASONS:
        shown[key] = for_tenant(row[key])
    return shown


def _delivery(row: dict[str, Any]) -> dict[str, Any]:
    """A delivery of the log as its account sees it: reasons without addresses."""
    row["last_error"] = for_tenant(row["last_error"])
    for attempt in row["attempt_log"]:
        attempt["error"] = for_tenant(attempt["error"])
    return row


async def _owned(
    conn: psycopg.AsyncConnection[Any], account: str, webhook_id: int
) -> dict[str, Any]:
    """The webhook with its status fields, if ``account`` owns it (an account has at
    most ten, so its list is the cheapest way to ask). A webhook's account never
    changes, so what was checked here stays true for the rest of the request."""
    for row in await webhooks.status(conn, account):
        if row["id"] == webhook_id:
            return row
    raise errors.NotFound(f"webhook {webhook_id} not found")


def _probe(ok: bool) -> web.Response:
    # Never the reason: that is in the log, for those who may read it.
    if ok:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable"}, status=503)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while every part of the sidecar runs and its loop goes round."""
    return _probe(request.app[STAGE].parts.alive())


class Readiness:
    """The database's answer to "is the schema the one this version runs?", asked by
    one query at a time: probes that come while it runs share its answer, so a flood of
    /readyz holds at most one of the pool's connections."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._asking: asyncio.Future[bool] | None = None

    async def ready(self) -> bool:
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
            self._asking.add_done_callback(self._forget)
        return await asyncio.shield(self._asking)

    def _forget(self, done: asyncio.Future[bool]) -> None:
        if self._asking is done:
            self._asking = None

    async def _ask(self) -> bool:
        try:
            async with asyncio.timeout(2), self._pool.connection() as conn:
                found = await db.schema_version(conn)
        except (psycopg.Error, TimeoutError):
            return False
        return found == db.expected_version()


READINESS = web.AppKey("readiness", Readiness)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: alive, not stopping, and the database answers with the schema this
    version runs against."""
    parts = request.app[STAGE].parts
    if not parts.alive() or parts.stopping.is_set():
        return _probe(False)
    return _probe(await request.app[READINESS].ready())


async def refresh_backlog(pool: AsyncConnectionPool[Any], parts: Supervisor) -> None:
    """Keep the backlog gauges of /metrics fresh: one count every BACKLOG_EVERY seconds,
    so that scrapes, however many, never query (when the database does not answer, the
    gauges keep their last values)."""
    while True:
        async with pool.connection() as conn:
            backlog = await db.deliveries.pending_stats(conn)
        metrics.pending(*backlog)
        parts.beat("backlog")
        await asyncio.sleep(BACKLOG_EVERY)


async def prometheus(request: web.Request) -> web.Response:
    """Prometheus text format (no token needed), from memory only."""
    body, content_type = metrics.exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


# Served without a token, by every mode, also while the sidecar waits for its schema.
_PROBES: dict[str, Handler] = {"/healthz": healthz, "/readyz": readyz, "/metrics": prometheus}


async def openapi_document(request: web.Request) -> web.Response:
    return http.json_response(openapi.DOCUMENT)


# The example a customer learns from (the settings page shows it): a real body and real
# headers of a first attempt, signed with a secret the page shows too, so that a
# receiver's verification can be tried on it.
EXAMPLE_SECRET = "whsec_" + "ZXhhbXBsZS1zZWNyZXQtb2YtMzItYnl0ZXMtISEhISE="
_EXAMPLE_TIME = "2026-11-27T12:34:56.789Z"
_EXAMPLE_NOW = 1_795_783_000


def example(event: str) -> dict[str, Any]:
    """A first attempt of ``event`` in the json format: its headers and its body."""
    data_json = json.dumps(sample(event), indent=2, ensure_ascii=False)
    body = wire.body(event, _EXAMPLE_TIME, data_json)
    headers = wire.headers(
        message_id="48213",
        event=event,
        attempt=1,
        payload=body,
        secret=EXAMPLE_SECRET,
        now=_EXAMPLE_NOW,
    )
    return {"headers": headers, "body": body.decode(), "secret": EXAMPLE_SECRET}


@functools.cache
def _catalogue() -> list[dict[str, Any]]:
    """The event catalogue with each event's example: the same for every request (a
    fixed secret, time and id), so rendered and signed once."""
    return [
        {"name": name, "display_name": display, "example": example(name)}
        for name, display in EVENTS.items()
    ]


async def list_events(request: web.Request) -> web.Response:
    events = _catalogue()
    return http.json_response({"events": events})


async def list_webhooks(request: web.Request) -> web.Response:
    async with http.connection(request) as conn:
        rows = await webhooks.status(conn, auth.account(request))
    return http.json_response({"webhooks": [_webhook(row) for row in rows]})


async def create_webhook(request: web.Request) -> web.Response:
    account = auth.account(request)
    fields = webhook_fields(await _body(request), partial=False)
    async with http.connection(request) as conn:
        webhook_id = await webhooks.add(conn, account_id=account, **fields)
        row = await _owned(conn, account, webhook_id)
    log.info("api: webhook created", account_id=account, webhook_id=webhook_id)
    location = f"/api/v1/webhooks/{webhook_id}"
    return http.json_response(_webhook(row), status=201, headers={"Location": location})


async def get_webhook(request: web.Request) -> web.Response:
    webhook_id = _id(request, "webhook")
    async with http.connection(request) as conn:
        row = await _owned(conn, auth.account(request), webhook_id)
    return http.json_response(_webhook(row))


async def update_webhook(request: web.Request) -> web.Response:
    account, webhook_id = auth.account(request), _id(request, "webhook")
    fields = webhook_fields(await _body(request), partial=True)
    async with http.connection(request) as conn:
        row = await _owned(conn, account, webhook_id)
        if fields:
            await webhooks.update(conn, webhook_id, **fields)
            row = await _owned(conn, account, webhook_id)
    if fields:
        log.info(
            "api: webhook updated", account_id=account, webhook_id=webhook_id, fields=sorted(fields)
        )
    return http.json_response(_webhook(row))


async def delete_webhook(request: web.Request) -> web.Response:
    account, webhook_id = auth.account(request), _id(request, "webhook")
    async with http.connection(request) as conn:
        await _owned(conn, account, webhook_id)
        await webhooks.delete(conn, webhook_id)
    log.info("api: webhook deleted", account_id=account, webhook_id=webhook_id)
    return web.Response(status=204)


async def test_webhook(request: web.Request) -> web.Response:
    """Send one sample payload now, signed, on the test sends' own connections."""
    account, webhook_id = auth.account(request), _id(request, "webhook")
    body = await _body(request, required=False)
    for key in body:
        if key != "event":
            raise errors.Invalid(f"unknown field {key!r}: a test send takes only event")
    event = body.get("event")
    if event is not None:
        check_event(_text("event", event))
    async with http.connection(request) as conn:
        await _owned(conn, account, webhook_id)
        webhook = await webhooks.get(conn, webhook_id)
    throttle = request.app[THROTTLE]
    try:
        throttle.admit(account, webhook_id, time.monotonic())
    except Refused as exc:
        log.info(
            "api: test send refused", account_id=account, webhook_id=webhook_id, reason=str(exc)
        )
        raise _rate_limited(exc) from None
    try:
        attempt = await testsend.send(request.app[TEST_SENDER], webhook, event)
    finally:
        throttle.done(webhook_id)
    log.info(
        "api: test payload sent",
        account_id=account,
        webhook_id=webhook_id,
        ok=attempt.ok,
        status=attempt.status,
        error=attempt.error,
    )
    result = {
        "ok": attempt.ok,
        "status": attempt.status,
        "duration_ms": attempt.duration_ms,
        # The log line above names the refused address for operators; the tenant who
        # chose the URL is not told what its host resolves to inside the network.
        "error": BLOCKED_WITHOUT_ADDRESS if attempt.blocked else attempt.error,
    }
    return http.json_response(result)


def _rate_limited(exc: Refused) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        f"{exc}; try again in {exc.retry_after} s",
        {"Retry-After": str(exc.retry_after)},
    )


@contextlib.contextmanager
def _replay(request: web.Request, account: str) -> Iterator[None]:
    """A replay within the account's budget, counted from the moment it is admitted (so
    that requests at once cannot all pass), and given back when it replays nothing (an
    id that is not the account's, a delivery still pending)."""
    replays = request.app[REPLAYS]
    admitted_at = time.monotonic()
    try:
        replays.admit(account, admitted_at)
    except Refused as exc:
        log.info("api: replay refused", account_id=account, reason=str(exc))
        raise _rate_limited(exc) from None
    try:
        yield
    except (errors.NotFound, errors.Conflict, errors.Invalid):
        replays.refund(account, admitted_at)
        raise


@contextlib.asynccontextmanager
async def _log_slot(request: web.Request, account: str) -> AsyncIterator[None]:
    """One of the account's LOG_SLOTS: a tenant fetching its log many times at once
    holds at most that many of the pool's connections and rendering turns."""
    in_flight = request.app[LOGS]
    if in_flight.get(account, 0) >= LOG_SLOTS:
        raise _rate_limited(Refused(f"at most {LOG_SLOTS} delivery logs at once per account", 1))
    in_flight[account] = in_flight.get(account, 0) + 1
    try:
        yield
    finally:
        in_flight[account] -= 1
        if not in_flight[account]:
            del in_flight[account]


def log_filter(query: Mapping[str, str]) -> tuple[str | None, datetime | None]:
    """(status, since) of a delivery log request, each None when not given; 400 for
    values we cannot use."""
    status = query.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise ApiError(
            400,
            "bad_request",
            f"status must be one of {', '.join(DELIVERY_STATUSES)}, not {status!r}",
        )
    raw_since = query.get("since")
    if raw_since is None:
        return status, None
    try:
        return status, webhooks.parse_since(raw_since)
    except errors.Invalid as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


async def list_deliveries(request: web.Request) -> web.Response:
    account, webhook_id = auth.account(request), _id(request, "webhook")
    before, limit = page_params(request.query)
    status, since = log_filter(request.query)
    async with _log_slot(request, account):
        async with http.connection(request) as conn:
            await _owned(conn, account, webhook_id)
            # One more than asked for tells whether there is a next page.
            found = await deliverylog.deliveries(
                conn, webhook_id, before=before, limit=limit + 1, status=status, since=since
            )
        more = len(found.rows) > limit
        found = deliverylog.Log(found.rows[:limit], found.attempts)
        page = [_delivery(row) for row in await deliverylog.render(found)]
    cursor = str(page[-1]["id"]) if more else None
    return http.json_response({"deliveries": page, "next_cursor": cursor})


async def delivery_request_body(request: web.Request) -> web.Response:
    """The whole body of a delivery's requests, exactly as sent (the log shows the
    first BODY_SHOWN bytes of it)."""
    delivery_id = _id(request, "delivery")
    async with http.connection(request) as conn:
        body = await deliverylog.full_request_body(conn, delivery_id, auth.account(request))
    return web.Response(body=body, content_type="application/json", charset="utf-8")


async def retry_delivery(request: web.Request) -> web.Response:
    account, delivery_id = auth.account(request), _id(request, "delivery")
    with _replay(request, account):
        async with http.connection(request) as conn:
            await webhooks.retry(conn, delivery_id, account)
            found = await deliverylog.delivery(conn, delivery_id, account)
    log.info("api: delivery re-queued", account_id=account, delivery_id=delivery_id)
    (delivery,) = await deliverylog.render(found)
    return http.json_response(_delivery(delivery), status=202)


async def recover_webhook(request: web.Request) -> web.Response:
    account, webhook_id = auth.account(request), _id(request, "webhook")
    body = await _body(request)
    for key in body:
        if key != "since":
            raise errors.Invalid(f"unknown field {key!r}: recover takes only since")
    since = webhooks.parse_since(body.get("since"))
    with _replay(request, account):
        async with http.connection(request) as conn:
            await _owned(conn, account, webhook_id)
            count = await webhooks.recover(conn, webhook_id, since)
    log.info(
        "api: failed deliveries re-queued", account_id=account, webhook_id=webhook_id, count=count
    )
    return http.json_response({"requeued": count}, status=202)


async def create_portal_link(request: web.Request) -> web.Response:
    """A one-time link to the settings page of the token's account (an operator
    token's: Outbox-Account's), which shows ``display_name`` instead of the account id
    and waits ``ttl`` to be opened."""
    if auth.SESSION in request:
        raise ApiError(403, "forbidden", "portal links are made with an API token")
    account = auth.account(request)
    body = await _body(request, required=False)
    for key in body:
        if key not in ("ttl", "display_name"):
            raise errors.Invalid(
                f"unknown field {key!r}: a portal link takes only ttl and display_name"
            )
    ttl = _ttl(body.get("ttl", portal.LINK_SECONDS))
    display_name = body.get("display_name")
    if display_name is not None:
        display_name = portal.check_display_name(_text("display_name", display_name))
    base_url = request.app[http.PUBLIC_URL] or f"{request.scheme}://{request.host}"
    async with http.connection(request) as conn:
        link = await portal.mint(
            conn, account, base_url=base_url, seconds=ttl, display_name=display_name
        )
    log.info("api: portal link made", account_id=account, expires_at=link.expires_at)
    return http.json_response({"url": link.url, "expires_at": link.expires_at}, status=201)


def _ttl(value: Any) -> int:
    """A portal link's ttl: whole seconds, or a DURATION string ("15m"), at most 24 h."""
    if isinstance(value, str):
        return portal.parse_ttl(value)
    if type(value) is not int or not 1 <= value <= portal.LINK_SECONDS_MAX:
        raise errors.Invalid(
            "ttl must be a whole number of seconds from 1 to "
            f'{portal.LINK_SECONDS_MAX}, or a duration like "15m" or "1h", at most 24h'
        )
    return value


async def end_portal_sessions(request: web.Request) -> web.Response:
    """Sign the token's account out of the settings page in every browser."""
    if auth.SESSION in request:
        raise ApiError(403, "forbidden", "portal sessions are ended with an API token")
    account = auth.account(request)
    async with http.connection(request) as conn:
        count = await portal.end_sessions(conn, account)
    log.info("api: portal sessions ended", account_id=account, count=count)
    return web.Response(status=204)


def make_app(
    pool: AsyncConnectionPool[Any],
    settings: Settings,
    *,
    stage: Stage,
    test_sender: Sender | None = None,
) -> web.Application:
    """The admin server: the probes and /metrics, and with ``test_sender`` the API and
    the settings page too. ``test_sender`` makes the test sends: a Sender made with the
    dispatcher's settings (the same SSRF guard, timeout and TLS settings as deliveries)
    but not the dispatcher's own. ``stage`` says whether the sidecar is alive, and
    whether it waits for its schema."""
    serving = test_sender is not None
    middlewares = [http.answer_errors, _schema_known, _auth] if serving else [http.answer_errors]
    app = web.Application(middlewares=middlewares, client_max_size=BODY_LIMIT)
    app.on_response_prepare.append(http.nosniff)
    app[http.POOL] = pool
    app[READINESS] = Readiness(pool)
    app[STAGE] = stage
    add = app.router.add_route
    for path, probe in _PROBES.items():
        add("GET", path, probe)
    if test_sender is None:
        return app
    app[auth.CREDENTIALS] = auth.Credentials()
    app[auth.ROSTER] = auth.Roster(pool)
    app[TEST_SENDER] = test_sender
    app[THROTTLE] = Throttle(test_sender.timeout)
    app[REPLAYS] = PerMinute(REPLAYS_PER_MINUTE, "retries and recoveries")
    app[LOGS] = {}
    # Portal links start with OUTBOX_PUBLIC_URL, or else the address each request came to.
    app[http.PUBLIC_URL] = settings.public_url
    add("GET", "/api/v1/openapi.json", openapi_document)
    add("GET", "/api/v1/events", list_events)
    add("GET", "/api/v1/webhooks", list_webhooks)
    add("POST", "/api/v1/webhooks", create_webhook)
    add("GET", "/api/v1/webhooks/{id}", get_webhook)
    add("PATCH", "/api/v1/webhooks/{id}", update_webhook)
    add("DELETE", "/api/v1/webhooks/{id}", delete_webhook)
    add("POST", "/api/v1/webhooks/{id}/test", test_webhook)
    add("GET", "/api/v1/webhooks/{id}/deliveries", list_deliveries)
    add("POST", "/api/v1/webhooks/{id}/recover", recover_webhook)
    add("POST", "/api/v1/deliveries/{id}/retry", retry_delivery)
    add("GET", "/api/v1/deliveries/{id}/request-body", delivery_request_body)
    add("POST", "/api/v1/portal-links", create_portal_link)
    add("DELETE", "/api/v1/portal-sessions", end_portal_sessions)
    page.add_routes(app, settings)
    return app
