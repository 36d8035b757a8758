"""Tests for outbox.signing: the two signatures a receiver checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
import standardwebhooks

from outbox.signing import (
    generate_secret,
    signature,
    standard_key,
    standard_signature,
    verify,
)

SECRET = "whsec_test_secret_0123"
BODY = b'{"a":1}'
# Non-ASCII secret: Latin-1 letter, Cyrillic, an astral-plane emoji.
UNICODE_SECRET = "s\u00e9cret-\u043a\u043b\u044e\u0447-\U0001f511-0123456789"


def _hex(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _b64(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


class TestSignature:
    """`signature`: "sha256=" + lowercase hex HMAC-SHA256 over the raw body bytes."""

    def test_literal_known_answer(self) -> None:
        """The signature of a fixed body under a fixed secret equals an openssl-computed value."""
        # printf '%s' '{"a":1}' | openssl dgst -sha256 -hmac 'whsec_test_secret_0123'
        expected = "sha256=5c514be2364d4aa789e50b93e5756b97b32e626f577d8e37bb35355b91c3ae7d"
        assert signature(SECRET, BODY) == expected

    def test_literal_known_answer_non_ascii_secret(self) -> None:
        """A non-ASCII secret is keyed by its UTF-8 bytes (openssl-computed literal)."""
        # printf '%s' 'payload' | openssl dgst -sha256 -hmac 'sécret-ключ-🔑-0123456789'
        # (run in a UTF-8 shell, so openssl gets the secret's UTF-8 bytes as the key)
        expected = "sha256=bea6715433042a1f76c6aa103ea8d40f5feaa25eed5b9080013ab7c7b135f539"
        assert signature(UNICODE_SECRET, b"payload") == expected

    @pytest.mark.parametrize(
        ("secret", "body"),
        [
            (SECRET, BODY),
            (SECRET, b""),
            ("0123456789abcdef", b'{"event": "lead.scored", "data": {"x": "\xc3\xa9"}}'),
            (UNICODE_SECRET, b"\x00\xff binary \r\n bytes"),
        ],
    )
    def test_matches_independent_hmac(self, secret: str, body: bytes) -> None:
        """The value is "sha256=" + hmac.new(secret UTF-8, body, sha256).hexdigest()."""
        assert signature(secret, body) == "sha256=" + _hex(secret.encode("utf-8"), body)

    def test_key_is_utf8_not_latin1(self) -> None:
        """The key for a non-ASCII secret is its UTF-8 encoding, not Latin-1 or another codec."""
        secret = "caf\u00e9-secret-0123456"
        assert signature(secret, BODY) != "sha256=" + _hex(secret.encode("latin-1"), BODY)
        assert signature(secret, BODY) == "sha256=" + _hex(secret.encode("utf-8"), BODY)

    def test_format_is_prefix_and_lowercase_hex(self) -> None:
        """The value is "sha256=" followed by exactly 64 lowercase hex digits."""
        value = signature(SECRET, b"anything")
        prefix, _, digest = value.partition("=")
        assert prefix == "sha256"
        assert len(digest) == 64
        assert digest == digest.lower()
        int(digest, 16)

    def test_signs_raw_bytes_not_reencoded_json(self) -> None:
        """Semantically equal JSON with different bytes gets a different signature."""
        assert signature(SECRET, b'{"a":1}') != signature(SECRET, b'{"a": 1}')

    def test_depends_on_secret(self) -> None:
        """A different secret gives a different signature for the same body."""
        assert signature(SECRET, BODY) != signature(SECRET + "x", BODY)


class TestStandardSignature:
    """`standard_signature`: Standard Webhooks "v1,<base64>" over "id.timestamp.body"."""

    def test_literal_known_answer(self) -> None:
        """A fixed id, timestamp, body and secret give an openssl-computed value."""
        # printf '%s' 'msg_1.1700000000.{"a":1}' \
        #   | openssl dgst -sha256 -hmac 'whsec_test_secret_0123' -binary | base64
        expected = "v1,xaDzXekBB2j/QozHJX77hvaR6NLG3ZcWGTvyl2l8iaw="
        assert standard_signature(SECRET, "msg_1", 1700000000, BODY) == expected

    @pytest.mark.parametrize("secret", [SECRET, UNICODE_SECRET])
    def test_matches_independent_hmac(self, secret: str) -> None:
        """The value is "v1," + base64(HMAC-SHA256(secret UTF-8, f"{id}.{ts}." + body))."""
        body = b'{"event": "lead.scored"}'
        expected = "v1," + _b64(secret.encode("utf-8"), b"42.1712345678." + body)
        assert standard_signature(secret, "42", 1712345678, body) == expected

    @pytest.mark.parametrize("secret", [SECRET, UNICODE_SECRET])
    def test_verifies_with_standardwebhooks(self, secret: str) -> None:
        """standardwebhooks, keyed by the secret's bytes, accepts it with a current timestamp."""
        body = b'{"event": "lead.scored", "timestamp": "2026-01-01T00:00:00Z", "data": {}}'
        now = int(time.time())
        headers = {
            "webhook-id": "1234",
            "webhook-timestamp": str(now),
            "webhook-signature": standard_signature(secret, "1234", now, body),
        }
        standardwebhooks.Webhook(secret.encode()).verify(body, headers)

    def test_standardwebhooks_rejects_tampered_body(self) -> None:
        """The standardwebhooks library rejects the signature once one body byte changes."""
        body = b'{"event": "lead.scored", "data": {"score": 10}}'
        now = int(time.time())
        headers = {
            "webhook-id": "1234",
            "webhook-timestamp": str(now),
            "webhook-signature": standard_signature(SECRET, "1234", now, body),
        }
        tampered = body.replace(b"10", b"99")
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(SECRET.encode()).verify(tampered, headers)

    def test_standardwebhooks_rejects_other_id(self) -> None:
        """The id is part of the signed message: another webhook-id fails verification."""
        now = int(time.time())
        headers = {
            "webhook-id": "other",
            "webhook-timestamp": str(now),
            "webhook-signature": standard_signature(SECRET, "1234", now, BODY),
        }
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(SECRET.encode()).verify(BODY, headers)

    def test_timestamp_is_signed(self) -> None:
        """Changing only the timestamp changes the signature (it is part of the message)."""
        assert standard_signature(SECRET, "1", 1700000000, BODY) != standard_signature(
            SECRET, "1", 1700000001, BODY
        )


class TestVerify:
    """`verify`: what a receiver does with X-Webhook-Signature."""

    def test_accepts_right_header(self) -> None:
        """The header computed independently for the body is accepted."""
        header = "sha256=" + _hex(SECRET.encode(), BODY)
        assert verify(SECRET, BODY, header) is True

    def test_accepts_literal_header(self) -> None:
        """The openssl-computed literal header for '{"a":1}' is accepted."""
        header = "sha256=5c514be2364d4aa789e50b93e5756b97b32e626f577d8e37bb35355b91c3ae7d"
        assert verify(SECRET, BODY, header) is True

    @pytest.mark.parametrize(
        "header",
        [
            "sha256=" + "0" * 64,
            "sha256=" + _hex(b"another-secret-0123", BODY),
            _hex(SECRET.encode(), BODY),  # missing the "sha256=" prefix
            "sha1=" + _hex(SECRET.encode(), BODY),
            "",
        ],
    )
    def test_rejects_wrong_header(self, header: str) -> None:
        """A header with the wrong digest, key or prefix is rejected."""
        assert verify(SECRET, BODY, header) is False

    def test_rejects_tampered_body(self) -> None:
        """A correct header for one body is rejected for a different body."""
        header = signature(SECRET, BODY)
        assert verify(SECRET, b'{"a":2}', header) is False


class TestStandardKey:
    """Secrets the product generates verify with `new Webhook(secret)` in every library."""

    def test_generated_secrets_are_whsec_standard_base64_of_32_bytes(self) -> None:
        """``whsec_`` + padded standard base64 decoding to 32 random bytes, new each time."""
        made = {generate_secret() for _ in range(50)}
        assert len(made) == 50
        for secret in made:
            assert secret.startswith("whsec_")
            assert len(base64.b64decode(secret[6:], validate=True)) == 32
            assert len(secret) == 6 + 44 and secret.endswith("=")

    def test_whsec_key_is_the_decoded_bytes(self) -> None:
        """The key of a whsec_ secret is its decoded bytes; others are their UTF-8 bytes."""
        raw = bytes(range(32))
        assert standard_key("whsec_" + base64.b64encode(raw).decode()) == raw
        assert standard_key(SECRET) == SECRET.encode()  # "_" is not standard base64
        assert (
            standard_key("whsec_" + base64.b64encode(b"short").decode())
            == ("whsec_" + base64.b64encode(b"short").decode()).encode()
        )
        assert standard_key(UNICODE_SECRET) == UNICODE_SECRET.encode()

    def test_x_webhook_signature_stays_keyed_with_the_secret_as_typed(self) -> None:
        """The product's own signature uses the whsec_ secret's UTF-8 bytes."""
        secret = generate_secret()
        assert signature(secret, BODY) == "sha256=" + _hex(secret.encode(), BODY)

    @staticmethod
    def signed(secret: str, msg_id: str) -> dict[str, str]:
        now = int(time.time())
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(now),
            "webhook-signature": standard_signature(secret, msg_id, now, BODY),
        }

    def test_python_library_verifies_with_the_secret_itself(self) -> None:
        """standardwebhooks.Webhook(secret), given the whsec_ string, accepts the request."""
        secret = generate_secret()
        standardwebhooks.Webhook(secret).verify(BODY, self.signed(secret, "msg_7"))


class TestRotation:
    """While a secret is rotated out, both sign webhook-signature, the new one first."""

    def test_both_keys_sign_new_first(self) -> None:
        """The header is "v1,<new> v1,<old>"; each verifies alone."""
        new, old = generate_secret(), "an-old-typed-secret-0123"
        now = int(time.time())
        value = standard_signature(new, "m", now, BODY, old)
        first, second = value.split(" ")
        assert first == standard_signature(new, "m", now, BODY)
        assert second == standard_signature(old, "m", now, BODY)
        headers = {"webhook-id": "m", "webhook-timestamp": str(now), "webhook-signature": value}
        standardwebhooks.Webhook(new).verify(BODY, headers)
        standardwebhooks.Webhook(old.encode()).verify(BODY, headers)
