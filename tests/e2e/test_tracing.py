"""OpenTelemetry: a real `outbox run` delivering to a real receiver exports its spans
over OTLP/HTTP to a collector stand-in (an HTTP server that decodes the protobuf with
opentelemetry-proto); without OTEL_EXPORTER_OTLP_ENDPOINT no OpenTelemetry module is
even imported."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import ROOT, SQL, Sidecar, wait_until
from tests.receiver import Receiver, Reply

Start = Callable[..., Sidecar]


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    kind: int
    status_code: int
    attributes: dict[str, Any]
    links: list[bytes]
    resource: dict[str, Any]


def _values(pairs: Any) -> dict[str, Any]:
    values = {}
    for pair in pairs:
        which = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, which) if which else None
    return values


class Collector:
    """Takes POST /v1/traces as an OpenTelemetry collector does, and keeps the spans."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                collector.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def take(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = _values(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            Span(
                                name=span.name,
                                trace_id=span.trace_id,
                                span_id=span.span_id,
                                parent_span_id=span.parent_span_id,
                                kind=span.kind,
                                status_code=span.status.code,
                                attributes=_values(span.attributes),
                                links=[link.span_id for link in span.links],
                                resource=resource,
                            )
                        )

    def named(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name]

    def start(self) -> Collector:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector().start()
    yield c
    c.stop()


def traced(collector: Collector) -> dict[str, str]:
    # Batches sent every 50 ms rather than every 5 s, for the test's sake.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}


SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


class TestSpans:
    def test_claim_attempt_and_record_spans_of_real_deliveries(
        self, sql: SQL, receiver: Receiver, collector: Collector, sidecars: Start
    ) -> None:
        """One event to a webhook that answers 200 and one that answers 500 (retried
        three times): an attempt span each, with webhook id, status and reason, child
        of the claim that took it; record spans linking the attempts they wrote."""
        receiver.respond = lambda r: Reply(500) if r.path == "/fail" else Reply(200)
        ok = sql.webhook(receiver.url("/ok"), name="ok")
        failing = sql.webhook(receiver.url("/fail"), name="fail")
        sidecar = sidecars(**traced(collector))
        sql.emit()
        wait_until(
            lambda: (
                len(collector.named("outbox.attempt")) == 5
                and {"succeeded", "failed"}
                <= {s.attributes["outbox.outcome"] for s in collector.named("outbox.attempt")}
                and len({link for s in collector.named("outbox.record") for link in s.links}) == 5
            ),
            timeout=30,
            what="5 attempt spans and records of them all",
        )
        attempts = collector.named("outbox.attempt")
        by_webhook: dict[int, list[Span]] = {}
        for span in attempts:
            by_webhook.setdefault(span.attributes["outbox.webhook.id"], []).append(span)
        (good,) = by_webhook[ok]
        assert good.attributes["http.response.status_code"] == 200
        assert good.attributes["outbox.outcome"] == "succeeded"
        assert "outbox.reason" not in good.attributes
        assert good.kind == SPAN_KIND_CLIENT and good.status_code != STATUS_ERROR
        assert good.attributes["server.address"] == "127.0.0.1"
        bad = sorted(by_webhook[failing], key=lambda s: s.attributes["outbox.attempt"])
        assert [s.attributes["outbox.attempt"] for s in bad] == [1, 2, 3, 4]
        assert [s.attributes["outbox.outcome"] for s in bad] == ["pending"] * 3 + ["failed"]
        for span in bad:
            assert span.attributes["http.response.status_code"] == 500
            assert span.attributes["outbox.reason"] == "HTTP 500"
            assert span.status_code == STATUS_ERROR
        delivery_ids = {s.attributes["outbox.delivery.id"] for s in attempts}
        assert delivery_ids == {row[0] for row in sql("SELECT id FROM outbox.deliveries")}

        claims = {s.span_id: s for s in collector.named("outbox.claim")}
        for span in attempts:
            claim = claims[span.parent_span_id]
            assert claim.trace_id == span.trace_id
            assert claim.attributes["outbox.claim.rows"] >= 1
        linked = [link for s in collector.named("outbox.record") for link in s.links]
        assert sorted(linked) == sorted(s.span_id for s in attempts)

        assert good.resource["service.name"] == "outbox"
        assert sidecar.stop() == 0

    def test_spans_in_flight_at_stop_are_sent(
        self, sql: SQL, receiver: Receiver, collector: Collector, sidecars: Start
    ) -> None:
        """SIGTERM sends what the batch had not sent yet: nothing waits 5 s to go."""
        sql.webhook(receiver.url())
        sidecar = sidecars(
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY="600000"
        )
        sql.emit()
        receiver.wait_for(1)
        wait_until(lambda: sql.one("SELECT count(*) FROM outbox.delivery_attempts") == 1)
        assert collector.named("outbox.attempt") == []
        assert sidecar.stop() == 0
        assert len(collector.named("outbox.attempt")) == 1
        assert len(collector.named("outbox.record")) == 1


def imported(sidecar: Sidecar) -> set[str]:
    """Every module the process imported, from Python's own -X importtime lines."""
    return {
        line.rpartition("|")[2].strip()
        for line in sidecar.log().splitlines()
        if line.startswith("import time:")
    }


class TestWithoutTheVariable:
    def test_no_opentelemetry_module_is_imported(
        self, sql: SQL, receiver: Receiver, collector: Collector, sidecars: Start
    ) -> None:
        """A sidecar without the variable delivers and never imports OpenTelemetry;
        the same sidecar with it does (the check sees imports)."""
        sql.webhook(receiver.url())
        plain = sidecars(PYTHONPROFILEIMPORTTIME="1")
        sql.emit()
        receiver.wait_for(1)
        assert plain.stop() == 0
        modules = imported(plain)
        assert "outbox.tracing" in modules and "outbox.dispatcher" in modules
        assert not [m for m in modules if m.startswith(("opentelemetry", "outbox.otel"))]

        with_traces = sidecars(PYTHONPROFILEIMPORTTIME="1", **traced(collector))
        assert with_traces.stop() == 0
        assert "opentelemetry.sdk.trace" in imported(with_traces)

    def test_the_variable_without_the_sdk_is_a_one_line_error(
        self, sidecar_env: dict[str, str]
    ) -> None:
        """Set, on an install without the otel extra (the import made to fail as it
        would): one line saying what to install, exit 2."""
        code = (
            "import sys; sys.modules['opentelemetry'] = None;"
            " from outbox.cli import main; raise SystemExit(main())"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, "run"],
            env=sidecar_env | {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "outbox: OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed"
            " (opentelemetry): pip install 'outbox[otel]'"
        ]
