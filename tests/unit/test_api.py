"""The admin API's pure parts: input checks, tokens, metrics, the OpenAPI document."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from outbox import jsontext, metrics, tokens, webhooks
from outbox.config import Settings
from outbox.delivery import Sender
from outbox.errors import Invalid
from outbox.web import api, http, openapi


class TestWebhookFields:
    def test_a_full_create_passes_through(self) -> None:
        """Every writable field, with JSON types, comes out as given."""
        body = {"name": "n", "url": "u", "event": "e", "secret": None, "enabled": False}
        assert api.webhook_fields(body, partial=False) == body

    @pytest.mark.parametrize("missing", ["name", "url", "event"])
    def test_a_create_needs_name_url_and_event(self, missing: str) -> None:
        body = {"name": "n", "url": "u", "event": "e"}
        del body[missing]
        with pytest.raises(Invalid, match=f"{missing} is required"):
            api.webhook_fields(body, partial=False)

    def test_a_change_may_give_any_fields_or_none(self) -> None:
        assert api.webhook_fields({}, partial=True) == {}
        assert api.webhook_fields({"secret": None}, partial=True) == {"secret": None}

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"colour": "x"}, "unknown field 'colour'"),
            ({"name": 1}, "name must be a string"),
            ({"url": ["https://x"]}, "url must be a string"),
            ({"enabled": 1}, "enabled must be true or false"),
            ({"enabled": None}, "enabled must be true or false"),
            ({"event": None}, "event must not be null"),
            ({"secret": "abc\x00def0123456789"}, "secret must not contain NUL"),
            ({"name": "\udc80"}, "name must be valid Unicode"),
        ],
    )
    def test_values_the_database_cannot_take_are_invalid(
        self, body: dict[str, Any], message: str
    ) -> None:
        """Wrong JSON types, NUL and lone surrogates are refused before the database."""
        with pytest.raises(Invalid, match=message):
            api.webhook_fields(body, partial=True)


class TestParseSince:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("2026-11-27T10:00:00Z", datetime(2026, 11, 27, 10, tzinfo=UTC)),
            ("2026-11-27t10:00:00z", datetime(2026, 11, 27, 10, tzinfo=UTC)),
            (
                "2026-11-27T12:00:00.5+02:00",
                datetime(2026, 11, 27, 12, 0, 0, 500000, tzinfo=timezone(timedelta(hours=2))),
            ),
        ],
    )
    def test_rfc_3339_times(self, raw: str, expected: datetime) -> None:
        assert webhooks.parse_since(raw) == expected

    @pytest.mark.parametrize("raw", ["2026-11-27T10:00:00", "2026-11-27", "yesterday", "", 5, None])
    def test_times_without_an_offset_and_non_times_are_invalid(self, raw: Any) -> None:
        """A time without an offset is ambiguous by hours, so it is refused."""
        with pytest.raises(Invalid, match="since"):
            webhooks.parse_since(raw)


class TestPageParams:
    def test_defaults(self) -> None:
        assert api.page_params({}) == (None, api.PAGE_SIZE)

    def test_given_values(self) -> None:
        assert api.page_params({"limit": "100", "cursor": "42"}) == (42, 100)

    @pytest.mark.parametrize(
        "query",
        [
            {"limit": "0"},
            {"limit": "101"},
            {"limit": "-1"},
            {"limit": "²"},
            {"cursor": "x"},
            {"cursor": str(2**63)},
        ],
    )
    def test_malformed_values_are_400(self, query: dict[str, str]) -> None:
        with pytest.raises(http.ApiError) as raised:
            api.page_params(query)
        assert raised.value.status == 400


class TestTokens:
    def test_a_token_is_prefixed_random_and_long(self) -> None:
        made = {tokens.generate() for _ in range(100)}
        assert len(made) == 100
        for token in made:
            assert token.startswith("obx_") and len(token) == 4 + 43

    def test_the_digest_is_sha256_of_the_whole_token(self) -> None:
        token = tokens.generate()
        assert tokens.digest(token) == hashlib.sha256(token.encode()).digest()

    @pytest.mark.parametrize("token", ["", "Bearer", "sk_live_abc", "obx_" + "a" * 200, "obx_é"])
    async def test_foreign_tokens_are_refused_without_asking_the_database(self, token: str) -> None:
        """No query runs for a token that cannot be ours (there is no connection here)."""
        assert await tokens.account(None, token) is None  # type: ignore[arg-type]


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


class TestMetrics:
    def test_an_attempt_counts_by_outcome(self) -> None:
        """A retried attempt is not a finished delivery; the last one is."""
        before = {
            "retrying": _value("outbox_attempts_total", {"outcome": "retrying"}),
            "failed": _value("outbox_deliveries_total", {"outcome": "failed"}),
            "count": _value("outbox_attempt_duration_seconds_count"),
        }
        metrics.attempt("pending", 0.2)
        metrics.attempt("failed", 0.3)
        assert _value("outbox_attempts_total", {"outcome": "retrying"}) == before["retrying"] + 1
        assert _value("outbox_deliveries_total", {"outcome": "failed"}) == before["failed"] + 1
        assert _value("outbox_attempt_duration_seconds_count") == before["count"] + 2

    def test_empty_claims_mean_up_but_are_not_batches(self) -> None:
        before = _value("outbox_claim_batch_size_count")
        metrics.dispatcher_up(False)
        metrics.claimed(0)
        assert _value("outbox_dispatcher_up") == 1
        assert _value("outbox_claim_batch_size_count") == before
        metrics.claimed(5)
        assert _value("outbox_claim_batch_size_count") == before + 1

    def test_text_format_by_default_and_openmetrics_on_request(self) -> None:
        body, content_type = metrics.exposition("")
        assert content_type.startswith("text/plain") and b"outbox_pending_deliveries" in body
        _, openmetrics_type = metrics.exposition("application/openmetrics-text")
        assert openmetrics_type.startswith("application/openmetrics-text")


class TestDocument:
    def test_documents_exactly_the_routes_the_app_serves(self) -> None:
        """Adding a route without documenting it (or the reverse) fails here."""
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool("", open=False)
        app = api.make_app(pool, Settings(), stage=api.Stage(), test_sender=Sender(Settings()))
        served = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None and route.method != "HEAD"
        }
        documented = {
            (method.upper(), path)
            for path, item in openapi.DOCUMENT["paths"].items()
            for method in item
            if method != "parameters"
        }
        assert served == documented

    def test_is_json_and_openapi_3_1(self) -> None:
        assert json.loads(json.dumps(openapi.DOCUMENT))["openapi"] == "3.1.0"


def test_times_are_utc_with_z() -> None:
    """Every time in an answer is RFC 3339 in UTC, whatever the session's time zone."""
    at = datetime(2026, 11, 27, 14, 30, tzinfo=timezone(timedelta(hours=1)))
    assert jsontext.default(at) == "2026-11-27T13:30:00Z"
