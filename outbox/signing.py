"""Signing of webhook bodies: pure functions, no I/O.

Two signatures travel with each delivery when the webhook has a secret: the product's
own ``X-Webhook-Signature: sha256=<hex>`` over the raw body, and the Standard Webhooks
``webhook-signature: v1,<base64>`` over ``id.timestamp.body`` so receivers can use any
library of that spec and reject replays.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["signature", "standard_signature", "verify"]


def signature(secret: str, body: bytes) -> str:
    """Return the ``X-Webhook-Signature`` value for ``body``."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return "sha256=" + digest


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the Standard Webhooks ``webhook-signature`` value (key: the secret's bytes)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, body: bytes, header: str) -> bool:
    """Check an ``X-Webhook-Signature`` header in constant time (what receivers do)."""
    return hmac.compare_digest(signature(secret, body), header)
