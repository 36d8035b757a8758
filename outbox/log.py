"""structlog set-up: JSON lines for machines, colours for a person at a terminal."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time
from typing import Any, TextIO

import structlog

__all__ = ["configure"]


class _LineWriter:
    """Writes rendered lines to a stream, those of one event-loop pass in one write.

    A busy dispatcher logs a line per attempt, and a write with a flush per line costs a
    system call per delivery. Lines logged inside a running event loop are written
    together as soon as the loop gets round to it (the same pass, or the next); lines
    logged anywhere else are written at once.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([message])
            return
        if not self._lines:
            loop.call_soon(self.flush)
        self._lines.append(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()


# A busy dispatcher logs a line per attempt, so the two steps every line takes are done
# here, more cheaply than structlog's own and in the same format (bench/README.md).


class _Stamp:
    """Adds ``timestamp`` in the format of TimeStamper(fmt="iso", utc=True), formatting
    the date and time once a second rather than building a datetime per line."""

    def __init__(self) -> None:
        self._cached = (-1, "")

    def __call__(self, logger: Any, name: str, event_dict: Any) -> Any:
        second, ns = divmod(time.time_ns(), 1_000_000_000)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        micro = ns // 1000
        # As datetime.isoformat(): no fraction at all on a whole second.
        event_dict["timestamp"] = f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"
        return event_dict


def _fallback(obj: Any) -> Any:
    """What JSON cannot hold, as structlog's JSONRenderer writes it."""
    structlog_repr = getattr(obj, "__structlog__", None)
    return structlog_repr() if callable(structlog_repr) else repr(obj)


# json.dumps with any keyword argument builds a new encoder per call, as structlog's
# JSONRenderer does (default=...); one encoder, made once, renders the same text.
_ENCODER = json.JSONEncoder(default=_fallback)


def _dumps(event_dict: Any, **_: Any) -> str:
    return _ENCODER.encode(event_dict)


def configure(fmt: str) -> None:
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        _Stamp(),
    ]
    # Libraries (psycopg_pool, aiohttp) log through the standard library: render their
    # lines the same way, so a JSON log stays all JSON.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    writer = _LineWriter(sys.stderr)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=True,
    )
