"""The HTTP limit: a bare aiohttp client, no database, POSTing the same signed bodies.

    python -m bench.http_client --base https://127.0.0.1:PORT --ca CA --count N

Same event loop (asyncio's default), same aiohttp connector settings, same concurrency
and the same bodies and headers (built and signed by outbox.wire per request, as the
dispatcher does) as `outbox run`; only the queue is missing. Prints the seconds spent.

With ``--sequential PATH`` it instead sends the requests one at a time, ``--interval``
seconds apart, on one warm connection, and writes each request's start time
(``time.time()``) to ``PATH.t`` (float64, in X-Webhook-Id order 1..N): the HTTP part of
a commit-to-receipt latency, the floor the latency figures are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time
from array import array

import aiohttp

from bench import payloads


async def post_all(base: str, ca: str, count: int, concurrency: int, webhooks: int) -> float:
    context = ssl.create_default_context()
    context.load_verify_locations(ca)
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    next_seq = iter(range(1, count + 1))
    failures = 0

    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=10),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    ) as session:

        async def worker() -> None:
            nonlocal failures
            for seq in next_seq:
                body = payloads.body(seq)
                headers = payloads.headers(seq, body)
                url = f"{base}/hook/{seq % webhooks}"
                async with session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.content.read(64 * 1024)
                    if response.status != 200:
                        failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{failures} requests failed")
    return elapsed


async def post_sequential(base: str, ca: str, count: int, interval: float, out: str) -> None:
    context = ssl.create_default_context()
    context.load_verify_locations(ca)
    starts: array[float] = array("d")
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=1),
        timeout=aiohttp.ClientTimeout(total=10),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    ) as session:
        for seq in range(0, count + 1):
            # seq 0 only opens the connection; it is not counted.
            start = time.time()
            body = payloads.body(seq)
            headers = payloads.headers(seq, body, now=start)
            async with session.post(f"{base}/hook/0", data=body, headers=headers) as response:
                await response.content.read(64 * 1024)
            if seq:
                starts.append(start)
            await asyncio.sleep(interval)
    with open(out + ".t", "wb") as f:
        starts.tofile(f)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_client")
    parser.add_argument("--base", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--webhooks", type=int, default=100)
    parser.add_argument("--sequential", metavar="PATH")
    parser.add_argument("--interval", type=float, default=0.005)
    args = parser.parse_args()
    if args.sequential:
        asyncio.run(post_sequential(args.base, args.ca, args.count, args.interval, args.sequential))
        return
    # Build the payload pool before the clock starts, as the others have theirs in Postgres.
    payloads.pool_rows()
    elapsed = asyncio.run(post_all(args.base, args.ca, args.count, args.concurrency, args.webhooks))
    print(f"{elapsed:.6f}")


if __name__ == "__main__":
    main()
