"""The OpenAPI 3.1 document of the admin API, served at ``GET /api/v1/openapi.json``.

Written by hand, next to nothing else: tests/e2e/test_api_openapi.py runs schemathesis
against a live server with it, so a response the document does not describe fails the
suite. Response objects forbid properties the document does not name, for the same
reason.
"""

from __future__ import annotations

from typing import Any

from outbox import __version__
from outbox.events import EVENTS
from outbox.formats import FORMATS
from outbox.web import page, portal

__all__ = ["DOCUMENT"]

_BIGINT_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _responses(*codes: int, **ok: Any) -> dict[str, Any]:
    """The success responses given, and the shared error responses by status code."""
    return {**ok, **{str(code): {"$ref": f"#/components/responses/{code}"} for code in codes}}


_TIME = {"type": "string", "format": "date-time"}
_ID = {"type": "integer", "minimum": 1, "maximum": _BIGINT_MAX}
_EVENT = {"type": "string", "enum": list(EVENTS)}
_FORMAT = {
    "type": "string",
    "enum": list(FORMATS),
    "description": "The body the receiver gets: json (event, timestamp, data), or a Slack "
    "or Discord message about the event. Created without one, a webhook on a Slack or "
    "Discord webhook URL gets that format, any other json.",
}


_HEADER_NAME = {
    "type": "string",
    "pattern": "^[-!#$%&'*+.^_`|~0-9A-Za-z]{1,64}$",
    "description": "An HTTP header name (a token of at most 64 characters).",
}
_HEADER_VALUE = {
    "type": "string",
    "maxLength": 1024,
    "pattern": "^[ -~]*$",
    "description": "At most 1024 printable ASCII characters.",
}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_WEBHOOK_INPUT: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "description": "Not blank."},
    "url": {
        "type": "string",
        "pattern": "^https://",
        "maxLength": 2048,
        "description": "An absolute https:// URL with a host.",
    },
    "event": {**_EVENT, "description": "The one event this webhook receives."},
    "format": _FORMAT,
    "secret": {
        "type": ["string", "null"],
        "minLength": 16,
        "writeOnly": True,
        "description": "Signing secret, at least 16 characters; null for unsigned "
        "deliveries. Never returned: responses say has_secret.",
    },
    "enabled": {"type": "boolean", "description": "Default true."},
    "headers": {
        "type": "object",
        "maxProperties": 10,
        "propertyNames": _HEADER_NAME,
        "additionalProperties": _HEADER_VALUE,
        "writeOnly": True,
        "description": "Headers sent with every attempt and test send, such as a "
        "credential of the endpoint's own: at most 10, not one that outbox sets itself "
        "(Host, Content-Type, Content-Length, Transfer-Encoding, Connection, User-Agent, "
        'X-Webhook-*, webhook-*). Values are never returned: responses show "***".',
    },
    "rate_limit": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": _INT_MAX,
        "description": "The most attempts per second this webhook gets, from every "
        "sidecar together; deliveries over it wait, pending. null: no limit (the default).",
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": _object(
                {
                    "code": {
                        "type": "string",
                        "description": "bad_request, unauthorized, forbidden, not_found, "
                        "method_not_allowed, conflict, limit_reached, too_large, invalid, "
                        "unavailable or internal.",
                    },
                    "message": {"type": "string", "description": "What is wrong, in words."},
                }
            )
        }
    ),
    "Event": _object(
        {
            "name": _EVENT,
            "display_name": {"type": "string", "enum": list(EVENTS.values())},
            "example": {
                **_object(
                    {
                        "headers": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "body": {"type": "string"},
                        "secret": {"type": "string"},
                    }
                ),
                "description": "A first attempt of this event in the json format, as a "
                "receiver gets it: its headers and its body, signed with the example "
                "secret given, so that a receiver's verification can be tried on it.",
            },
        }
    ),
    "Webhook": _object(
        {
            "id": _ID,
            "name": {"type": "string"},
            "url": {"type": "string"},
            "event": _EVENT,
            "format": _FORMAT,
            "enabled": {"type": "boolean"},
            "has_secret": {"type": "boolean"},
            "previous_secret_expires_at": {
                **_nullable(_TIME),
                "description": "Until when the secret replaced last keeps signing beside "
                "the current one in webhook-signature; null when there is none.",
            },
            "created_at": _TIME,
            "updated_at": _TIME,
            "last_delivery_status": {
                "type": ["string", "null"],
                "enum": ["succeeded", "failed", None],
                "description": "Of the last finished delivery; null when none has finished.",
            },
            "last_delivery_at": _nullable(_TIME),
            "last_error": {
                "type": ["string", "null"],
                "description": "Why the last finished delivery failed; null after a success.",
            },
            "pending": {"type": "integer", "minimum": 0},
            "retrying": {
                "type": "integer",
                "minimum": 0,
                "description": "Pending deliveries that have had at least one failed attempt.",
            },
            "last_attempt_at": {
                **_nullable(_TIME),
                "description": "When the newest attempt of any delivery started.",
            },
            "last_attempt_status": {
                "type": ["string", "null"],
                "enum": ["succeeded", "failed", None],
                "description": "Of the newest attempt; null before the first one. Shows a "
                "failing endpoint while its retries still run.",
            },
            "last_attempt_error": {
                "type": ["string", "null"],
                "description": "Why the newest attempt failed; null when it succeeded.",
            },
            "next_retry_at": {
                **_nullable(_TIME),
                "description": "The soonest next attempt of a retrying delivery.",
            },
            "next_retry_attempt": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "Which attempt (1 + retries) that one will be, counted in "
                "its series; there are 1 + len(OUTBOX_RETRY_DELAYS) in a series.",
            },
            "disabled_reason": {
                "type": ["string", "null"],
                "description": "Why the product disabled this webhook itself (it kept "
                "failing); null otherwise. Enabling the webhook clears it.",
            },
            "headers": {
                "type": "object",
                "propertyNames": _HEADER_NAME,
                "additionalProperties": {"const": "***"},
                "description": "The names of the headers sent with every attempt; their "
                "values, which may be credentials, are never shown.",
            },
            "rate_limit": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "The most attempts per second; null: no limit.",
            },
            "failing_since": {
                **_nullable(_TIME),
                "description": "When the current failing streak began (the first failed "
                "attempt after a success); null while the newest attempt succeeded.",
            },
            "failed_in_streak": {
                "type": "integer",
                "minimum": 0,
                "description": "Deliveries that failed for good since failing_since; 0 "
                "while the webhook is not failing.",
            },
        }
    ),
    "WebhookCreate": _object(_WEBHOOK_INPUT, required=["name", "url", "event"]),
    "WebhookChange": {
        **_object(
            {
                **_WEBHOOK_INPUT,
                "previous_secret_expires_at": {
                    "type": "null",
                    "description": "null ends the old secret's overlap at once.",
                },
                "headers": {
                    **_WEBHOOK_INPUT["headers"],
                    "type": ["object", "null"],
                    "additionalProperties": {**_HEADER_VALUE, "type": ["string", "null"]},
                    "description": "Sets the headers it names (whatever their case) and "
                    "keeps the others; a value of null removes that header, and headers "
                    'null removes them all. A value is never "***", which is how values '
                    "are shown.",
                },
            },
            required=[],
        ),
        "description": "Only the fields given change; secret null removes the secret, "
        "rate_limit null the limit. A changed secret keeps the old one signing beside it "
        "for 24 hours.",
    },
    "Attempt": _object(
        {
            "attempt": {"type": "integer", "minimum": 1},
            "started_at": _TIME,
            "duration_ms": {"type": "integer", "minimum": 0},
            "response_status": {"type": ["integer", "null"]},
            "error": {"type": ["string", "null"]},
            "response_body": {
                "type": ["string", "null"],
                "description": "The first 1024 bytes of the answer, as text (invalid UTF-8 "
                "replaced); null when there was no answer.",
            },
            "request": _object(
                {
                    "method": {"type": "string", "enum": ["POST"]},
                    "url": {"type": "string", "description": "The webhook's URL now."},
                    "headers": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "description": "The headers outbox set (not those the HTTP client "
                        "adds: Host, Content-Length, Accept). Signatures are shown while "
                        "the webhook is unchanged since the attempt; secrets never. The "
                        "webhook's own headers show as Name: ***.",
                    },
                }
            ),
        }
    ),
    "Delivery": _object(
        {
            "id": {**_ID, "description": "Sent as X-Webhook-Id, also when replayed."},
            "event_id": _ID,
            "event": _EVENT,
            "occurred_at": _TIME,
            "status": {"type": "string", "enum": ["pending", "succeeded", "failed", "cancelled"]},
            "attempts": {"type": "integer", "minimum": 0},
            "next_attempt_at": _nullable(_TIME),
            "last_error": {"type": ["string", "null"]},
            "last_response_status": {"type": ["integer", "null"]},
            "created_at": _TIME,
            "finished_at": _nullable(_TIME),
            "request_body": {
                "type": "string",
                "description": "The body every attempt sent, rebuilt from the event: its "
                "first 8 KiB (see request_body_truncated).",
            },
            "request_body_size": {
                "type": "integer",
                "minimum": 0,
                "description": "The whole body's size in bytes.",
            },
            "request_body_truncated": {
                "type": "boolean",
                "description": "True when request_body is only the start of the body; "
                "GET /api/v1/deliveries/{id}/request-body answers all of it.",
            },
            "attempt_log": {"type": "array", "items": _ref("Attempt")},
        }
    ),
    "DeliveryPage": _object(
        {
            "deliveries": {"type": "array", "items": _ref("Delivery")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as cursor for the next page; null on the last page.",
            },
        }
    ),
    "TestRequest": _object(
        {"event": {**_EVENT, "type": ["string", "null"], "enum": [*EVENTS, None]}}, required=[]
    ),
    "TestResult": _object(
        {
            "ok": {"type": "boolean", "description": "True when the target answered 2xx."},
            "status": {"type": ["integer", "null"], "description": "null when no response."},
            "duration_ms": {"type": "integer", "minimum": 0},
            "error": {
                "type": ["string", "null"],
                "description": (
                    "Why it failed, as in the delivery log, except that a target the SSRF"
                    " guard refuses reads blocked: not a public address, without the"
                    " address."
                ),
            },
        }
    ),
    "RecoverRequest": _object(
        {
            "since": {
                **_TIME,
                "description": "Re-queue the deliveries that failed, or that an automatic "
                "disable cancelled, at or after this time.",
            }
        }
    ),
    "RecoverResult": _object({"requeued": {"type": "integer", "minimum": 0}}),
    "PortalLinkRequest": _object(
        {
            "ttl": {
                "oneOf": [
                    {"type": "integer", "minimum": 1, "maximum": portal.LINK_SECONDS_MAX},
                    {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[smhdSMHD]?\s*$"},
                ],
                "default": portal.LINK_SECONDS,
                "description": "How long the link may wait to be opened: seconds, or a "
                'DURATION such as "15m", "1h" or "90s"; from 1 second to 24 hours.',
            },
            "display_name": {
                "type": "string",
                "minLength": 1,
                "maxLength": portal.DISPLAY_NAME_MAX,
                "description": "Shown on the settings page instead of the account id: the "
                "customer's name in your product. One line.",
            },
        },
        required=[],
    ),
    "PortalLink": _object(
        {
            "url": {
                "type": "string",
                "description": "Opens the settings page once, signed in to the account.",
            },
            "expires_at": _TIME,
        }
    ),
}

_COMMON_RESPONSES = {
    "400": _error(
        "The body is not a JSON object, a query parameter is malformed, or an operator "
        "token's call lacks Outbox-Account (code missing_account)."
    ),
    "401": {
        **_error("No token, or one that is unknown or revoked."),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "403": _error(
        "A change made with a settings-page session but without its X-CSRF-Token, or an "
        "Outbox-Account header naming another account than an account token's own."
    ),
    "404": _error("No such id for this account (also for ids that are not numbers)."),
    "409": _error("The limit of 10 webhooks, or a replay the delivery's state forbids."),
    "413": _error("The request body is over 64 KiB."),
    "422": _error("A rule is broken; the message names it."),
    "429": {
        **_error(
            "A test send to this webhook is still in flight, or the account has made 10"
            " in the last minute."
        ),
        "headers": {
            "Retry-After": {
                "description": "Seconds until a test send would be let through.",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    },
}

_WEBHOOK_ID = {"name": "id", "in": "path", "required": True, "schema": _ID}
_PAGE_HEADERS = {"Content-Security-Policy": {"schema": {"type": "string"}}}


def _html(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"text/html": {"schema": {"type": "string"}}},
        "headers": _PAGE_HEADERS,
    }


# What fetching or posting a link answers when it cannot be used.
_LINK_ERRORS: dict[str, Any] = {
    "400": {
        "description": "The link is not one this server signed (or, for a request line "
        "over 8 KiB, the HTTP server's own plain-text answer).",
        "content": {
            "text/html": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    },
    "404": _error("No token in the path."),
    "410": _html("The link has expired or was used already."),
    "503": _html("The database does not answer."),
}

_DELIVERY_ID = {"name": "id", "in": "path", "required": True, "schema": _ID}


def _body(name: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(name)}}}


_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: whether the sidecar's dispatcher is alive and working",
            "security": [],
            "responses": {
                "200": _json(_object({"status": {"const": "ok"}}), "Alive."),
                "503": _json(
                    _object({"status": {"const": "unavailable"}}),
                    "A part of the sidecar is stuck or keeps failing; restart it.",
                ),
            },
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: alive, and the database answers with the expected schema",
            "security": [],
            "responses": {
                "200": _json(_object({"status": {"const": "ok"}}), "Ready."),
                "503": _json(
                    _object({"status": {"const": "unavailable"}}),
                    "Not alive, stopping, the database does not answer, or its schema is"
                    " not the one this version runs against.",
                ),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text format (OpenMetrics when asked for).",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                }
            },
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": _responses(
                401, **{"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")}
            ),
        }
    },
    "/api/v1/events": {
        "get": {
            "operationId": "listEvents",
            "summary": "The event catalogue",
            "responses": _responses(
                401,
                **{
                    "200": _json(
                        _object({"events": {"type": "array", "items": _ref("Event")}}),
                        "Every event, with its wire and display name.",
                    )
                },
            ),
        }
    },
    "/api/v1/webhooks": {
        "get": {
            "operationId": "listWebhooks",
            "summary": "The account's webhooks with their status",
            "responses": _responses(
                401,
                **{
                    "200": _json(
                        _object({"webhooks": {"type": "array", "items": _ref("Webhook")}}),
                        "At most 10.",
                    )
                },
            ),
        },
        "post": {
            "operationId": "createWebhook",
            "summary": "Create a webhook",
            "requestBody": _body("WebhookCreate"),
            "responses": _responses(
                400,
                401,
                409,
                413,
                422,
                **{
                    "201": _json(
                        _ref("Webhook"),
                        "Created.",
                        headers={"Location": {"schema": {"type": "string"}}},
                    )
                },
            ),
        },
    },
    "/api/v1/webhooks/{id}": {
        "parameters": [_WEBHOOK_ID],
        "get": {
            "operationId": "getWebhook",
            "summary": "One webhook with its status",
            "responses": _responses(401, 404, **{"200": _json(_ref("Webhook"), "The webhook.")}),
        },
        "patch": {
            "operationId": "updateWebhook",
            "summary": "Change a webhook",
            "requestBody": _body("WebhookChange"),
            "responses": _responses(
                400, 401, 404, 413, 422, **{"200": _json(_ref("Webhook"), "As changed.")}
            ),
        },
        "delete": {
            "operationId": "deleteWebhook",
            "summary": "Delete a webhook; nothing more is sent to it",
            "responses": _responses(401, 404, **{"204": {"description": "Deleted."}}),
        },
    },
    "/api/v1/webhooks/{id}/test": {
        "parameters": [_WEBHOOK_ID],
        "post": {
            "operationId": "testWebhook",
            "summary": "Send one sample payload now, signed, without retries",
            "description": (
                "200 whatever the target answered; ok says whether it was 2xx. One test send"
                " at a time per webhook, and 10 a minute per account; past that, 429."
            ),
            "requestBody": _body("TestRequest", required=False),
            "responses": _responses(
                400,
                401,
                404,
                413,
                422,
                429,
                **{"200": _json(_ref("TestResult"), "What came of it.")},
            ),
        },
    },
    "/api/v1/webhooks/{id}/deliveries": {
        "parameters": [_WEBHOOK_ID],
        "get": {
            "operationId": "listDeliveries",
            "summary": "The webhook's delivery log, newest first, with every attempt",
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                },
                {
                    "name": "cursor",
                    "in": "query",
                    "description": "next_cursor of the previous page.",
                    "schema": {"type": "string"},
                },
                {
                    "name": "status",
                    "in": "query",
                    "description": "Only deliveries with this status.",
                    "schema": {
                        "type": "string",
                        "enum": ["pending", "succeeded", "failed", "cancelled"],
                    },
                },
                {
                    "name": "since",
                    "in": "query",
                    "description": "Only deliveries created at or after this time (ISO 8601 "
                    "with a UTC offset, e.g. 2026-11-27T10:00:00Z).",
                    "schema": {"type": "string", "format": "date-time"},
                },
            ],
            "responses": _responses(
                400, 401, 404, **{"200": _json(_ref("DeliveryPage"), "One page.")}
            ),
        },
    },
    "/api/v1/webhooks/{id}/recover": {
        "parameters": [_WEBHOOK_ID],
        "post": {
            "operationId": "recoverWebhook",
            "summary": "Re-queue the webhook's failed deliveries since a time",
            "description": "Each is sent again with its X-Webhook-Id and a fresh series of "
            "retries. 409 when the webhook is disabled. At most 60 retries and recoveries "
            "a minute per account; past that, 429.",
            "requestBody": _body("RecoverRequest"),
            "responses": _responses(
                400,
                401,
                404,
                409,
                413,
                422,
                429,
                **{"202": _json(_ref("RecoverResult"), "How many were re-queued.")},
            ),
        },
    },
    "/api/v1/portal-links": {
        "post": {
            "operationId": "createPortalLink",
            "summary": "A one-time link to the account's settings page",
            "security": [{"bearer": []}],
            "description": "Made with an API token only (403 with a session cookie). "
            "Hand the url to the account's user: opening it shows a Continue button, "
            "which signs that browser in to Settings > Webhooks for this account; a "
            "second sign-in, or one after expires_at, shows an error page.",
            "requestBody": _body("PortalLinkRequest", required=False),
            "responses": _responses(
                400,
                401,
                413,
                422,
                **{
                    "201": _json(_ref("PortalLink"), "The link."),
                    "403": _error("Called with a session cookie instead of a token."),
                },
            ),
        },
    },
    "/api/v1/portal-sessions": {
        "delete": {
            "operationId": "endPortalSessions",
            "summary": "Sign the account out of the settings page in every browser",
            "security": [{"bearer": []}],
            "description": "Made with an API token only (403 with a session cookie). "
            "Ends every settings-page session of the token's account; their next request "
            "answers 401. Revoking a token does not do this.",
            "responses": _responses(
                401,
                **{
                    "204": {"description": "Every session of the account has ended."},
                    "403": _error("Called with a session cookie instead of a token."),
                },
            ),
        },
    },
    "/portal/{token}": {
        "parameters": [
            {
                "name": "token",
                "in": "path",
                "required": True,
                "schema": {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$",
                    "maxLength": portal.TOKEN_MAX,
                },
            }
        ],
        "get": {
            "operationId": "showPortalLink",
            "summary": "A portal link's page, with its Continue button (for browsers)",
            "description": "Uses nothing up, so link previews and mail scanners that "
            "fetch the link do not spend it. An expired or forged link gets an error page.",
            "security": [],
            "responses": {
                "200": _html("The Continue button, which POSTs the same link."),
                **_LINK_ERRORS,
            },
        },
        "post": {
            "operationId": "openPortalLink",
            "summary": "Sign in with a portal link (the Continue button)",
            "description": "Uses the link up, sets the session cookie and redirects to "
            "/settings/webhooks. Inside an iframe (Sec-Fetch-Dest: iframe) of an origin "
            "OUTBOX_PORTAL_FRAME_ANCESTORS allows, answers the settings page itself, "
            "which carries its session (X-Outbox-Session) rather than a cookie. Refused "
            "(403) when the browser says the request came from another site "
            "(Sec-Fetch-Site, or Origin).",
            "security": [],
            "responses": {
                "200": _html("Signed in inside an iframe: the settings page."),
                "303": {
                    "description": "Signed in: on to the settings page.",
                    "headers": {
                        **_PAGE_HEADERS,
                        "Location": {"schema": {"type": "string"}},
                        "Set-Cookie": {"schema": {"type": "string"}},
                    },
                },
                "403": _html("Posted from another site."),
                **_LINK_ERRORS,
            },
        },
    },
    "/settings/webhooks": {
        "get": {
            "operationId": "settingsPage",
            "summary": "Settings > Webhooks (a page, for browsers)",
            "security": [{"portalSession": []}],
            "responses": {
                "200": _html("The settings page of the session's account."),
                "401": _html("No session, or one that has ended."),
                "503": _html("The database does not answer."),
            },
        }
    },
    "/settings/signout": {
        "post": {
            "operationId": "signOut",
            "summary": "The settings page's Sign out button (for browsers)",
            "description": "A form with the session's csrf_token. Ends this browser's "
            "session, clears its cookie and says so; without a session it only says so.",
            "security": [{"portalSession": []}],
            "requestBody": {
                "required": False,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "csrf_token": {"type": "string"},
                                "session": {
                                    "type": "string",
                                    "description": "The session, from a page inside an "
                                    "iframe (which has no cookie).",
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _html("Signed out."),
                "403": _html("The form did not carry the session's CSRF token."),
                "503": _html("The database does not answer."),
            },
        }
    },
    "/static/theme.css": {
        "get": {
            "operationId": "themeStylesheet",
            "summary": "The settings page's branding (OUTBOX_PORTAL_ACCENT_COLOR)",
            "security": [],
            "responses": {
                "200": {
                    "description": "The stylesheet.",
                    "content": {"text/css": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/static/{name}": {
        "get": {
            "operationId": "staticFile",
            "summary": "The settings page's stylesheet and script",
            "security": [],
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": list(page.STATIC_FILES)},
                }
            ],
            "responses": {
                "200": {
                    "description": "The file.",
                    "content": {
                        "text/css": {"schema": {"type": "string"}},
                        "text/javascript": {"schema": {"type": "string"}},
                    },
                },
                "304": {"description": "Not modified since the copy the browser has."},
                "404": _error("No such file."),
            },
        }
    },
    "/api/v1/deliveries/{id}/retry": {
        "parameters": [_DELIVERY_ID],
        "post": {
            "operationId": "retryDelivery",
            "summary": "Re-queue one finished delivery",
            "description": "Succeeded, failed or cancelled deliveries are sent again with "
            "their X-Webhook-Id and a fresh series of retries. 409 while the delivery is "
            "pending, or when its webhook is disabled. At most 60 retries and recoveries a "
            "minute per account; past that, 429.",
            "responses": _responses(
                401, 404, 409, 429, **{"202": _json(_ref("Delivery"), "Re-queued.")}
            ),
        },
    },
    "/api/v1/deliveries/{id}/request-body": {
        "parameters": [_DELIVERY_ID],
        "get": {
            "operationId": "getDeliveryRequestBody",
            "summary": "The whole body of a delivery's requests",
            "description": "Exactly the bytes every attempt sent, in the webhook's format "
            "(the delivery log shows the first 8 KiB of it).",
            "responses": _responses(
                401,
                404,
                **{
                    "200": {
                        "description": "The body as sent.",
                        "content": {"application/json": {"schema": {}}},
                    }
                },
            ),
        },
    },
}


def _refuse_changes_without_csrf(paths: dict[str, Any]) -> None:
    """Every change under /api/ may also answer 403: a session without its CSRF token."""
    for path, item in paths.items():
        for method, operation in item.items():
            if path.startswith("/api/") and method in ("post", "patch", "delete"):
                operation["responses"].setdefault("403", {"$ref": "#/components/responses/403"})


_OUTBOX_ACCOUNT = {
    "name": "Outbox-Account",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
    "description": "With an operator token (outbox tokens create --operator): the account "
    "this call acts for; a call about an account's webhooks, deliveries or portal answers "
    "400 without it. With an account token it may only name that token's own account "
    "(403 otherwise).",
}
# Calls that need no account: an operator token may make them without Outbox-Account.
_ACCOUNTLESS = {"/api/v1/events", "/api/v1/openapi.json"}


def _name_the_account(paths: dict[str, Any]) -> None:
    """Every /api/ call takes Outbox-Account, and may answer 400 and 403 for it."""
    for path, item in paths.items():
        if not path.startswith("/api/"):
            continue
        for method, operation in item.items():
            if method == "parameters":
                continue
            operation.setdefault("parameters", []).append(_OUTBOX_ACCOUNT)
            responses = operation["responses"]
            responses.setdefault("403", {"$ref": "#/components/responses/403"})
            if path not in _ACCOUNTLESS:
                responses.setdefault("400", {"$ref": "#/components/responses/400"})
            else:
                responses.setdefault("400", _error("Outbox-Account is not an account id."))


_refuse_changes_without_csrf(_PATHS)
_name_the_account(_PATHS)

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "outbox admin API",
        "version": __version__,
        "description": "Manage an account's webhooks, see their deliveries, replay them. "
        "Every /api/ call needs Authorization: Bearer <token> (outbox tokens create). "
        "An account token acts for its account; an operator token (outbox tokens create "
        "--operator) acts for the account named in each call's Outbox-Account header. "
        "The settings page makes the same calls with its session instead (its cookie, or "
        "inside an iframe the X-Outbox-Session header), and sends the session's CSRF "
        "token in X-CSRF-Token with every change (403 without it).",
    },
    "security": [{"bearer": []}, {"portalSession": []}],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "portalSession": {
                "type": "apiKey",
                "in": "cookie",
                "name": portal.SESSION_COOKIE,
                "description": "Set by signing in with a portal link; for the settings "
                f"page. Named {portal.SECURE_SESSION_COOKIE} when the page is served "
                "over https.",
            },
            "portalSessionHeader": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Outbox-Session",
                "description": "The settings page's session inside an iframe, where no "
                "cookie can be relied on: the page receives it when it signs in there.",
            },
        },
        "schemas": _SCHEMAS,
        "responses": _COMMON_RESPONSES,
    },
}
