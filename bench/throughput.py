"""Section 1, throughput: `throughput_per_s`, `http_limit_per_s`, `pgqueuer_per_s` and
the two ratios.

A backlog of pending deliveries (20,000: 20,000 events, each to one of 100 webhooks) is
loaded through the real schema and drained by one `outbox run`; its references, in the
same run against the same receiver with 64 in flight and the same signed bodies, are a
bare aiohttp client with no database (the HTTP limit) and a pgqueuer worker (its batch
size picked by a sweep over 8, 16 and 32 first). Repetitions rotate the order of the
three. The details also give CPU µs per delivery of each, and of Postgres.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
from typing import Any

import psycopg

from bench.common import (
    CONCURRENCY,
    PROCS,
    PY,
    WEBHOOKS,
    cpu_seconds,
    peak_rss_mb,
    rate_of,
    rotate,
    run_command,
    say,
    stats,
)
from bench.harness import Bench
from bench.report import Row, get, median_of, met, spread
from bench.services import database

NAME = "throughput"
KEY = "throughput"


def http_limit(bench: Bench, count: int) -> dict[str, Any]:
    bench.receiver.reset()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = bench.http_client(
        "--count", str(count), "--concurrency", str(CONCURRENCY), "--webhooks", str(WEBHOOKS)
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    ids, times = bench.receiver.records()
    if len(ids) < count:
        raise RuntimeError(f"bare client: only {len(ids)} of {count} arrived")
    return {"rate": rate_of(times), "client_seconds": float(out.strip()), "cpu_s": cpu}


def pgqueuer_once(bench: Bench, count: int, batch: int, name: str) -> dict[str, Any]:
    """pgqueuer's worker on a backlog of `count` jobs loaded in a fresh database."""
    with database(bench.cluster, name) as url:
        run_command([PY, "-m", "bench.pgq_worker", "load", "--dsn", url, "--count", str(count)])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE pgqueuer")
        bench.cluster.checkpoint()
        return pgqueuer_drain(bench, url, count, batch, name)


def pgqueuer_drain(bench: Bench, url: str, count: int, batch: int, name: str) -> dict[str, Any]:
    """pgqueuer's worker drains the `count` jobs queued in `url`: the rate at the
    receiver, the worker's peak RSS and CPU, the CPU of Postgres."""
    bench.receiver.reset()
    db_cpu = bench.cluster.cpu_seconds()
    wal = bench.cluster.wal_lsn()
    log_path = bench.workdir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = PROCS.start(
            [
                PY,
                "-m",
                "bench.pgq_worker",
                "work",
                "--dsn",
                url,
                "--base",
                bench.receiver.base,
                "--ca",
                bench.receiver.ca,
                "--batch",
                str(batch),
                "--concurrency",
                str(CONCURRENCY),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        got = bench.receiver.wait_for(count, 120 + count / 200, alive=[proc], quiet_for=15)
        alive = proc.poll() is None
        rss = peak_rss_mb(proc.pid) if alive else float("nan")
        cpu = cpu_seconds(proc.pid) if alive else float("nan")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)  # drain mode: it exits once the queue is empty
        code = PROCS.stop(proc)
    _, times = bench.receiver.records()
    if got < count or code != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"pgqueuer: {got} of {count} arrived, exit {code}: {tail}")
    db_cpu = bench.cluster.cpu_seconds() - db_cpu
    wal = bench.cluster.wal_lsn() - wal
    return {
        "rate": rate_of(times),
        "rss_mb": rss,
        "cpu_s": cpu,
        "db_cpu_s": db_cpu,
        "wal_bytes": wal,
    }


def measure(bench: Bench) -> dict[str, Any]:
    n = bench.sizes.throughput
    say(f"1. throughput: {n} deliveries, 2 KB, signed, {WEBHOOKS} webhooks; no pinning")
    sweep: dict[int, float] = {}
    for batch in (8, 16, 32):
        sweep[batch] = pgqueuer_once(bench, n, batch, f"pgq_sweep_{batch}")["rate"]
        say(f"   pgqueuer batch {batch}: {sweep[batch]:,.0f}/s (batch-size sweep)")
    best = max(sweep, key=lambda b: sweep[b])
    bench.pgqueuer_batch = best
    outbox: list[float] = []
    limit: list[float] = []
    pgq: list[float] = []
    rss: list[float] = []
    cpu: list[float] = []
    db_cpu: list[float] = []
    pgq_cpu: list[float] = []
    pgq_db_cpu: list[float] = []
    client_cpu: list[float] = []
    checks = []
    for rep in range(bench.reps):
        for case in rotate(["outbox", "http", "pgqueuer"], rep):
            if case == "outbox":
                with database(bench.cluster, f"tp_outbox_{rep}") as url:
                    pending = bench.load_outbox(url, n)
                    assert pending == n, pending
                    r = bench.drain(url, n)
                    checks.append(bench.check_outbox(url))
                outbox.append(r["rate"])
                rss.extend(r["rss_mb"])
                cpu.append(r["cpu_s"][0] / n * 1e6)
                db_cpu.append(r["db_cpu_s"] / n * 1e6)
                say(f"   rep {rep + 1}: outbox run   {r['rate']:,.0f}/s")
            elif case == "http":
                r = http_limit(bench, n)
                limit.append(r["rate"])
                client_cpu.append(r["cpu_s"] / n * 1e6)
                say(f"   rep {rep + 1}: HTTP limit   {limit[-1]:,.0f}/s")
            else:
                r = pgqueuer_once(bench, n, best, f"tp_pgq_{rep}")
                pgq.append(r["rate"])
                pgq_cpu.append(r["cpu_s"] / n * 1e6)
                pgq_db_cpu.append(r["db_cpu_s"] / n * 1e6)
                say(f"   rep {rep + 1}: pgqueuer b{best} {pgq[-1]:,.0f}/s")
    return {
        "deliveries": n,
        "outbox_per_s": stats(outbox),
        "http_limit_per_s": stats(limit),
        "pgqueuer_per_s": stats(pgq),
        "pgqueuer_batch": best,
        "pgqueuer_batch_sweep": {str(b): r for b, r in sweep.items()},
        "ratio_vs_http_limit": stats([o / h for o, h in zip(outbox, limit, strict=True)]),
        "ratio_vs_pgqueuer": stats([o / p for o, p in zip(outbox, pgq, strict=True)]),
        "sidecar_rss_mb": stats(rss),
        "sidecar_cpu_us_per_delivery": stats(cpu),
        "postgres_cpu_us_per_delivery": stats(db_cpu),
        "http_client_cpu_us_per_request": stats(client_cpu),
        "pgqueuer_worker_cpu_us_per_delivery": stats(pgq_cpu),
        "pgqueuer_postgres_cpu_us_per_delivery": stats(pgq_db_cpu),
        "outbox_checks": checks,
    }


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    return {
        "throughput_per_s": median_of(get(details, KEY, "outbox_per_s")),
        "http_limit_per_s": median_of(get(details, KEY, "http_limit_per_s")),
        "pgqueuer_per_s": median_of(get(details, KEY, "pgqueuer_per_s")),
        "ratio_vs_http_limit": median_of(get(details, KEY, "ratio_vs_http_limit")),
        "ratio_vs_pgqueuer": median_of(get(details, KEY, "ratio_vs_pgqueuer")),
    }


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    tp = details[KEY]
    http = f"HTTP limit (bare aiohttp) {spread(tp['http_limit_per_s'])}"
    pgqueuer = f"pgqueuer asyncpg, batch {tp['pgqueuer_batch']}: {spread(tp['pgqueuer_per_s'])}"
    # The sidecar against each reference: figure, reference, the ratio's key, its target.
    references = (
        ("1 throughput, deliveries/s", http, "ratio_vs_http_limit", 0.8),
        ("1 throughput vs pgqueuer", pgqueuer, "ratio_vs_pgqueuer", 2),
    )
    return [
        (
            label,
            spread(tp["outbox_per_s"]),
            reference,
            spread(tp[ratio], 2),
            f"≥ {target:g}",
            met(summary[ratio], target, True),
        )
        for label, reference, ratio, target in references
    ]
