"""Section 8, rendering one event: `render_worst_ms` beside the 2 KB event.

    .venv/bin/python -m bench.run --only render

The sidecar renders an event's body on its one event loop, for every attempt and for
every delivery the log shows, so a slow render of one tenant's event stalls every
tenant. This section times `outbox.wire.payload` in each format for the bench's 2 KB
event and for events at the size limit (262,144 bytes of data) shaped to be the worst
case: one huge string where a name is read, text full of characters that each need
escaping or cleaning, and characters outside the BMP. Each figure is the median of
REPEATS renders; `render_worst_ms` is the largest over shapes and formats, next to the
2 KB event's. The target is a few milliseconds (one render may not block the loop for
anything like the 100 ms a tenant must never stall others for). No database.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from bench import payloads
from bench.common import say
from bench.harness import Bench
from bench.report import Row, get, met, num
from outbox import formats, wire

NAME = "render"
KEY = "render"

LIMIT = 262_144
REPEATS = 21
TARGET_MS = 5.0
TIMESTAMP = "2026-11-27T12:34:56.789Z"


def _fill(unit: str, key_path: tuple[str, ...]) -> str:
    """The data object with one string at ``key_path`` as long as the limit allows."""

    def build(count: int) -> str:
        value: Any = unit * count
        for key in reversed(key_path):
            value = {key: value}
        return json.dumps(value, ensure_ascii=False)

    count = LIMIT // len(unit.encode())
    while len(build(count).encode()) > LIMIT:
        count -= max(1, count // 100)
    return build(count)


def shapes() -> dict[str, tuple[str, str]]:
    """(event, data) by name: the 2 KB event, then the worst cases at the limit."""
    return {
        "2 KB event": (payloads.EVENT, payloads.data_json(1)),
        "a name of 256 KiB": ("lead.scored", _fill("x", ("lead", "name"))),
        "a reply of escapes": ("reply.received", _fill("<&>*_@\x01\u2028 ", ("reply", "text"))),
        "a reply of emoji": ("reply.received", _fill("é😀", ("reply", "text"))),
    }


def _time(fmt: str, event: str, data: str) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        wire.payload(fmt, event, TIMESTAMP, data)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(bench: Bench) -> dict[str, Any]:
    say("8. rendering one event, in each format")
    results: dict[str, dict[str, float]] = {}
    for name, (event, data) in shapes().items():
        results[name] = {fmt: _time(fmt, event, data) for fmt in formats.FORMATS}
    worst = max(ms for name, row in results.items() if name != "2 KB event" for ms in row.values())
    base = max(results["2 KB event"].values())
    return {"ms": results, "worst_ms": worst, "base_ms": base, "repeats": REPEATS}


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    return {"render_worst_ms": get(details, KEY, "worst_ms")}


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    render = details[KEY]
    worst, base = render["worst_ms"], render["base_ms"]
    return [
        (
            "8 render at the size limit, worst ms",
            num(worst, 2),
            f"2 KB event {num(base, 2)} ms",
            f"{worst / base:.1f}" if base else "",
            f"<= {TARGET_MS:g} ms",
            met(worst, TARGET_MS, at_least=False),
        )
    ]
