"""When the notifier tries an operational event again (outbox.notify.retry_in)."""

from __future__ import annotations

import pytest

from outbox.notify import KEEP_TRYING, retry_in
from outbox.retry import JITTER

DELAYS = (300.0, 3600.0, 43200.0)


class TestRetryIn:
    @pytest.mark.parametrize(("attempt", "delay"), [(1, 300.0), (2, 3600.0), (3, 43200.0)])
    def test_like_a_delivery_first(self, attempt: int, delay: float) -> None:
        """Attempt n waits about the n-th of OUTBOX_RETRY_DELAYS, with the same jitter."""
        assert delay * (1 - JITTER) <= retry_in(attempt, DELAYS) <= delay * (1 + JITTER)

    @pytest.mark.parametrize("attempt", [4, 5, 50])
    def test_then_the_largest_delay_for_good(self, attempt: int) -> None:
        """Past the schedule it never gives up: the largest delay, again and again."""
        got = retry_in(attempt, DELAYS)
        assert 43200 * (1 - JITTER) <= got <= 43200 * (1 + JITTER)

    def test_retry_after_is_a_minimum(self) -> None:
        """A Retry-After longer than the delay is waited (capped at the largest delay)."""
        assert retry_in(1, DELAYS, retry_after=1000.0) == 1000.0

    def test_without_delays_it_still_keeps_trying(self) -> None:
        """OUTBOX_RETRY_DELAYS empty (deliveries are not retried): notifications are,
        every KEEP_TRYING seconds."""
        assert retry_in(1, ()) == KEEP_TRYING == retry_in(9, ())
