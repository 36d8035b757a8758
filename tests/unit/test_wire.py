"""Tests for outbox.wire: the body and headers a receiver gets."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest
import standardwebhooks

from outbox import __version__, wire

SECRET = "whsec_test_secret_0123"
TIMESTAMP = "2026-11-27T12:34:56.789Z"
# Odd spacing, key order, escapes, big number and non-ASCII: must survive byte for byte.
DATA_JSON = (
    '{"z": 1,  "a": [1.50, 2e3, null],"lead":{"id":42,"name":"Zo\u00eb \\u00e9 \\"q\\""},'
    '"big": 12345678901234567890}'
)
SIGNATURE_HEADERS = ("X-Webhook-Signature", "webhook-id", "webhook-timestamp", "webhook-signature")


def _headers(**overrides: Any) -> dict[str, str]:
    kwargs: dict[str, Any] = {
        "message_id": "123",
        "event": "lead.scored",
        "attempt": 2,
        "payload": wire.body("lead.scored", TIMESTAMP, DATA_JSON),
        "secret": SECRET,
        "now": int(time.time()),
    }
    kwargs.update(overrides)
    return wire.headers(**kwargs)


class TestBody:
    """`body`: JSON with exactly event, timestamp and the producer's data verbatim."""

    def test_is_json_with_exactly_three_keys(self) -> None:
        """The body parses as a JSON object whose keys are exactly event, timestamp, data."""
        parsed = json.loads(wire.body("lead.scored", TIMESTAMP, DATA_JSON))
        assert isinstance(parsed, dict)
        assert sorted(parsed) == ["data", "event", "timestamp"]

    def test_values(self) -> None:
        """event and timestamp are the given strings and data equals the parsed data_json."""
        parsed = json.loads(wire.body("lead.scored", TIMESTAMP, DATA_JSON))
        assert parsed["event"] == "lead.scored"
        assert parsed["timestamp"] == TIMESTAMP
        assert parsed["data"] == json.loads(DATA_JSON)

    def test_data_bytes_appear_verbatim(self) -> None:
        """The UTF-8 bytes of data_json appear unchanged inside the body (not re-encoded)."""
        payload = wire.body("lead.scored", TIMESTAMP, DATA_JSON)
        assert DATA_JSON.encode("utf-8") in payload
        assert payload.endswith(DATA_JSON.encode("utf-8") + b"}")

    def test_big_integer_not_rounded(self) -> None:
        """A number beyond float precision keeps every digit (no decode/encode round trip)."""
        payload = wire.body("lead.created", TIMESTAMP, '{"n": 12345678901234567890}')
        assert b"12345678901234567890" in payload
        assert json.loads(payload)["data"]["n"] == 12345678901234567890

    def test_is_bytes(self) -> None:
        """The body is bytes (what is signed is what is sent)."""
        assert isinstance(wire.body("lead.scored", TIMESTAMP, "{}"), bytes)

    def test_event_with_quotes_is_escaped(self) -> None:
        """An event or timestamp needing JSON escapes still gives valid JSON with those values."""
        parsed = json.loads(wire.body('we"ird\\ev', 'ti"me', "{}"))
        assert parsed == {"event": 'we"ird\\ev', "timestamp": 'ti"me', "data": {}}

    def test_literal_body(self) -> None:
        """The body for a small event is exactly the documented layout."""
        payload = wire.body("lead.scored", "2026-01-01T00:00:00Z", '{"a":1}')
        assert payload == (
            b'{"event": "lead.scored", "timestamp": "2026-01-01T00:00:00Z", "data": {"a":1}}'
        )


class TestHeaders:
    """`headers`: the fixed headers, the two signatures, and the test marker."""

    def test_fixed_headers(self) -> None:
        """Content-Type, User-Agent, event, id and attempt (as a string) are set as documented."""
        h = _headers(message_id="987", event="reply.received", attempt=3)
        assert h["Content-Type"] == "application/json"
        assert h["User-Agent"] == f"outbox/{__version__}"
        assert h["X-Webhook-Event"] == "reply.received"
        assert h["X-Webhook-Id"] == "987"
        assert h["X-Webhook-Attempt"] == "3"
        assert isinstance(h["X-Webhook-Attempt"], str)

    def test_user_agent_literal(self) -> None:
        """USER_AGENT is "outbox/" followed by the package version."""
        expected = "outbox/" + __version__
        assert expected == wire.USER_AGENT
        assert __version__ and wire.USER_AGENT != "outbox/"

    def test_all_values_are_strings(self) -> None:
        """Every header name and value is a str (HTTP clients reject ints)."""
        h = _headers()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.items())

    def test_x_webhook_signature_over_exact_body(self) -> None:
        """X-Webhook-Signature is HMAC-SHA256 hex over exactly the payload bytes passed in."""
        payload = wire.body("lead.scored", TIMESTAMP, DATA_JSON)
        h = _headers(payload=payload)
        expected = hmac.new(SECRET.encode(), payload, hashlib.sha256).hexdigest()
        assert h["X-Webhook-Signature"] == "sha256=" + expected

    def test_standard_headers(self) -> None:
        """webhook-id equals X-Webhook-Id and webhook-timestamp is `now` as a string."""
        h = _headers(message_id="555", now=1712345678)
        assert h["webhook-id"] == h["X-Webhook-Id"] == "555"
        assert h["webhook-timestamp"] == "1712345678"

    def test_standard_signature_verifies(self) -> None:
        """The standardwebhooks library verifies the sent headers against the sent body."""
        payload = wire.body("lead.scored", TIMESTAMP, DATA_JSON)
        h = _headers(payload=payload, now=int(time.time()))
        parsed = standardwebhooks.Webhook(SECRET.encode()).verify(payload, h)
        assert parsed["data"] == json.loads(DATA_JSON)

    def test_standard_signature_rejects_other_body(self) -> None:
        """The standardwebhooks library rejects the headers for a different body."""
        payload = wire.body("lead.scored", TIMESTAMP, '{"a":1}')
        h = _headers(payload=payload, now=int(time.time()))
        other = wire.body("lead.scored", TIMESTAMP, '{"a":2}')
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(SECRET.encode()).verify(other, h)

    def test_standard_signature_rejects_stale_timestamp(self) -> None:
        """Headers signed an hour ago are rejected as a replay by standardwebhooks."""
        payload = wire.body("lead.scored", TIMESTAMP, "{}")
        h = _headers(payload=payload, now=int(time.time()) - 3600)
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(SECRET.encode()).verify(payload, h)

    def test_no_secret_no_signature_headers(self) -> None:
        """Without a secret none of the four signature headers is present."""
        h = _headers(secret=None)
        for name in SIGNATURE_HEADERS:
            assert name not in h
        assert {k.lower() for k in h}.isdisjoint(n.lower() for n in SIGNATURE_HEADERS)

    def test_no_secret_keeps_fixed_headers(self) -> None:
        """Without a secret the fixed headers are still all there."""
        h = _headers(secret=None, message_id="1", attempt=1)
        assert h == {
            "Content-Type": "application/json",
            "User-Agent": f"outbox/{__version__}",
            "X-Webhook-Event": "lead.scored",
            "X-Webhook-Id": "1",
            "X-Webhook-Attempt": "1",
        }

    def test_with_secret_exact_header_set(self) -> None:
        """With a secret the headers are exactly the five fixed ones plus the four signatures."""
        h = _headers()
        assert set(h) == {
            "Content-Type",
            "User-Agent",
            "X-Webhook-Event",
            "X-Webhook-Id",
            "X-Webhook-Attempt",
            *SIGNATURE_HEADERS,
        }

    def test_with_secret_all_signature_headers(self) -> None:
        """With a secret all four signature headers are present."""
        h = _headers()
        for name in SIGNATURE_HEADERS:
            assert name in h

    def test_test_flag_adds_header(self) -> None:
        """test=True adds X-Webhook-Test: true."""
        assert _headers(test=True)["X-Webhook-Test"] == "true"

    def test_test_flag_without_secret(self) -> None:
        """test=True adds X-Webhook-Test also when there is no secret."""
        assert _headers(test=True, secret=None)["X-Webhook-Test"] == "true"

    def test_no_test_header_by_default(self) -> None:
        """A normal delivery carries no X-Webhook-Test header."""
        assert "X-Webhook-Test" not in _headers()
        assert "X-Webhook-Test" not in _headers(test=False)

    def test_the_webhooks_own_headers_come_after_outboxs(self) -> None:
        """``extra`` headers are added after outbox's own, values as given."""
        h = _headers(extra={"Authorization": "Bearer abc", "X-Api-Key": "k"})
        assert list(h)[-2:] == ["Authorization", "X-Api-Key"]
        assert h["Authorization"] == "Bearer abc"
        assert h["X-Webhook-Id"] == "123"

    def test_outboxs_headers_win(self) -> None:
        """Should an extra header have a name outbox sets (the database refuses them), the
        value outbox computed is sent."""
        h = _headers(extra={"X-Webhook-Id": "forged", "webhook-signature": "v1,forged"})
        assert h["X-Webhook-Id"] == "123"
        assert h["webhook-signature"] != "v1,forged"
