"""How often an account may ask for test sends (one at a time per webhook, and at most
TEST_SENDS_PER_MINUTE a minute per account) and for replays (REPLAYS_PER_MINUTE).

A test send is an HTTP request a tenant can make the sidecar send at will, so it is
bounded like one; a replay (retry, recover) queues requests again, and its outcome tells
the tenant something about the network, so it is bounded too. Deliveries never wait on
a test send (test sends have a connection pool of
their own, see outbox.sidecar). The counts live in the memory of one sidecar process:
with N replicas behind one address, an account can make N times the per-minute figure
and have one test send per webhook in flight on each replica. That still bounds what
one account can make the sidecars send; it is not meant as exact accounting.

Pure: the caller says what time it is (time.monotonic()).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["REPLAYS_PER_MINUTE", "TEST_SENDS_PER_MINUTE", "PerMinute", "Refused", "Throttle"]

TEST_SENDS_PER_MINUTE = 10
REPLAYS_PER_MINUTE = 60
WINDOW = 60.0


class Refused(Exception):
    """Not now; ``retry_after`` whole seconds from now, it would be let through."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _seconds(delay: float) -> int:
    # Retry-After is whole seconds; rounding down would invite a retry that is refused.
    return max(1, math.ceil(delay))


class PerMinute:
    """At most ``per_minute`` of something per account in any WINDOW seconds."""

    def __init__(self, per_minute: int, what: str) -> None:
        self._per_minute = per_minute
        self._what = what
        # Account -> when its admitted requests of the last WINDOW seconds came, oldest first.
        self._started: dict[str, deque[float]] = {}

    def admit(self, account: str, now: float) -> None:
        """Count one more, or raise Refused saying why and for how long. A request
        that then turns out to do nothing may be given back (``refund``)."""
        self._forget(now)
        started = self._started.setdefault(account, deque())
        if len(started) >= self._per_minute:
            raise Refused(
                f"at most {self._per_minute} {self._what} a minute per account",
                _seconds(started[0] + WINDOW - now),
            )
        started.append(now)

    def refund(self, account: str, admitted_at: float) -> None:
        """Uncount what was admitted at ``admitted_at``."""
        started = self._started.get(account)
        if started is not None and admitted_at in started:
            started.remove(admitted_at)

    def _forget(self, now: float) -> None:
        """Drop starts older than the window, and accounts left with none."""
        for account in list(self._started):
            started = self._started[account]
            while started and started[0] <= now - WINDOW:
                started.popleft()
            if not started:
                del self._started[account]


class Throttle:
    """Admits test sends; ``budget`` is how long one may take (OUTBOX_HTTP_TIMEOUT)."""

    def __init__(self, budget: float, per_minute: int = TEST_SENDS_PER_MINUTE) -> None:
        self._budget = budget
        self._window = PerMinute(per_minute, "test sends")
        # Webhook id -> when its test send started.
        self._in_flight: dict[int, float] = {}

    def admit(self, account: str, webhook_id: int, now: float) -> None:
        """Count a test send as started, or raise Refused saying why and for how long.
        Every admitted send must be followed by ``done(webhook_id)``."""
        if (since := self._in_flight.get(webhook_id)) is not None:
            raise Refused(
                "a test send to this webhook is still in flight; wait for its result",
                _seconds(since + self._budget - now),
            )
        self._window.admit(account, now)
        self._in_flight[webhook_id] = now

    def done(self, webhook_id: int) -> None:
        self._in_flight.pop(webhook_id, None)
