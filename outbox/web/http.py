"""What every route of the admin server shares: the error shape and the middleware that
answers with it, JSON answers, the pool and how a request takes a connection from it,
and the server's public address.

Handlers raise; ``answer_errors`` turns what they raise into ``{"error": {"code", "message"}}``
with the status that fits: an ApiError as it says, the domain's errors (outbox.errors)
by their kind, aiohttp's own refusals by their status, a database away as 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
import structlog
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from outbox import errors as domain
from outbox import jsontext

__all__ = [
    "DB_WAIT",
    "POOL",
    "PUBLIC_URL",
    "ApiError",
    "Handler",
    "answer_errors",
    "connection",
    "json_response",
    "nosniff",
    "secure",
]

# The API's log lines, wherever in the wing they are written.
log = structlog.get_logger("outbox.api")

POOL = web.AppKey("pool", AsyncConnectionPool)
# The admin server's address as people reach it, for portal links; "" for the
# address each request came to.
PUBLIC_URL = web.AppKey("public_url", str)
# How long a request waits for a database connection before answering 503.
DB_WAIT = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer other than success, in the API's error shape."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": str(self)}}
        return web.json_response(
            body, status=self.status, headers=self.headers, dumps=jsontext.dumps
        )


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``data`` as the API answers it (times in RFC 3339 UTC, see outbox.jsontext)."""
    return web.json_response(data, status=status, headers=headers, dumps=jsontext.dumps)


# The domain's errors (outbox.errors: raised by webhooks, events, deliverylog and
# portal), as (status, code).
_DOMAIN_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (domain.NotFound, 404, "not_found"),
    (domain.LimitReached, 409, "limit_reached"),
    (domain.Conflict, 409, "conflict"),
    (domain.Invalid, 422, "invalid"),
)
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure of a handler as an answer in the API's error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        # aiohttp's own answers: no such route, a method the route lacks, and so on.
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _HTTP_CODES.get(exc.status, "http_error")
        return ApiError(exc.status, code, exc.reason, headers).response()
    except psycopg.OperationalError as exc:
        log.warning("api: database unavailable", path=request.path, error=type(exc).__name__)
        return ApiError(503, "unavailable", "the database is not answering; try again").response()
    except Exception as exc:
        for kind, status, code in _DOMAIN_ERRORS:
            if isinstance(exc, kind):
                return ApiError(status, code, str(exc)).response()
        log.exception("api: unexpected error", method=request.method, path=request.path)
        return ApiError(500, "internal", "internal error; see the server log").response()


async def nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """For on_response_prepare: JSON (and every other answer) is what its Content-Type
    says, never sniffed as HTML."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


def connection(
    request: web.Request,
) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
    """A connection from the pool, waited for at most DB_WAIT seconds."""
    return request.app[POOL].connection(timeout=DB_WAIT)


def secure(request: web.Request) -> bool:
    """Whether browsers reach this server over https."""
    return request.secure or request.app[PUBLIC_URL].startswith("https://")
