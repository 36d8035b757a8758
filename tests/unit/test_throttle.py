"""outbox.throttle: which test sends are let through, and for how long the others wait."""

from __future__ import annotations

import pytest

from outbox.throttle import TEST_SENDS_PER_MINUTE, PerMinute, Refused, Throttle


def refused(throttle: Throttle, account: str, webhook_id: int, now: float) -> Refused:
    with pytest.raises(Refused) as info:
        throttle.admit(account, webhook_id, now)
    return info.value


class TestOneInFlightPerWebhook:
    def test_a_second_send_to_the_same_webhook_waits_for_the_first(self) -> None:
        """While one is in flight the webhook's next is refused, for at most what is left
        of the first one's time; once it is done, the next goes."""
        throttle = Throttle(budget=10.0)
        throttle.admit("a", 1, now=100.0)
        second = refused(throttle, "a", 1, now=103.2)
        assert second.retry_after == 7
        assert "in flight" in str(second)
        throttle.done(1)
        throttle.admit("a", 1, now=104.0)

    def test_other_webhooks_and_accounts_are_not_held_up(self) -> None:
        """Another webhook of the account, and another account, go at the same time."""
        throttle = Throttle(budget=10.0)
        throttle.admit("a", 1, now=0.0)
        throttle.admit("a", 2, now=0.0)
        throttle.admit("b", 3, now=0.0)

    def test_retry_after_is_at_least_a_second(self) -> None:
        """A send past its own budget (about to end) still asks for a whole second."""
        throttle = Throttle(budget=2.0)
        throttle.admit("a", 1, now=0.0)
        assert refused(throttle, "a", 1, now=5.0).retry_after == 1


class TestPerMinute:
    def test_the_eleventh_in_a_minute_is_refused_until_the_first_is_a_minute_old(self) -> None:
        """Ten a minute per account, counted from each one's start; Retry-After says
        when the oldest leaves the minute."""
        throttle = Throttle(budget=10.0)
        for n in range(TEST_SENDS_PER_MINUTE):
            throttle.admit("a", n, now=10.0 + n)
            throttle.done(n)
        eleventh = refused(throttle, "a", 99, now=30.5)
        assert eleventh.retry_after == 40  # the first started at 10.0: free at 70.0
        assert str(eleventh) == "at most 10 test sends a minute per account"
        assert refused(throttle, "a", 99, now=69.9).retry_after == 1
        throttle.admit("a", 99, now=70.0)
        assert refused(throttle, "a", 98, now=70.5).retry_after == 1  # the second, at 11.0

    def test_a_refused_send_does_not_count(self) -> None:
        """Refusals use up nothing: after the minute, ten more go."""
        throttle = Throttle(budget=10.0, per_minute=2)
        throttle.admit("a", 1, now=0.0)
        throttle.admit("a", 2, now=0.0)
        for _ in range(5):
            refused(throttle, "a", 3, now=1.0)
        throttle.done(1)
        throttle.done(2)
        throttle.admit("a", 3, now=60.0)
        throttle.admit("a", 4, now=60.0)

    def test_accounts_are_counted_apart(self) -> None:
        """One account at its limit leaves another's sends alone."""
        throttle = Throttle(budget=10.0, per_minute=1)
        throttle.admit("a", 1, now=0.0)
        throttle.admit("b", 2, now=0.0)
        refused(throttle, "a", 3, now=1.0)


class TestReplayWindow:
    def test_admits_the_budget_then_refuses_until_the_oldest_leaves_the_window(self) -> None:
        window = PerMinute(3, "replays")
        for at in (0.0, 1.0, 2.0):
            window.admit("a", at)
        with pytest.raises(Refused) as refused:
            window.admit("a", 10.0)
        assert refused.value.retry_after == 50
        window.admit("b", 10.0)
        window.admit("a", 60.5)

    def test_a_refund_gives_back_what_was_admitted(self) -> None:
        """A request that turned out to replay nothing does not use the budget."""
        window = PerMinute(2, "replays")
        window.admit("a", 1.0)
        window.admit("a", 2.0)
        window.refund("a", 2.0)
        window.admit("a", 3.0)
        with pytest.raises(Refused):
            window.admit("a", 4.0)
