"""When to try again, and how to say it: pure functions, no I/O, no clock."""

from __future__ import annotations

import email.utils
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from outbox.config import Settings

__all__ = [
    "JITTER",
    "SLOWDOWNS",
    "duration_words",
    "next_delay",
    "parse_retry_after",
    "retry_note",
    "series",
    "slowdown_delay",
]

JITTER = 0.2
# Answers of 429 ("slow down") per delivery that do not use up a retry; after that, a
# 429 counts like any other failure.
SLOWDOWNS = 10


def next_delay(
    attempt: int,
    delays: Sequence[float],
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait after failed attempt number ``attempt`` (1-based), or None when done.

    Each delay gets up to ±20% jitter so a burst of failures does not retry in lockstep.
    A ``Retry-After`` is a minimum, capped at the largest configured delay so a receiver
    cannot park a delivery for a week.
    """
    if attempt > len(delays):
        return None
    scheduled = delays[attempt - 1] * (1 + (rng or random).uniform(-JITTER, JITTER))
    if retry_after is not None:
        scheduled = max(scheduled, min(retry_after, max(delays)))
    return scheduled


def slowdown_delay(
    attempt: int,
    delays: Sequence[float],
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait after an answer of 429 to attempt number ``attempt`` (1-based, as
    ``next_delay`` counts it) that does not use up a retry: the receiver's
    ``Retry-After``, capped at the largest configured delay as in ``next_delay``; without
    one, the delay a failure of that attempt would have had (the last one, after the
    last attempt), with jitter. None when no retries are configured: then nothing is
    tried again, 429 or not.
    """
    if not delays:
        return None
    if retry_after is not None:
        return min(retry_after, max(delays))
    return next_delay(min(attempt, len(delays)), delays, rng=rng)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # HTTP dates are always GMT, whatever form (asctime, "-0000") they come in.
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


_UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


def duration_words(seconds: float) -> str:
    """A duration as people say it: ``5 days``, ``1 hour``, ``90 seconds``, ``0.2 seconds``.

    The largest unit that divides it exactly, so nothing is rounded away.
    """
    for size, unit in _UNITS:
        count = seconds / size
        if count >= 1 and count == int(count):
            return f"{int(count)} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} seconds"


def series(words: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _rounded(seconds: float) -> str:
    """A duration in its largest whole unit, rounded: ``13 hours`` for 13 h 5 min."""
    for size, unit in _UNITS[:-1]:
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return duration_words(seconds)


def retry_note(settings: Settings) -> str:
    """What happens to a delivery that fails, and to an endpoint that keeps failing."""
    delays = settings.retry_delays
    if delays:
        times = "once" if len(delays) == 1 else f"up to {len(delays)} times"
        # The whole window too: whether an endpoint down overnight still gets its events.
        window = f", about {_rounded(sum(delays))} in all" if len(delays) > 1 else ""
        retries = (
            f"A delivery that fails is retried {times}: after about "
            f"{series([duration_words(d) for d in delays])}{window}."
        )
    else:
        retries = "A delivery that fails is not retried."
    shown = (
        "While a delivery is being retried its webhook shows Retrying with the reason; if "
        "every attempt fails, it shows Failed, and its delivery log shows every attempt "
        "with your endpoint's answer."
        if delays
        else "The webhook then shows Failed with the reason, and its delivery log shows "
        "the attempt with your endpoint's answer."
    )
    note = (
        f"{retries} Each attempt waits up to {duration_words(settings.http_timeout)} for "
        f"an answer. {shown}"
    )
    if settings.auto_disable_after is not None:
        note += (
            " A webhook whose deliveries keep failing, with none succeeding for "
            f"{duration_words(settings.auto_disable_after)}, is disabled; fix the endpoint, "
            "then enable the webhook again."
        )
    return note
