"""The sidecar's background parts: each kept running, and how the process ends.

Everything in `outbox run` that works by itself is a *part* started here: the
dispatcher's loop, recorder, listener and doorbell, the schema watch, the backlog
gauges and the event loop's lag watch, each under a name of its own. A part is an async
function that runs until the sidecar stops (it may then return) and calls
``parts.beat(name)`` whenever it has done a round of its work. To add one, start it in
``outbox.sidecar.run`` beside the others::

    parts.start("retention", lambda: retention.run(settings, parts))

What happens when a part raises:

- A lost database connection (``psycopg.OperationalError``) is logged as a warning and
  the part is started again after a pause: it waits for the database like the rest of
  the sidecar, and liveness does not suffer (readiness says whether the database answers).
- Any other exception is logged as an error with its traceback and the part is started
  again after a pause. A part that keeps failing, with no beat in between, for
  ``give_up_after`` seconds stops the sidecar: it stops claiming, finishes what is in
  flight, and the process exits 1, so that it is never a process that looks alive and
  delivers nothing.

The pause doubles from 0.1 s up to 5 s and starts over once the part beats. A part
started with ``beat_within`` must beat that often, or the sidecar is not alive
(``GET /healthz`` answers 503).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType

import psycopg
import structlog

__all__ = ["EXIT_FAILED", "EXIT_SCHEMA", "InjectedFault", "Supervisor", "parse_faults"]

log = structlog.get_logger("outbox.supervisor")

PAUSE_FIRST = 0.1
PAUSE_MAX = 5.0
# Exit statuses of `outbox run` besides 0 (stopped by a signal).
EXIT_FAILED = 1
EXIT_SCHEMA = 3


class InjectedFault(RuntimeError):
    """Raised at a part's start by OUTBOX_TEST_FAULTS (see parse_faults)."""


def parse_faults(raw: str) -> dict[str, int]:
    """``"listen=2,doorbell=1"``: those parts raise InjectedFault at their first starts.

    For tests only: the listener and the doorbell run no query that the database can be
    made to fail other than by dropping the connection, which is the case they already
    survive; this is how tests show that any other failure of theirs is survived too.
    """
    faults: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit():
            raise ValueError(f"OUTBOX_TEST_FAULTS: {item!r} is not PART=COUNT")
        faults[name.strip()] = int(count)
    return faults


class Supervisor:
    """Keeps the parts running; knows whether the sidecar is alive, and its exit status."""

    def __init__(
        self,
        *,
        give_up_after: float,
        faults: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self._give_up_after = give_up_after
        self._faults = dict(faults or {})
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._beats: dict[str, float] = {}
        self._beat_within: dict[str, float] = {}
        self._failing_since: dict[str, float] = {}

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def start(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        *,
        beat_within: float | None = None,
    ) -> asyncio.Task[None]:
        """Run ``run()`` as the part ``name`` until it returns or the sidecar gives up."""
        if name in self._tasks:
            # Beats and liveness go by name: a second part of the same name would keep
            # the first one alive with its own beats, however stuck the first were.
            raise ValueError(f"a part named {name!r} was already started")
        self._beats[name] = self._clock()
        if beat_within is not None:
            self._beat_within[name] = beat_within
        task = asyncio.create_task(self._keep(name, run), name=name)
        self._tasks[name] = task
        return task

    def beat(self, name: str) -> None:
        """The part has done a round of its work (or is in a wait it knows to be bounded)."""
        self._beats[name] = self._clock()
        self._failing_since.pop(name, None)

    def stop(self, code: int = 0) -> None:
        """Stop the sidecar; the first non-zero ``code`` becomes the exit status."""
        if code and not self.exit_code:
            self.exit_code = code
        self.stopping.set()

    def alive(self) -> bool:
        """Not going down for a failure, and every part that must beat has, in time.

        Stopping for a newer schema (EXIT_SCHEMA) is no failure: the process finishes
        what is in flight and then exits, or waits for its schema, alive."""
        if self.exit_code == EXIT_FAILED:
            return False
        now = self._clock()
        return all(
            now - self._beats[name] <= within
            for name, within in self._beat_within.items()
            if not self._tasks[name].done()
        )

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        pause = 0.0
        while True:
            started = self._clock()
            try:
                if self._faults.get(name, 0) > 0:
                    self._faults[name] -= 1
                    raise InjectedFault(f"{name}: fault injected by OUTBOX_TEST_FAULTS")
                await run()
                return
            except psycopg.OperationalError as exc:
                log.warning("database connection lost", part=name, error=str(exc))
            except Exception:
                since = self._failing_since.setdefault(name, started)
                log.exception("part failed; starting it again", part=name)
                if self._clock() - since >= self._give_up_after:
                    log.error(
                        "part keeps failing; stopping the sidecar",
                        part=name,
                        failing_for=round(self._clock() - since, 1),
                    )
                    self.stop(EXIT_FAILED)
                    return
            beaten = self._beats[name] >= started
            pause = PAUSE_FIRST if beaten else min(PAUSE_MAX, pause * 2 or PAUSE_FIRST)
            await asyncio.sleep(pause)
