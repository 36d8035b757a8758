"""The admin HTTP server (aiohttp.web). For now: the health check."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from outbox import db

__all__ = ["make_app"]

POOL = web.AppKey("pool", AsyncConnectionPool)


async def healthz(request: web.Request) -> web.Response:
    """200 while the database answers, 503 otherwise (no token needed)."""
    pool: AsyncConnectionPool[Any] = request.app[POOL]
    try:
        async with asyncio.timeout(2):
            async with pool.connection() as conn:
                await conn.execute(db.query("ping"))
    except (psycopg.Error, TimeoutError) as exc:
        return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


def make_app(pool: AsyncConnectionPool[Any]) -> web.Application:
    app = web.Application()
    app[POOL] = pool
    app.router.add_get("/healthz", healthz)
    return app
