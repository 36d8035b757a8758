"""The OpenAPI document is honest: schemathesis runs it against a live server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.openapi import from_dict
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import SQL, Sidecar
from tests.e2e.test_api import add_delivery, new_api
from tests.receiver import Receiver

# Generated cases per run: 20 operations, up to three runs each (generated ids, our ids,
# invalid input), so about 950 requests in all.
EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_the_document_lists_every_route(sidecars: Callable[..., Sidecar], sql: SQL) -> None:
    """Each route the server answers is in the document, with the same methods."""
    api = new_api(sidecars(), sql)
    document = api("GET", "/api/v1/openapi.json").json
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/webhooks"),
        ("POST", "/api/v1/webhooks"),
        ("GET", "/api/v1/webhooks/{id}"),
        ("PATCH", "/api/v1/webhooks/{id}"),
        ("DELETE", "/api/v1/webhooks/{id}"),
        ("POST", "/api/v1/webhooks/{id}/test"),
        ("GET", "/api/v1/webhooks/{id}/deliveries"),
        ("POST", "/api/v1/webhooks/{id}/recover"),
        ("POST", "/api/v1/deliveries/{id}/retry"),
        ("GET", "/api/v1/deliveries/{id}/request-body"),
        ("POST", "/api/v1/portal-links"),
        ("DELETE", "/api/v1/portal-sessions"),
        ("GET", "/portal/{token}"),
        ("POST", "/portal/{token}"),
        ("GET", "/settings/webhooks"),
        ("POST", "/settings/signout"),
        ("GET", "/static/theme.css"),
        ("GET", "/static/{name}"),
    }


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(
    sidecars: Callable[..., Sidecar], sql: SQL, receiver: Receiver
) -> None:
    """Generated valid and invalid requests to every operation, with a token: no 5xx,
    and every answer's status, content type, headers and body are as documented. Each
    operation also runs on an id the account owns, and succeeds at least once."""
    api = new_api(sidecars(OUTBOX_HTTP_TIMEOUT="0.5"), sql)
    schema = from_dict(api("GET", "/api/v1/openapi.json").json)
    auth = {"Authorization": f"Bearer {api.tokens[api.main]}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 23
    # Generated ids rarely exist, so each operation that takes one also runs on an id of
    # ours: a webhook (with a failed delivery) of its own, leaving three of the account's
    # ten for generated creates.
    owned: dict[str, int] = {}
    for operation in operations:
        if "{id}" in operation.path:
            hook = sql.webhook(receiver.url(), account=api.main)
            delivery = add_delivery(sql, hook)
            is_delivery = operation.path.startswith("/api/v1/deliveries/")
            owned[operation.label] = delivery if is_delivery else hook
    succeeded: set[str] = set()

    for operation in operations:
        runs: list[tuple[GenerationMode, dict[str, int]]] = [(GenerationMode.POSITIVE, {})]
        if operation.label in owned:
            runs.append((GenerationMode.POSITIVE, {"id": owned[operation.label]}))
        if any((operation.path_parameters, operation.query, operation.body)):
            runs.append((GenerationMode.NEGATIVE, {}))
        for mode, path_parameters in runs:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def check(case: Case) -> None:
                response = case.call_and_validate(
                    base_url=api.base_url, headers=auth, checks=CHECKS
                )
                if response.status_code < 300:
                    succeeded.add(case.operation.label)

            check()

    # The settings page and its one-time links need a browser's session; with a token
    # they only ever answer their documented error pages.
    pages = {"GET /portal/{token}", "POST /portal/{token}", "GET /settings/webhooks"}
    assert succeeded == {operation.label for operation in operations} - pages
