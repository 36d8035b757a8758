"""A test send: one sample payload to a webhook now, as a delivery would make it.

It sits beside the delivery code, not with the rules of webhooks (outbox.webhooks), so
that those never learn how an HTTP attempt is made. Used by ``outbox webhooks test``
and by ``POST /api/v1/webhooks/{id}/test`` (the settings page's Send Test Payload).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from outbox import wire
from outbox.delivery import Attempt, Sender
from outbox.events import check_event, sample

__all__ = ["send"]


async def send(sender: Sender, webhook: Mapping[str, Any], event: str | None = None) -> Attempt:
    """Send one sample payload now, in the webhook's format, signed as a delivery
    would be and with its headers; no retries, no record."""
    event = check_event(event or webhook["event"])
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    payload = wire.payload(webhook["format"], event, timestamp, json.dumps(sample(event)))
    headers = wire.headers(
        message_id=f"test_{uuid.uuid4().hex}",
        event=event,
        attempt=1,
        payload=payload,
        secret=webhook["secret"],
        now=int(time.time()),
        test=True,
        previous_secret=webhook.get("previous_secret"),
        extra=webhook.get("headers"),
    )
    return await sender.post(webhook["url"], payload, headers)
