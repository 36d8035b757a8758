"""The JSON log: one object per line, the shape `OUTBOX_LOG_FORMAT=json` promises."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from outbox import log
from outbox.log import configure


@pytest.fixture
def json_log(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """configure("json") as `outbox` does, writing to capsys; undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield capsys
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


class Unusual:
    def __repr__(self) -> str:
        return "<unusual>"


class Described:
    def __structlog__(self) -> str:
        return "described"


def test_a_line_is_a_json_object_with_level_and_a_utc_timestamp(
    json_log: pytest.CaptureFixture[str],
) -> None:
    configure("json")  # here, where capsys holds stderr (not in the fixture's setup)
    before = datetime.now(UTC)
    structlog.get_logger("t").info(
        "attempt", delivery_id=7, error=None, odd=Unusual(), own=Described()
    )
    after = datetime.now(UTC)
    (line,) = lines(json_log)
    stamp = line.pop("timestamp")
    assert line == {
        "event": "attempt",
        "delivery_id": 7,
        "error": None,
        "odd": "<unusual>",
        "own": "described",
        "level": "info",
    }
    # The format of structlog's TimeStamper(fmt="iso", utc=True), to the microsecond.
    assert isinstance(stamp, str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - timedelta(microseconds=1) <= at <= after


def test_library_lines_are_json_too(json_log: pytest.CaptureFixture[str]) -> None:
    configure("json")
    logging.getLogger("aiohttp.client").warning("something %s", "odd")
    (line,) = lines(json_log)
    assert line["event"] == "something odd"
    assert line["level"] == "warning"
    assert isinstance(line["timestamp"], str) and line["timestamp"].endswith("Z")


def test_the_stamp_is_right_across_second_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The date and time are formatted once a second and reused: each line must still
    carry its own second, as datetime.isoformat() would write it (TimeStamper's way)."""
    base = int(datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC).timestamp())
    instants = [
        (base, 999_999_999),  # the last microsecond of a second
        (base + 1, 0),  # a whole second: isoformat() writes no fraction
        (base + 1, 1_000),
        (base + 1, 123_456_789),  # nanoseconds are cut, not rounded
        (base + 2, 500_000_000),  # into the next year
        (base + 1, 7_000),  # the clock stepped back
    ]
    stamp = log._Stamp()
    for second, ns in instants:
        monkeypatch.setattr(log.time, "time_ns", lambda s=second, n=ns: s * 10**9 + n)
        expected = datetime.fromtimestamp(second, UTC).replace(microsecond=ns // 1000)
        got = stamp(None, "info", {})["timestamp"]
        assert got == expected.isoformat().replace("+00:00", "Z")
