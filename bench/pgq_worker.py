"""The pgqueuer reference: the same webhooks delivered from pgqueuer's own queue.

    python -m bench.pgq_worker install --dsn DSN
    python -m bench.pgq_worker load --dsn DSN --count N [--webhooks 100]
    python -m bench.pgq_worker work --dsn DSN --base URL --ca CA --batch B [--concurrency 64]
    python -m bench.pgq_worker enqueue-script   # one job per transaction, for pgbench

pgqueuer 1.6 with its asyncpg driver (its fast one: with its psycopg driver every
query waits on the listener). A job's
payload is the event's body (the same ~2 KB as the outbox's), its headers name the
webhook; the job signs the body with the webhook's secret and POSTs it with the same
aiohttp settings, asyncio loop and concurrency as `outbox run` (pgqueuer's
``max_concurrent_tasks`` and the connector's limit). `work` drains the queue and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import ssl
from datetime import timedelta

import aiohttp
import asyncpg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.adapters.persistence.qb import QueryQueueBuilder
from pgqueuer.domain.types import QueueExecutionMode

from bench import payloads

ENTRYPOINT = "webhook"

# `Queries.enqueue` binds one array per column ($1 priorities, $2 entrypoints, ...); one
# job from pgbench is one-element arrays of its variables: :job the body, :aid the webhook.
ONE_JOB = {
    1: "ARRAY[0]",
    2: f"ARRAY['{ENTRYPOINT}']",
    3: "ARRAY[convert_to(:job, 'UTF8')]",
    4: "ARRAY['0 s'::interval]",
    5: "ARRAY[NULL::text]",
    6: "ARRAY[jsonb_build_object('webhook', :aid::text)]",
}


def enqueue_script() -> str:
    """A pgbench script that enqueues one job per transaction with pgqueuer's own
    statement (its query builder's, as `Queries.enqueue` sends it), for webhook :aid."""
    sql = QueryQueueBuilder().build_enqueue_query()

    def one(match: re.Match[str]) -> str:
        return f"{ONE_JOB[int(match.group(1))]}::{match.group(2)}[]"

    script, found = re.subn(r"\$(\d)::(\w+)\[\]", one, sql)
    if found != len(ONE_JOB) or "$" in script:
        raise RuntimeError(f"pgqueuer's enqueue statement has other parameters now: {sql}")
    return "\\set aid random(0, 99)\n" + script.strip() + ";\n"


async def install(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def load(dsn: str, count: int, webhooks: int, chunk: int = 5000) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        for first in range(1, count + 1, chunk):
            seqs = range(first, min(first + chunk, count + 1))
            await queries.enqueue(
                [ENTRYPOINT] * len(seqs),
                [payloads.body(s) for s in seqs],
                [0] * len(seqs),
                headers=[{"webhook": str(s % webhooks)} for s in seqs],
            )
    finally:
        await conn.close()


async def work(dsn: str, base: str, ca: str, batch: int, concurrency: int) -> None:
    context = ssl.create_default_context()
    context.load_verify_locations(ca)
    conn = await asyncpg.connect(dsn)
    failures = 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=10),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    ) as session:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint(ENTRYPOINT)
        async def deliver(job: Job) -> None:
            nonlocal failures
            assert job.payload is not None and job.headers is not None
            body = job.payload
            headers = payloads.headers(job.id, body, attempt=job.attempts + 1)
            url = f"{base}/hook/{job.headers['webhook']}"
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                await response.content.read(64 * 1024)
                if response.status != 200:
                    failures += 1

        await qm.run(
            batch_size=batch,
            mode=QueueExecutionMode.drain,
            max_concurrent_tasks=concurrency,
            dequeue_timeout=timedelta(seconds=1),
        )
    await conn.close()
    if failures:
        raise SystemExit(f"{failures} requests failed")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pgq_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install")
    p.add_argument("--dsn", required=True)
    p = sub.add_parser("load")
    p.add_argument("--dsn", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--webhooks", type=int, default=100)
    p = sub.add_parser("work")
    p.add_argument("--dsn", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    sub.add_parser("enqueue-script")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.command == "install":
        asyncio.run(install(args.dsn))
    elif args.command == "enqueue-script":
        print(enqueue_script(), end="")
    elif args.command == "load":
        asyncio.run(load(args.dsn, args.count, args.webhooks))
    else:
        asyncio.run(work(args.dsn, args.base, args.ca, args.batch, args.concurrency))


if __name__ == "__main__":
    main()
