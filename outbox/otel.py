"""The OpenTelemetry side of outbox.tracing: spans exported over OTLP/HTTP.

Imported only by outbox.tracing.start, when OTEL_EXPORTER_OTLP_ENDPOINT is set; needs
the ``otel`` extra (``pip install 'outbox[otel]'``). The exporter reads the standard
variables itself (endpoint, headers, timeout, compression), the SDK its sampler
(OTEL_TRACES_SAMPLER) and batching (OTEL_BSP_*), and the resource OTEL_SERVICE_NAME
and OTEL_RESOURCE_ATTRIBUTES; the service is called "outbox" unless told otherwise.

One trace per claim: the claim's span, and a span per attempt of a delivery it took,
as its children. A batch of results written back is a span of its own, linked to the
attempts it recorded (one batch holds the results of several claims). Spans are made
after the fact from times the dispatcher already took; exporting is done by the SDK's
batching thread, never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from outbox import __version__
from outbox.db.deliveries import Claimed, Job
from outbox.delivery import Attempt
from outbox.tracing import Hooks

__all__ = ["Spans"]


class Spans(Hooks):
    """Hooks that turn what the dispatcher reports into spans."""

    __slots__ = ("_attempts", "_claims", "_provider", "_tracer")

    def __init__(self, env: Mapping[str, str]) -> None:
        attributes = {"service.version": __version__}
        if not env.get("OTEL_SERVICE_NAME", "").strip():
            attributes["service.name"] = "outbox"
        self._provider = TracerProvider(resource=Resource.create(attributes))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer = self._provider.get_tracer("outbox", __version__)
        # The claim each job in flight came with, then its attempt until recorded.
        self._claims: dict[int, trace.Span] = {}
        self._attempts: dict[int, trace.SpanContext] = {}

    def clock(self) -> int:
        return time.time_ns()

    def claimed(self, started: int, limit: int, claimed: Claimed) -> None:
        if not claimed.rows:
            # An idle poll: nothing to follow.
            return
        span = self._tracer.start_span(
            "outbox.claim",
            start_time=started,
            attributes={"outbox.claim.limit": limit, "outbox.claim.rows": claimed.rows},
        )
        span.end()
        for job in claimed.jobs:
            self._claims[job.id] = span

    def attempted(self, job: Job, attempt: Attempt, outcome: str) -> None:
        claim = self._claims.pop(job.id, None)
        context = trace.set_span_in_context(claim) if claim is not None else None
        start = int(attempt.started_at.timestamp() * 1e9)
        attributes: dict[str, str | int] = {
            "outbox.delivery.id": job.id,
            "outbox.webhook.id": job.webhook_id,
            "outbox.account.id": job.account_id,
            "outbox.event": job.event,
            "outbox.attempt": job.attempt,
            "outbox.outcome": outcome,
            "http.request.method": "POST",
            # The host only: a customer's URL can carry a credential in its path.
            "server.address": urlsplit(job.url).hostname or "",
        }
        if attempt.status is not None:
            attributes["http.response.status_code"] = attempt.status
        if attempt.error is not None:
            attributes["outbox.reason"] = attempt.error
        span = self._tracer.start_span(
            "outbox.attempt",
            context=context,
            kind=trace.SpanKind.CLIENT,
            start_time=start,
            attributes=attributes,
        )
        if attempt.error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, attempt.error))
        span.end(end_time=start + attempt.duration_ms * 1_000_000)
        self._attempts[job.id] = span.get_span_context()

    def recorded(self, started: int, jobs: Iterable[Job]) -> None:
        ids = [job.id for job in jobs]
        links = [
            trace.Link(context)
            for id_ in ids
            if (context := self._attempts.pop(id_, None)) is not None
        ]
        span = self._tracer.start_span(
            "outbox.record",
            start_time=started,
            links=links,
            attributes={"outbox.record.results": len(ids)},
        )
        span.end()

    def shutdown(self) -> None:
        self._provider.shutdown()
