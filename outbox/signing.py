"""Signing of webhook bodies: pure functions, no I/O.

Two signatures travel with each delivery when the webhook has a secret: the product's
own ``X-Webhook-Signature: sha256=<hex>`` over the raw body, keyed with the secret's
UTF-8 bytes, and the Standard Webhooks ``webhook-signature: v1,<base64>`` over
``id.timestamp.body``, keyed the way every library of that spec derives a key from the
secret, so receivers can use any of them and reject replays.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

__all__ = ["generate_secret", "signature", "standard_key", "standard_signature", "verify"]

# Secrets of this form carry their key in standard base64, as Standard Webhooks has it.
STANDARD_PREFIX = "whsec_"
MIN_KEY_BYTES = 16


def generate_secret() -> str:
    """A new signing secret: ``whsec_`` + standard base64 (padded) of 32 random bytes."""
    return STANDARD_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def standard_key(secret: str) -> bytes:
    """The Standard Webhooks key of ``secret``.

    ``whsec_<standard base64>`` decoding to at least 16 bytes: those bytes, which is what
    ``new Webhook(secret)`` uses in every library of the spec. Any other secret (one a
    user typed): its UTF-8 bytes, which those libraries accept as raw bytes.
    """
    if secret.startswith(STANDARD_PREFIX):
        try:
            key = base64.b64decode(secret[len(STANDARD_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            return secret.encode()
        if len(key) >= MIN_KEY_BYTES:
            return key
    return secret.encode()


def signature(secret: str, body: bytes) -> str:
    """Return the ``X-Webhook-Signature`` value for ``body``."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return "sha256=" + digest


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes, *older: str) -> str:
    """Return the Standard Webhooks ``webhook-signature`` value.

    ``older`` secrets (one being rotated out) sign too, after the current one,
    space-separated as the spec allows: a receiver that has either key verifies.
    """
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1,"
        + base64.b64encode(hmac.new(standard_key(s), signed, hashlib.sha256).digest()).decode()
        for s in (secret, *older)
    )


def verify(secret: str, body: bytes, header: str) -> bool:
    """Check an ``X-Webhook-Signature`` header in constant time (what receivers do)."""
    return hmac.compare_digest(signature(secret, body), header)
