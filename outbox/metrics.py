"""Prometheus metrics of one `outbox run` process, served at ``GET /metrics``.

Counters and histograms are this process's own (sum them over replicas). The pending
and due gauges describe the whole database, read by the sidecar every few seconds (never
by a scrape), so every replica reports about the same values (take the max, not the
sum).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "REGISTRY",
    "attempt",
    "auto_disabled",
    "claimed",
    "dispatcher_up",
    "exposition",
    "loop_lag",
    "pending",
]

# The *_created series only repeat the process start time.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

_ATTEMPTS = Counter(
    "outbox_attempts",
    "HTTP attempts made, by what came of them: succeeded, retrying (failed, another "
    "attempt is scheduled) or failed (failed, and it was the last attempt).",
    ["outcome"],
    registry=REGISTRY,
)
_DELIVERIES = Counter(
    "outbox_deliveries",
    "Deliveries finished, by outcome: succeeded, or failed after their last attempt.",
    ["outcome"],
    registry=REGISTRY,
)
_DURATION = Histogram(
    "outbox_attempt_duration_seconds",
    "How long each HTTP attempt took, from connecting to the end of the response (or "
    "its first 1024 bytes, all that is read).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
_CLAIM = Histogram(
    "outbox_claim_batch_size",
    "Deliveries taken by each claim that took any.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
_PENDING = Gauge(
    "outbox_pending_deliveries",
    "Deliveries waiting to be sent or retried, in the whole database.",
    registry=REGISTRY,
)
_OLDEST = Gauge(
    "outbox_oldest_pending_age_seconds",
    "Age of the oldest pending delivery (since it was enqueued); 0 when none is pending.",
    registry=REGISTRY,
)
_DUE = Gauge(
    "outbox_due_deliveries",
    "Pending deliveries that are due now, in the whole database: waiting for a "
    "dispatcher, not for a retry's time and not held by one.",
    registry=REGISTRY,
)
_OLDEST_DUE = Gauge(
    "outbox_oldest_due_age_seconds",
    "How long the delivery due longest has been waiting for a dispatcher (since its "
    "attempt fell due); 0 when none is due.",
    registry=REGISTRY,
)
_AUTO_DISABLED = Counter(
    "outbox_webhooks_auto_disabled",
    "Webhooks this process disabled because their deliveries kept failing and none "
    "succeeded for OUTBOX_AUTO_DISABLE_AFTER.",
    registry=REGISTRY,
)
_UP = Gauge(
    "outbox_dispatcher_up",
    "1 while this process's dispatcher runs and reaches the database, else 0.",
    registry=REGISTRY,
)

_LOOP_LAG = Gauge(
    "outbox_event_loop_lag_seconds",
    "The longest the process's event loop was blocked (late to run what was due) since "
    "the previous scrape. Above 0.1 s, tenants and deliveries wait on each other.",
    registry=REGISTRY,
)
# The longest lag seen since the last scrape; a scrape shows it and starts over.
_lag_since_scrape = 0.0

# The dispatcher calls an attempt that schedules another one "pending". The labelled
# children are looked up once here, not (under a lock) on every attempt.
_OUTCOMES = {"succeeded": "succeeded", "pending": "retrying", "failed": "failed"}
_ATTEMPTS_BY = {outcome: _ATTEMPTS.labels(label) for outcome, label in _OUTCOMES.items()}
_DELIVERIES_BY = {outcome: _DELIVERIES.labels(outcome) for outcome in ("succeeded", "failed")}


def attempt(outcome: str, seconds: float) -> None:
    """One attempt ended; ``outcome`` is the delivery's status after it."""
    _ATTEMPTS_BY[outcome].inc()
    _DURATION.observe(seconds)
    finished = _DELIVERIES_BY.get(outcome)
    if finished is not None:
        finished.inc()


def auto_disabled() -> None:
    """A webhook was disabled for failing too long."""
    _AUTO_DISABLED.inc()


def claimed(count: int) -> None:
    """A claim took ``count`` deliveries; having reached the database, we are up."""
    _UP.set(1)
    if count:
        _CLAIM.observe(count)


def dispatcher_up(up: bool) -> None:
    _UP.set(1 if up else 0)


def pending(
    count: int, oldest_seconds: float | None, due: int, oldest_due_seconds: float | None
) -> None:
    """The database's pending deliveries, and those of them due now, as last read."""
    _PENDING.set(count)
    _OLDEST.set(oldest_seconds or 0.0)
    _DUE.set(due)
    _OLDEST_DUE.set(oldest_due_seconds or 0.0)


def loop_lag(seconds: float) -> None:
    """The event loop ran a callback ``seconds`` later than it was due."""
    global _lag_since_scrape
    _lag_since_scrape = max(_lag_since_scrape, seconds)


def exposition(accept: str) -> tuple[bytes, str]:
    """The metrics in the format the scraper asked for, and its content type."""
    global _lag_since_scrape
    _LOOP_LAG.set(_lag_since_scrape)
    _lag_since_scrape = 0.0
    encode, content_type = choose_encoder(accept)
    return encode(REGISTRY), content_type
