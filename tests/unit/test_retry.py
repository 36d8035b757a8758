"""Tests for outbox.retry: retry schedule, jitter, Retry-After, and the words for them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from outbox.config import Settings
from outbox.retry import (
    JITTER,
    SLOWDOWNS,
    duration_words,
    next_delay,
    parse_retry_after,
    retry_note,
    slowdown_delay,
)

# A schedule of growing delays (the default OUTBOX_RETRY_DELAYS until #23).
SCHEDULE = (60.0, 600.0, 3600.0)
SEEDS = range(500)
NOW = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)


class TestNextDelay:
    """`next_delay`: the jittered schedule, its end, and Retry-After as a minimum."""

    def test_jitter_is_twenty_percent(self) -> None:
        """The published jitter bound is 20%."""
        assert abs(JITTER - 0.2) < 1e-12

    @pytest.mark.parametrize("attempt", [1, 2, 3])
    def test_within_twenty_percent(self, attempt: int) -> None:
        """Across many seeds every delay stays within ±20% of the configured one."""
        base = SCHEDULE[attempt - 1]
        values = [next_delay(attempt, SCHEDULE, rng=random.Random(seed)) for seed in SEEDS]
        assert all(v is not None for v in values)
        floats = [float(v) for v in values if v is not None]
        assert min(floats) >= base * 0.8
        assert max(floats) <= base * 1.2

    @pytest.mark.parametrize("attempt", [1, 2, 3])
    def test_jitter_varies_and_spans_both_sides(self, attempt: int) -> None:
        """Jitter really varies: many distinct values, some well below and some well above."""
        base = SCHEDULE[attempt - 1]
        values = [next_delay(attempt, SCHEDULE, rng=random.Random(seed)) for seed in SEEDS]
        floats = [float(v) for v in values if v is not None]
        assert len(set(floats)) > 400
        assert min(floats) < base * 0.85
        assert max(floats) > base * 1.15

    def test_same_seed_same_delay(self) -> None:
        """The rng passed in is the only source of randomness: equal seeds give equal delays."""
        a = next_delay(2, SCHEDULE, rng=random.Random(7))
        b = next_delay(2, SCHEDULE, rng=random.Random(7))
        assert a == b

    @pytest.mark.parametrize("seed", range(50))
    def test_growing_delays_grow(self, seed: int) -> None:
        """With 60, 600, 3600 each retry waits longer than the one before, whatever the jitter."""
        rng = random.Random(seed)
        d1, d2, d3 = (next_delay(n, SCHEDULE, rng=rng) for n in (1, 2, 3))
        assert d1 is not None and d2 is not None and d3 is not None
        assert d1 < d2 < d3

    @pytest.mark.parametrize(
        ("attempt", "delays"),
        [(4, SCHEDULE), (1, ()), (2, (5.0,)), (10, SCHEDULE)],
    )
    def test_none_after_last_delay(self, attempt: int, delays: tuple[float, ...]) -> None:
        """Once the attempts exceed the configured delays there is no further retry."""
        assert next_delay(attempt, delays, rng=random.Random(0)) is None

    def test_none_after_last_even_with_retry_after(self) -> None:
        """A Retry-After does not add an attempt beyond the schedule."""
        assert next_delay(4, SCHEDULE, retry_after=30, rng=random.Random(0)) is None

    def test_last_attempt_still_has_a_delay(self) -> None:
        """Attempt number len(delays) still gets a retry (one retry per configured delay)."""
        assert next_delay(3, SCHEDULE, rng=random.Random(0)) is not None

    def test_zero_delay_stays_zero(self) -> None:
        """A delay of 0 is not jittered into a negative or positive wait."""
        assert next_delay(1, (0.0, 1.0), rng=random.Random(3)) == 0.0

    @pytest.mark.parametrize("attempt", [1, 2])
    @pytest.mark.parametrize("seed", range(20))
    def test_retry_after_capped_at_largest_delay(self, attempt: int, seed: int) -> None:
        """Retry-After 100 with delays (1, 2, 3) waits exactly the largest delay, 3."""
        got = next_delay(attempt, (1, 2, 3), retry_after=100, rng=random.Random(seed))
        assert got == 3

    @pytest.mark.parametrize("seed", range(20))
    def test_retry_after_is_a_minimum(self, seed: int) -> None:
        """A Retry-After above the jittered delay (but under the cap) is waited exactly."""
        got = next_delay(1, SCHEDULE, retry_after=300, rng=random.Random(seed))
        assert got == 300

    @pytest.mark.parametrize("seed", range(20))
    def test_retry_after_below_schedule_is_ignored(self, seed: int) -> None:
        """A Retry-After shorter than the scheduled delay leaves the jittered delay as it was."""
        plain = next_delay(2, SCHEDULE, rng=random.Random(seed))
        got = next_delay(2, SCHEDULE, retry_after=5, rng=random.Random(seed))
        assert got == plain

    @pytest.mark.parametrize("seed", range(20))
    def test_retry_after_zero_leaves_schedule(self, seed: int) -> None:
        """Retry-After 0 leaves the jittered schedule unchanged."""
        plain = next_delay(1, (1, 2, 3), rng=random.Random(seed))
        got = next_delay(1, (1, 2, 3), retry_after=0, rng=random.Random(seed))
        assert got == plain
        assert got is not None and 0.8 <= got <= 1.2

    @pytest.mark.parametrize("seed", range(20))
    def test_retry_after_never_shortens_last_delay(self, seed: int) -> None:
        """On the last retry the result is max(jittered delay, capped Retry-After)."""
        plain = next_delay(3, (1, 2, 3), rng=random.Random(seed))
        got = next_delay(3, (1, 2, 3), retry_after=100, rng=random.Random(seed))
        assert plain is not None
        assert got == max(plain, 3)


class TestParseRetryAfter:
    """`parse_retry_after`: delta-seconds or HTTP-date, relative to `now`."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("0", 0.0), ("1", 1.0), ("120", 120.0), (" 120 ", 120.0), ("86400", 86400.0)],
    )
    def test_delta_seconds(self, value: str, expected: float) -> None:
        """A delta-seconds value is that many seconds."""
        assert parse_retry_after(value, NOW) == expected

    def test_http_date_in_future(self) -> None:
        """An IMF-fixdate two minutes after `now` gives 120 seconds."""
        assert parse_retry_after("Thu, 01 Jan 2026 00:02:00 GMT", NOW) == pytest.approx(120.0)

    def test_http_date_relative_to_now(self) -> None:
        """The same date gives a different wait for a different `now`."""
        later = NOW + timedelta(seconds=90)
        assert parse_retry_after("Thu, 01 Jan 2026 00:02:00 GMT", later) == pytest.approx(30.0)

    def test_rfc850_date(self) -> None:
        """The obsolete RFC 850 form of HTTP-date is understood."""
        value = "Thursday, 01-Jan-26 00:02:00 GMT"
        assert parse_retry_after(value, NOW) == pytest.approx(120.0)

    def test_asctime_date(self) -> None:
        """The asctime HTTP-date form (RFC 9110 5.6.7: recipients must accept it) is understood."""
        assert parse_retry_after("Thu Jan  1 00:02:00 2026", NOW) == pytest.approx(120.0)

    @pytest.mark.parametrize(
        "value", ["Thu, 01 Jan 2026 00:02:00 -0000", "Thu, 01 Jan 2026 00:02:00"]
    )
    def test_zoneless_date_does_not_raise(self, value: str) -> None:
        """A date with no zone or a "-0000" zone gives seconds or None, never an exception."""
        result = parse_retry_after(value, NOW)
        assert result is None or result >= 0

    @pytest.mark.parametrize(
        "value", ["Wed, 31 Dec 2025 23:00:00 GMT", "Thu, 01 Jan 2026 00:00:00 GMT"]
    )
    def test_past_or_present_date_is_zero(self, value: str) -> None:
        """A date at or before `now` means no extra wait: 0."""
        assert parse_retry_after(value, NOW) == 0.0

    @pytest.mark.parametrize(
        "value", ["garbage", "soon", "1.5", "-5", "120s", "0x10", "Thu, 99 Foo 2026"]
    )
    def test_garbage_is_none(self, value: str) -> None:
        """A value that is neither delta-seconds nor an HTTP-date is None."""
        assert parse_retry_after(value, NOW) is None

    def test_non_ascii_digit_is_none(self) -> None:
        """A Unicode "digit" that is not an ASCII digit is garbage (None), not an exception."""
        assert parse_retry_after("\u00b2", NOW) is None

    @pytest.mark.parametrize("value", ["", None, "   "])
    def test_empty_is_none(self, value: str | None) -> None:
        """A missing, empty or blank header is None."""
        assert parse_retry_after(value, NOW) is None


class TestSlowdownDelay:
    """`slowdown_delay`: when an attempt answered 429 is made again, without using up
    a retry (CONTRACT section 19)."""

    def test_ten_are_let_off(self) -> None:
        assert SLOWDOWNS == 10

    @pytest.mark.parametrize("attempt", [1, 2, 3])
    def test_without_retry_after_the_delay_that_attempt_would_have_had(self, attempt: int) -> None:
        """The delay a failure of the same attempt would have had, with jitter."""
        base = SCHEDULE[attempt - 1]
        values = [slowdown_delay(attempt, SCHEDULE, rng=random.Random(seed)) for seed in range(100)]
        floats = [v for v in values if v is not None]
        assert len(floats) == 100
        assert base * 0.8 <= min(floats) < base * 0.9 and base * 1.1 < max(floats) <= base * 1.2

    def test_after_the_last_attempt_the_last_delay(self) -> None:
        """The last attempt (no retry left to use up) waits the last delay."""
        delay = slowdown_delay(4, SCHEDULE, rng=random.Random(1))
        assert delay is not None and 3600 * 0.8 <= delay <= 3600 * 1.2

    @pytest.mark.parametrize(("retry_after", "expected"), [(2.0, 2.0), (0.0, 0.0), (9999.0, 3600)])
    def test_retry_after_is_what_is_waited(self, retry_after: float, expected: float) -> None:
        """The receiver's Retry-After is waited, however short, capped at the largest delay;
        not the scheduled delay, which would be minutes."""
        assert slowdown_delay(1, SCHEDULE, retry_after=retry_after) == expected

    def test_nothing_without_retries(self) -> None:
        """With no retries configured nothing is tried again, 429 included."""
        assert slowdown_delay(1, (), retry_after=1.0) is None


class TestDurationWords:
    @pytest.mark.parametrize(
        ("seconds", "words"),
        [
            (432000, "5 days"),
            (86400, "1 day"),
            (129600, "36 hours"),
            (3600, "1 hour"),
            (600, "10 minutes"),
            (90, "90 seconds"),
            (1, "1 second"),
            (0.2, "0.2 seconds"),
            (1.5, "1.5 seconds"),
        ],
    )
    def test_the_largest_exact_unit(self, seconds: float, words: str) -> None:
        """A duration is said in the largest unit that divides it, never rounded."""
        assert duration_words(seconds) == words


class TestRetryNote:
    """What the page and `outbox status` say about retries, from the settings in force."""

    def test_the_defaults(self) -> None:
        """The default settings: three retries, a 10 s wait, disabled after 5 days."""
        note = retry_note(Settings())
        assert note.startswith(
            "A delivery that fails is retried up to 3 times: after about 5 minutes, "
            "1 hour and 12 hours, about 13 hours in all. Each attempt waits up to 10 seconds"
            " for an answer."
        )
        assert "none succeeding for 5 days, is disabled" in note

    def test_other_settings(self) -> None:
        """One retry, a fractional timeout, and auto-disable off are said as they are."""
        settings = Settings(retry_delays=(0.5,), http_timeout=2.5, auto_disable_after=None)
        note = retry_note(settings)
        assert note.startswith(
            "A delivery that fails is retried once: after about 0.5 seconds. "
            "Each attempt waits up to 2.5 seconds"
        )
        assert "disabled" not in note

    def test_no_retries(self) -> None:
        note = retry_note(Settings(retry_delays=()))
        assert note.startswith("A delivery that fails is not retried.")
