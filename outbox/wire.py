"""What a receiver gets: the body and headers of one attempt (pure, no I/O).

The body is assembled from the event's stored JSON text rather than re-encoded, so
``data`` reaches the receiver exactly as Postgres holds it and the bytes that are signed
are the bytes that are sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from outbox import __version__, formats
from outbox.signing import signature, standard_signature

__all__ = ["USER_AGENT", "body", "headers", "payload"]

USER_AGENT = f"outbox/{__version__}"


def body(event: str, timestamp: str, data_json: str) -> bytes:
    """``{"event", "timestamp", "data"}`` with ``data_json`` inserted verbatim."""
    return (
        f'{{"event": {json.dumps(event)}, "timestamp": {json.dumps(timestamp)}, '
        f'"data": {data_json}}}'
    ).encode()


def payload(format: str, event: str, timestamp: str, data_json: str) -> bytes:
    """The body for a webhook of ``format``: ``json`` gets ``body``; ``slack`` and
    ``discord`` get a chat message about the event (outbox.formats)."""
    if format == "json":
        return body(event, timestamp, data_json)
    return formats.render(format, event, timestamp, data_json)


def headers(
    *,
    message_id: str,
    event: str,
    attempt: int,
    payload: bytes,
    secret: str | None,
    now: int,
    test: bool = False,
    previous_secret: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers for one attempt; ``now`` (unix seconds) is the attempt's send time.

    ``previous_secret``, a secret being rotated out, signs beside ``secret`` in
    ``webhook-signature`` only: ``X-Webhook-Signature`` has room for one. ``extra`` are
    the webhook's own headers (a credential, say), after outbox's: the database refuses
    any name outbox sets, and outbox's would win.
    """
    result = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Webhook-Event": event,
        "X-Webhook-Id": message_id,
        "X-Webhook-Attempt": str(attempt),
    }
    if test:
        result["X-Webhook-Test"] = "true"
    if secret is not None:
        result["X-Webhook-Signature"] = signature(secret, payload)
        result["webhook-id"] = message_id
        result["webhook-timestamp"] = str(now)
        older = () if previous_secret is None else (previous_secret,)
        result["webhook-signature"] = standard_signature(secret, message_id, now, payload, *older)
    for name, value in (extra or {}).items():
        result.setdefault(name, value)
    return result
