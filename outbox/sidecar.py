"""`outbox run` and `outbox serve`: the dispatcher, the admin server, or both in one
process, until a signal.

`outbox run` is both. `outbox run --deliver-only` is the dispatcher, with a listener
that answers only the probes and /metrics; `outbox serve` is the admin API and the
settings page without deliveries, so that tenants' use of the page never competes with
delivery for the event loop (each mode is a Mode below)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from outbox import db, metrics, notify, retention, tracing
from outbox.config import ConfigError, Settings
from outbox.delivery import Sender
from outbox.dispatcher import Dispatcher
from outbox.supervisor import EXIT_SCHEMA, Supervisor
from outbox.web import api

__all__ = [
    "BOTH",
    "DELIVER_ONLY",
    "SERVE",
    "Mode",
    "check_schema",
    "read_schema_version",
    "run",
    "wait_for_schema",
    "watch_loop",
    "watch_schema",
]

log = structlog.get_logger("outbox")

# Connections open at once for the admin API's test sends, apart from the dispatcher's
# OUTBOX_CONCURRENCY: each account has at most one per webhook in flight (outbox.throttle),
# so this bounds only what many accounts testing at the same moment hold.
TEST_SEND_CONNECTIONS = 32
# How often the event loop's lag is sampled: a blocked loop shows as a late wake-up.
LAG_TICK = 0.05


@dataclass(frozen=True)
class Mode:
    """What one process runs: deliveries, the tenants' API and page, or both."""

    deliver: bool
    serve: bool


BOTH = Mode(deliver=True, serve=True)
DELIVER_ONLY = Mode(deliver=True, serve=False)
SERVE = Mode(deliver=False, serve=True)


def pool(settings: Settings, max_size: int = 4) -> AsyncConnectionPool[Any]:
    """Autocommit connections that come back by themselves after the database does."""
    return AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "application_name": "outbox", **settings.connect_options},
        # No check= callback: with it a pool whose connections were terminated can stall
        # for its whole timeout (a known psycopg_pool behaviour). A dead connection fails its query
        # instead, the pool discards it, and the caller retries on a fresh one.
        timeout=5.0,
        # Keep trying for as long as the database is away; the dispatcher waits.
        reconnect_timeout=float("inf"),
        open=False,
    )


async def check_schema(settings: Settings) -> None:
    """Raise SchemaMismatch unless the database has the schema this version runs against.

    Waits for a database that does not answer yet, as the dispatcher would.
    """
    problem = db.schema_problem(await read_schema_version(settings), db.expected_version())
    if problem is not None:
        raise db.SchemaMismatch(problem)


async def read_schema_version(settings: Settings) -> int | None:
    """The database's outbox schema version, once it answers; SchemaMismatch when this
    login may not read it."""
    pause = 0.1
    while True:
        try:
            async with await db.connect(settings.database_url, **settings.connect_options) as conn:
                found = await db.schema_version(conn)
            break
        except psycopg.OperationalError as exc:
            log.warning("database unavailable, retrying", error=str(exc), retry_in=pause)
            await asyncio.sleep(pause)
            pause = min(5.0, pause * 2)
        except psycopg.errors.InsufficientPrivilege:
            raise db.SchemaMismatch(
                "this login may not read outbox.schema_migrations: log in as a role granted"
                " outbox_sidecar (`outbox migrate` grants it what outbox run needs)"
            ) from None
    return found


async def watch_schema(settings: Settings, parts: Supervisor) -> None:
    """Stop the sidecar (exit 3) once the schema is no longer the one it knows: after
    `outbox migrate` of a newer version, a sidecar of this one may not keep claiming."""
    async with await db.connect(settings.database_url, **settings.connect_options) as conn:
        while True:
            # First after a pause: `run` has just checked it.
            await asyncio.sleep(settings.schema_check_interval)
            found = await db.schema_version(conn)
            if found != db.expected_version():
                log.error(
                    "the outbox schema changed: stopping, to be started again on a version"
                    " that knows it",
                    schema_version=found,
                    expected=db.expected_version(),
                )
                parts.stop(EXIT_SCHEMA)
                return
            parts.beat("schema")


async def run(settings: Settings, mode: Mode = BOTH) -> int:
    """The sidecar until it stops; returns the exit status (see outbox.supervisor).

    With OUTBOX_SCHEMA_MISMATCH=wait a schema this version does not know never ends the
    process (see wait_for_schema): where outbox runs in the app's own pod, a container
    that exits makes the app's pod unready until it runs again, and on a newer schema
    the same version would only exit again until the pod is rolled.
    """
    wait = settings.schema_mismatch == "wait"
    tracing.start()
    try:
        if not wait:
            # Exit 2 on a schema it does not know, before it listens.
            await check_schema(settings)
        async with _admin(settings, mode) as admin:
            while True:
                if wait and not await wait_for_schema(settings, admin):
                    return 0
                # The schema was checked above, or just now by the wait: a migrate that
                # comes after is the schema watch's to see.
                code = await _run(settings, mode, admin)
                if code != EXIT_SCHEMA or not wait:
                    return code
    finally:
        # The spans not sent yet, off the event loop (the exporter's requests block).
        await asyncio.to_thread(tracing.stop)


@dataclass(frozen=True)
class Admin:
    """The admin server of the process: its connection pool, and what it answers for."""

    pool: AsyncConnectionPool[Any]
    stage: api.Stage


@contextlib.asynccontextmanager
async def _admin(settings: Settings, mode: Mode) -> AsyncIterator[Admin | None]:
    """The admin server on OUTBOX_API_LISTEN (None if off): the probes and /metrics, and
    with ``mode.serve`` the API and the page.

    One for the life of the process, through its waits for a schema and the runs in
    between, each of which says what it answers for: a server each would close the port
    from one to the next, and the kubelet's probes would find it refused.
    """
    if settings.api_listen is None:
        yield None
        return
    async with contextlib.AsyncExitStack() as stack:
        # Only the admin server and the backlog gauges it serves use the pool; the
        # dispatcher has connections of its own.
        connections = await stack.enter_async_context(pool(settings))
        test_sender = None
        if mode.serve:
            test_sender = await stack.enter_async_context(
                Sender(settings, limit=TEST_SEND_CONNECTIONS)
            )
        stage = api.Stage()
        app = api.make_app(connections, settings, stage=stage, test_sender=test_sender)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        host, port = await _listen(runner, settings)
        log.info(
            "admin API listening" if mode.serve else "probes and metrics listening",
            url=f"http://{host}:{port}",
        )
        yield Admin(connections, stage)


async def wait_for_schema(settings: Settings, admin: Admin | None) -> bool:
    """Wait until the database has the schema this version runs against: True then,
    False if stopped by a signal first.

    Meanwhile the process delivers nothing and answers only ``/healthz`` (200: it is
    alive, and a restart would change nothing), ``/readyz`` (503) and ``/metrics``
    (``outbox_dispatcher_up`` 0, the backlog gauges 0), from the start, even while the
    database does not answer; it logs the problem each time it changes, and looks again
    every OUTBOX_SCHEMA_CHECK_INTERVAL: a migrate it was started before lets it go on, a
    newer version's migrate leaves it waiting to be replaced.
    """
    expected = db.expected_version()
    metrics.dispatcher_up(False)
    # Not read while waiting: 0, not a stale value that would hold an alert up for as
    # long as this waits (replicas that deliver report the real ones; the rules take
    # the max).
    metrics.pending(0, None, 0, None)
    parts = Supervisor(give_up_after=settings.lease_seconds)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, parts.stop)
    if admin is not None:
        admin.stage.wait(parts)
    said = None
    while True:
        # Reading waits for a database that does not answer: a signal ends that too.
        reading = asyncio.create_task(read_schema_version(settings))
        stopped = asyncio.create_task(parts.stopping.wait())
        await asyncio.wait((reading, stopped), return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not reading.done():
            reading.cancel()
            return False
        try:
            problem = db.schema_problem(reading.result(), expected)
        except db.SchemaMismatch as exc:
            problem = str(exc)
        if problem is None:
            break
        if problem != said:
            log.error(
                "waiting for the schema this version knows (OUTBOX_SCHEMA_MISMATCH=wait):"
                " delivering nothing",
                problem=problem,
            )
            said = problem
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.schema_check_interval):
                await parts.stopping.wait()
        if parts.stopping.is_set():
            return False
    if said is not None:
        log.info("the schema is the one this version knows: starting", schema_version=expected)
    return True


async def watch_loop(parts: Supervisor) -> None:
    """Measure how late the event loop wakes up (outbox_event_loop_lag_seconds): the
    longest any callback waited because something else held the loop."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_TICK
        await asyncio.sleep(LAG_TICK)
        metrics.loop_lag(max(0.0, loop.time() - due))
        parts.beat("lag")


async def _run(settings: Settings, mode: Mode, admin: Admin | None) -> int:
    # Every attempt allocates a few short-lived objects and no cycles to speak of: move
    # the start-up objects out of the collector's way and collect young objects rarely.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    # A part failing for as long as a lease: what it holds is being sent again anyway.
    parts = Supervisor(give_up_after=settings.lease_seconds, faults=dict(settings.test_faults))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, parts.stop)
    if admin is not None:
        admin.stage.run(parts)
    async with contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(Sender(settings)) if mode.deliver else None
        notifier = None
        if mode.deliver and settings.notify_url:
            notifier = await stack.enter_async_context(notify.sender(settings))
        # Its parts end first, before the pool and the sender they use are closed.
        await stack.enter_async_context(parts)
        parts.start("lag", lambda: watch_loop(parts))
        parts.start("schema", lambda: watch_schema(settings, parts))
        if settings.retention is not None:
            parts.start("retention", lambda: retention.run(settings, parts))
        if notifier is not None:
            parts.start("notify", lambda: notify.run(settings, notifier, parts))
        if admin is not None:
            parts.start("backlog", lambda: api.refresh_backlog(admin.pool, parts))
        try:
            if sender is not None:
                await Dispatcher(settings, sender, parts).run()
            else:
                await parts.stopping.wait()
        finally:
            metrics.dispatcher_up(False)
    return parts.exit_code


async def _listen(runner: web.AppRunner, settings: Settings) -> tuple[str, int]:
    """Serve ``runner`` on OUTBOX_API_LISTEN; an address in use is a bad setting."""
    assert settings.api_listen is not None
    host, port = settings.api_listen
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise ConfigError(
            f"OUTBOX_API_LISTEN={host}:{port}: cannot listen there ({exc.strerror})"
        ) from None
    return host, port
