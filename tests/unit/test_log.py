"""The JSON log: one object per line, the shape `OUTBOX_LOG_FORMAT=json` promises."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

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


def test_a_line_is_a_json_object_with_level_and_a_utc_timestamp(
    json_log: pytest.CaptureFixture[str],
) -> None:
    configure("json")  # here, where capsys holds stderr (not in the fixture's setup)
    before = datetime.now(UTC)
    structlog.get_logger("t").info("attempt", delivery_id=7, error=None, odd=Unusual())
    after = datetime.now(UTC)
    (line,) = lines(json_log)
    stamp = line.pop("timestamp")
    assert line == {
        "event": "attempt",
        "delivery_id": 7,
        "error": None,
        "odd": "<unusual>",
        "level": "info",
    }
    # As structlog's TimeStamper(fmt="iso", utc=True) writes it, to the microsecond.
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
