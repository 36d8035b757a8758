"""`outbox run`: the dispatcher and the admin server in one process, until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from typing import Any

import structlog
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from outbox import api, metrics
from outbox.config import Settings
from outbox.delivery import Sender
from outbox.dispatcher import Dispatcher

__all__ = ["run"]

log = structlog.get_logger("outbox")

# Connections open at once for the admin API's test sends, apart from the dispatcher's
# OUTBOX_CONCURRENCY: each account has at most one per webhook in flight (outbox.throttle),
# so this bounds only what many accounts testing at the same moment hold.
TEST_SEND_CONNECTIONS = 32


def pool(settings: Settings, max_size: int = 4) -> AsyncConnectionPool[Any]:
    """Autocommit connections that come back by themselves after the database does."""
    return AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "application_name": "outbox"},
        # No check= callback: with it a pool whose connections were terminated can stall
        # for its whole timeout (psycopg issue #1123). A dead connection fails its query
        # instead, the pool discards it, and the caller retries on a fresh one.
        timeout=5.0,
        # Keep trying for as long as the database is away; the dispatcher waits.
        reconnect_timeout=float("inf"),
        open=False,
    )


async def run(settings: Settings) -> None:
    # Every attempt allocates a few short-lived objects and no cycles to speak of: move
    # the start-up objects out of the collector's way and collect young objects rarely.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(Sender(settings))
        runner = None
        if settings.api_listen is not None:
            # Only the admin API uses the pool; the dispatcher has connections of its own.
            connections = await stack.enter_async_context(pool(settings))
            test_sender = await stack.enter_async_context(
                Sender(settings, limit=TEST_SEND_CONNECTIONS)
            )
            runner = web.AppRunner(
                api.make_app(connections, test_sender, settings.public_url), access_log=None
            )
            await runner.setup()
            host, port = settings.api_listen
            await web.TCPSite(runner, host, port).start()
            log.info("admin API listening", url=f"http://{host}:{port}")
        try:
            await Dispatcher(settings, sender).run(stop)
        finally:
            metrics.dispatcher_up(False)
            if runner is not None:
                await runner.cleanup()
