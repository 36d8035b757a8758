"""How often an account may ask for test sends: one at a time per webhook, and at most
TEST_SENDS_PER_MINUTE a minute per account.

A test send is an HTTP request a tenant can make the sidecar send at will, so it is
bounded like one; deliveries never wait on it (test sends have a connection pool of
their own, see outbox.sidecar). The counts live in the memory of one sidecar process:
with N replicas behind one address, an account can make N times the per-minute figure
and have one test send per webhook in flight on each replica. That still bounds what
one account can make the sidecars send; it is not meant as exact accounting.

Pure: the caller says what time it is (time.monotonic()).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["TEST_SENDS_PER_MINUTE", "Refused", "Throttle"]

TEST_SENDS_PER_MINUTE = 10
WINDOW = 60.0


class Refused(Exception):
    """Not now; ``retry_after`` whole seconds from now, it would be let through."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _seconds(delay: float) -> int:
    # Retry-After is whole seconds; rounding down would invite a retry that is refused.
    return max(1, math.ceil(delay))


class Throttle:
    """Admits test sends; ``budget`` is how long one may take (OUTBOX_HTTP_TIMEOUT)."""

    def __init__(self, budget: float, per_minute: int = TEST_SENDS_PER_MINUTE) -> None:
        self._budget = budget
        self._per_minute = per_minute
        # Webhook id -> when its test send started.
        self._in_flight: dict[int, float] = {}
        # Account -> when its test sends of the last WINDOW seconds started, oldest first.
        self._started: dict[str, deque[float]] = {}

    def admit(self, account: str, webhook_id: int, now: float) -> None:
        """Count a test send as started, or raise Refused saying why and for how long.
        Every admitted send must be followed by ``done(webhook_id)``."""
        self._forget(now)
        if (since := self._in_flight.get(webhook_id)) is not None:
            raise Refused(
                "a test send to this webhook is still in flight; wait for its result",
                _seconds(since + self._budget - now),
            )
        started = self._started.setdefault(account, deque())
        if len(started) >= self._per_minute:
            raise Refused(
                f"at most {self._per_minute} test sends a minute per account",
                _seconds(started[0] + WINDOW - now),
            )
        started.append(now)
        self._in_flight[webhook_id] = now

    def done(self, webhook_id: int) -> None:
        self._in_flight.pop(webhook_id, None)

    def _forget(self, now: float) -> None:
        """Drop starts older than the window, and accounts left with none."""
        for account in list(self._started):
            started = self._started[account]
            while started and started[0] <= now - WINDOW:
                started.popleft()
            if not started:
                del self._started[account]
