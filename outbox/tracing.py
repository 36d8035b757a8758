"""Traces of the delivery loop: OpenTelemetry spans with OTEL_EXPORTER_OTLP_ENDPOINT set,
and nothing at all without it.

The dispatcher tells ``hooks`` what it has just done, with the times it already has: a
claim that took deliveries, an attempt, a batch of results recorded. By default
``hooks`` is a Hooks, whose methods do nothing and which imports nothing, so without the
variable no OpenTelemetry code is loaded, let alone run on the delivery path. ``start``
swaps in the spans of outbox.otel (which imports the SDK, only then); ``stop`` sends
what is left.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from outbox.config import ConfigError
from outbox.db.deliveries import Claimed, Job
from outbox.delivery import Attempt

__all__ = ["Hooks", "enabled", "hooks", "start", "stop"]


class Hooks:
    """What the dispatcher reports; this default does nothing with it."""

    __slots__ = ()

    def clock(self) -> int:
        """A start time to hand back to claimed() or recorded() (nanoseconds)."""
        return 0

    def claimed(self, started: int, limit: int, claimed: Claimed) -> None:
        """A claim began at ``started`` and has just returned."""

    def attempted(self, job: Job, attempt: Attempt, outcome: str) -> None:
        """An attempt ended; ``outcome`` is its delivery's status after it."""

    def recorded(self, started: int, jobs: Iterable[Job]) -> None:
        """The results of these jobs' attempts were written, from ``started`` until now."""

    def shutdown(self) -> None:
        """Send what has not been sent yet."""


hooks: Hooks = Hooks()


def enabled(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and the SDK not
    turned off (OTEL_SDK_DISABLED, as every OpenTelemetry SDK reads it)."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "") or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""
    )
    return bool(endpoint.strip()) and env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"


def start(env: Mapping[str, str] | None = None) -> None:
    """Export spans if the environment asks for it (the exporter reads the rest of the
    OTEL_* variables itself); ConfigError if it does and the SDK is not installed."""
    global hooks
    env = os.environ if env is None else env
    if not enabled(env):
        return
    try:
        from outbox import otel
    except ImportError as exc:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed"
            f" ({exc.name}): pip install 'outbox[otel]'"
        ) from None
    try:
        hooks = otel.Spans(env)
    except ValueError as exc:
        # The SDK's own check of its OTEL_* settings (OTEL_BSP_*, say).
        raise ConfigError(f"OpenTelemetry settings: {exc}") from None


def stop() -> None:
    """Send the spans not sent yet, and go back to doing nothing."""
    global hooks
    current, hooks = hooks, Hooks()
    current.shutdown()
