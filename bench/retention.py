"""Retention under load: pruning a million old deliveries while producers commit.

    .venv/bin/python -m bench.retention [--deliveries 1000000] [--rate 200] [--keep]

A private cluster (as `make bench`) holds DELIVERIES finished deliveries (one attempt
each) older than the retention, on DELIVERIES / 10 events, loaded with generate_series.
pgbench producers commit one outbox INSERT per transaction at RATE a second (8 clients,
Poisson arrivals, a 2 KB event fanned out to one webhook), in 10 s runs, while
`retention.prune` (the sidecar's own round) deletes the backlog, let run for
GATE_SECONDS and paused for GATE_SECONDS by turns (the bench holds the pruners'
advisory lock, which the round waits for before each batch).

Reported: the producers' commit latency (pgbench's per-transaction time, schedule lag
included) p50/p99/max of the transactions that ended while pruning ran, and of those
that ended while it was paused (from SETTLE_SECONDS into a pause, so the batch in
flight is not counted as "alone"); the ratio of the p99s (target <= 1.2); the longest
prune statement (target <= 1 s), how many there were, and what they deleted. JSON in
bench/results/retention-<stamp>.json; a markdown row on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import glob
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import payloads
from bench.run import (
    PROCS,
    RESULTS_DIR,
    Cluster,
    _loadavg,
    find_pgbench,
    percentile,
    run,
    say,
)
from outbox import db, retention

RETENTION = 30 * 86400.0
CLIENTS = 8
CHUNK_SECONDS = 10
# Pruning is let run and paused by turns, so that both samples share the machine's
# load as it drifts (other work on a shared box moves a p99 more than anything here).
GATE_SECONDS = 5.0
# A pause counts as "alone" from this long after it began.
SETTLE_SECONDS = 0.5
PRODUCER_SCRIPT = """INSERT INTO outbox.events (account_id, event, data)
    VALUES ('acct_0', 'lead.scored', :data);
"""

LOAD_SQL = (
    """
INSERT INTO outbox.events (account_id, event, data, occurred_at)
SELECT 'old', 'lead.scored', '{"lead": {"id": 1}}', now() - interval '60 days'
FROM generate_series(1, %(events)s)
""",
    """
INSERT INTO outbox.deliveries
    (event_id, webhook_id, status, attempts, next_attempt_at, created_at, finished_at,
     last_response_status)
SELECT e.first + (g %% %(events)s), %(webhook)s, 'succeeded', 1,
       now() - interval '40 days', now() - interval '40 days',
       now() - interval '40 days' + g * interval '1 ms', 200
FROM generate_series(1, %(deliveries)s) g,
     (SELECT min(id) AS first FROM outbox.events) e
""",
    """
INSERT INTO outbox.delivery_attempts
    (delivery_id, attempt, started_at, duration_ms, response_status)
SELECT id, 1, finished_at, 50, 200 FROM outbox.deliveries
""",
)


def _pgbench_latencies(prefix: Path) -> list[tuple[float, float]]:
    """(end time, latency ms) of every transaction in `pgbench -l` logs.

    Log lines: client_id transaction_no time script_no time_epoch time_us [schedule_lag];
    `time` (us) is the transaction's latency, counted from its scheduled start under -R.
    """
    found = []
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as f:
            for line in f:
                fields = line.split()
                found.append((int(fields[4]) + int(fields[5]) / 1e6, int(fields[2]) / 1000))
    return found


def producers(cluster: Cluster, dbname: str, workdir: Path, name: str, rate: int) -> list[Any]:
    """One CHUNK_SECONDS run of the producers; (end time, latency ms) per transaction."""
    assert cluster.server is not None
    server = cluster.server
    script = workdir / "producer.sql"
    script.write_text(PRODUCER_SCRIPT)
    prefix = workdir / name
    cmd = [find_pgbench(), "-n", "-M", "prepared", "-c", str(CLIENTS), "-j", "2"]
    cmd += ["-T", str(CHUNK_SECONDS), "-R", str(rate), "-f", str(script)]
    cmd += ["-l", f"--log-prefix={prefix}", "-D", f"data={payloads.data_json(42)}"]
    cmd += ["-h", server.host, "-p", str(server.port), "-U", server.user, dbname]
    run(cmd, timeout=CHUNK_SECONDS + 60)
    return _pgbench_latencies(prefix)


def summary(latencies: list[float]) -> dict[str, Any]:
    latencies = sorted(latencies)
    return {
        "transactions": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__)
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=200, help="producer commits per second")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-retention-"))
    cluster = Cluster(workdir / "pgdata")
    try:
        say(f"work directory {workdir}; starting a private PostgreSQL cluster")
        cluster.start()
        dbname = "retention"
        with cluster.admin() as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        url = cluster.url(dbname)
        asyncio.run(db.migrate(url))
        events = max(1, args.deliveries // 10)
        say(f"loading {args.deliveries:,} finished deliveries on {events:,} events")
        t0 = time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO outbox.webhooks (account_id, name, url, event)"
                " VALUES ('acct_0', 'bench', 'https://127.0.0.1:9/hook', 'lead.scored')"
                " RETURNING id"
            ).fetchone()
            assert row is not None
            params = {"events": events, "deliveries": args.deliveries, "webhook": row[0]}
            for statement in LOAD_SQL:
                conn.execute(statement, params)
            conn.execute("VACUUM ANALYZE")
        cluster.checkpoint()
        load_seconds = time.monotonic() - t0
        say(f"   loaded in {load_seconds:.0f} s")

        say(
            f"producers at {args.rate}/s; pruning on and off by turns, {GATE_SECONDS:g} s each,"
            " until the backlog is gone"
        )
        outcome: dict[str, Any] = {}
        # (start, end) of each period when pruning was let run.
        periods: list[tuple[float, float]] = []
        stopped = threading.Event()

        def prune() -> None:
            async def go() -> retention.Pruned:
                async with await db.connect(url) as conn:
                    return await retention.prune(conn, RETENTION, wait=True)

            outcome["start"] = time.time()
            try:
                outcome["pruned"] = asyncio.run(go())
            except BaseException as exc:
                outcome["error"] = repr(exc)
            outcome["end"] = time.time()
            stopped.set()

        def gate() -> None:
            """Pause the pruner by holding the pruners' lock (it waits for its turn
            before each batch), and let it run, by turns."""
            with psycopg.connect(url) as conn:
                while not stopped.is_set():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (retention.LOCK,))
                    stopped.wait(GATE_SECONDS)
                    conn.commit()
                    opened = time.time()
                    stopped.wait(GATE_SECONDS)
                    periods.append((opened, time.time()))

        gatekeeper = threading.Thread(target=gate)
        gatekeeper.start()
        time.sleep(0.5)
        pruner = threading.Thread(target=prune)
        pruner.start()
        transactions: list[tuple[float, float]] = []
        n = 0
        while pruner.is_alive():
            transactions += producers(cluster, dbname, workdir, f"chunk{n}", args.rate)
            n += 1
        pruner.join()
        gatekeeper.join()
        if "error" in outcome:
            raise RuntimeError(f"prune failed: {outcome['error']}")
        pruned: retention.Pruned = outcome["pruned"]

        def pruning_at(t: float) -> bool | None:
            """Whether pruning ran when a transaction ended; None just after it was
            paused (the batch then in flight finishes), and after it was done."""
            if t > outcome["end"]:
                return None
            for opened, closed in periods:
                if opened <= t <= closed:
                    return True
                if closed < t <= closed + SETTLE_SECONDS:
                    return None
            return False

        alone = [lat for end, lat in transactions if pruning_at(end) is False]
        window = [lat for end, lat in transactions if pruning_at(end) is True]
        with psycopg.connect(url, autocommit=True) as conn:
            left = conn.execute(
                "SELECT count(*) FROM outbox.deliveries WHERE status <> 'pending'"
            ).fetchone()

        base = summary(alone)
        pruning = summary(window)
        ratio = pruning["p99_ms"] / base["p99_ms"]
        result = {
            "date": stamp,
            "postgres": cluster.setting("server_version"),
            "loadavg_end": _loadavg(),
            "deliveries_loaded": args.deliveries,
            "events_loaded": events,
            "load_seconds": round(load_seconds, 1),
            "producer_rate": args.rate,
            "producers_alone": base,
            "producers_while_pruning": pruning,
            "p99_ratio": round(ratio, 3),
            "prune": {
                "seconds_running": round(sum(b - a for a, b in periods), 1),
                "statements": pruned.statements,
                "longest_statement_ms": round(pruned.longest_seconds * 1000, 1),
                "deliveries": pruned.deliveries,
                "attempts": pruned.attempts,
                "events": pruned.events,
                "finished_left": int(left[0]) if left else None,
            },
            "targets": {
                "p99_ratio_at_most_1.2": ratio <= 1.2,
                "longest_statement_at_most_1s": pruned.longest_seconds <= 1.0,
            },
        }
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"retention-{stamp.replace(':', '')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print()
        print(
            "| date | backlog | prune | longest statement | producers p99 alone | "
            "p99 while pruning | ratio |"
        )
        print("|---|---|---|---|---|---|---|")
        p = result["prune"]
        print(
            f"| {stamp} | {args.deliveries:,} deliveries, {args.deliveries:,} attempts,"
            f" {events:,} events | {p['seconds_running']} s, {p['statements']} statements"
            f" | {p['longest_statement_ms']} ms | {base['p99_ms']} ms"
            f" | {pruning['p99_ms']} ms | {ratio:.2f}x |"
        )
        say(f"wrote {path}")
        return 0
    finally:
        PROCS.cleanup()
        try:
            cluster.stop()
        except Exception as exc:
            say(f"could not stop the private cluster: {exc}")
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
