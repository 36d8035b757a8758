"""Section 6, retention under load: `retention_p99_ratio`, `retention_longest_statement_ms`.

    .venv/bin/python -m bench.retention     # this section alone (= bench.run --only retention)

A copy of the template gets a backlog of `Sizes.retention_backlog` finished deliveries
(one attempt each) older than the retention, on a tenth as many events, loaded with
generate_series. pgbench producers commit one outbox INSERT per transaction at 200 a
second (8 clients, Poisson arrivals, the 2 KB event, fanned out to acct_0's webhook; no
sidecar), in 10 s runs, while `outbox.retention.prune` (the sidecar's own round) deletes
the backlog. Pruning is let run for GATE_SECONDS and paused for GATE_SECONDS by turns:
the bench holds the pruners' lock (a row of outbox.locks), which the round tries before each
batch. Turns, rather than a run without pruning before or after, put both samples under
the same load of the (shared) machine as it drifts.

Figures: the producers' commit latency (pgbench's per-transaction time, schedule lag
included) p50/p99/max over the transactions that ended while pruning ran, and over
those that ended while it was paused (from SETTLE_SECONDS into a pause: the batch in
flight when it began is not counted as "alone"); `retention_p99_ratio` is the first
p99 over the second (target <= 1.2). `retention_longest_statement_ms` is the longest
batch statement, as the pruner timed it (target <= 1 s). One repetition (for time; the
JSON says so), Postgres not pinned.
"""

from __future__ import annotations

import asyncio
import glob
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import percentile, say, stats
from bench.harness import Bench
from bench.report import Row, get, met, num, spread
from bench.services import database
from outbox import db, retention

NAME = "retention"
KEY = "retention"

RETENTION = 30 * 86400.0
RATE = 200
CLIENTS = 8
CHUNK_SECONDS = 10
GATE_SECONDS = 5.0
SETTLE_SECONDS = 0.5
PRODUCER_SCRIPT = """INSERT INTO outbox.events (account_id, event, data)
    VALUES ('acct_0', 'lead.scored', :data);
"""

# (%% is psycopg's escape for the modulo operator.)
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
SELECT e.first + (g %% %(events)s), w.id, 'succeeded', 1,
       now() - interval '40 days', now() - interval '40 days',
       now() - interval '40 days' + g * interval '1 ms', 200
FROM generate_series(1, %(deliveries)s) g,
     (SELECT min(id) AS first FROM outbox.events WHERE account_id = 'old') e,
     (SELECT id FROM outbox.webhooks WHERE account_id = 'acct_0') w
""",
    """
INSERT INTO outbox.delivery_attempts
    (delivery_id, attempt, started_at, duration_ms, response_status)
SELECT id, 1, finished_at, 50, 200 FROM outbox.deliveries
""",
)


def _latencies(prefix: Path) -> list[tuple[float, float]]:
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


def _latency(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    return {
        "transactions": len(values),
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "p99_ms": percentile(values, 99),
        "max_ms": values[-1] if values else None,
    }


def measure(bench: Bench) -> dict[str, Any]:
    backlog = bench.sizes.retention_backlog
    events = max(1, backlog // 10)
    say(
        f"6. retention: producers at {RATE}/s while {backlog:,} old deliveries are pruned,"
        f" pruning on and off by turns ({GATE_SECONDS:g} s)"
    )
    script = bench.workdir / "retention_producer.sql"
    script.write_text(PRODUCER_SCRIPT)
    name = "retention"
    with database(bench.cluster, name) as url:
        start = time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in LOAD_SQL:
                conn.execute(statement, {"events": events, "deliveries": backlog})
            conn.execute("VACUUM ANALYZE")
        bench.cluster.checkpoint()
        load_s = time.monotonic() - start
        say(f"   {backlog:,} deliveries and attempts, {events:,} events loaded in {load_s:.0f} s")

        outcome: dict[str, Any] = {}
        periods: list[tuple[float, float]] = []  # when pruning was let run
        done = threading.Event()

        def prune() -> None:
            async def go() -> retention.Pruned:
                async with await db.connect(url) as conn:
                    return await retention.prune(conn, RETENTION, wait=3600.0)

            try:
                outcome["pruned"] = asyncio.run(go())
            except BaseException as exc:
                outcome["error"] = repr(exc)
            outcome["end"] = time.time()
            done.set()

        def gate() -> None:
            with psycopg.connect(url) as conn:
                while not done.is_set():
                    conn.execute("SELECT FROM outbox.locks WHERE name = 'prune' FOR UPDATE")
                    done.wait(GATE_SECONDS)
                    conn.commit()
                    opened = time.time()
                    done.wait(GATE_SECONDS)
                    periods.append((opened, time.time()))

        gatekeeper = threading.Thread(target=gate)
        gatekeeper.start()
        time.sleep(0.5)
        pruner = threading.Thread(target=prune)
        pruner.start()
        transactions: list[tuple[float, float]] = []
        chunk = 0
        try:
            while pruner.is_alive():
                prefix = bench.workdir / f"retention_{chunk}"
                bench.pgbench(
                    name,
                    script,
                    CLIENTS,
                    CHUNK_SECONDS,
                    "-R",
                    str(RATE),
                    "-l",
                    f"--log-prefix={prefix}",
                )
                transactions += _latencies(prefix)
                chunk += 1
        finally:
            pruner.join()
            gatekeeper.join()
        if "error" in outcome:
            raise RuntimeError(f"prune failed: {outcome['error']}")
        pruned: retention.Pruned = outcome["pruned"]
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM outbox.deliveries WHERE status <> 'pending'"
            ).fetchone()

    def pruning_at(t: float) -> bool | None:
        """Whether pruning ran when a transaction ended; None just after a pause began
        (the batch then in flight finishes), and once pruning was done."""
        if t > outcome["end"]:
            return None
        for opened, closed in periods:
            if opened <= t <= closed:
                return True
            if closed < t <= closed + SETTLE_SECONDS:
                return None
        return False

    alone = _latency([lat for end, lat in transactions if pruning_at(end) is False])
    pruning = _latency([lat for end, lat in transactions if pruning_at(end) is True])
    ratio = pruning["p99_ms"] / alone["p99_ms"]
    say(
        f"   producers' p99 {pruning['p99_ms']:.1f} ms pruning, {alone['p99_ms']:.1f} ms"
        f" paused ({ratio:.2f}x); longest statement {pruned.longest_seconds * 1000:.0f} ms"
        f" of {pruned.statements}"
    )
    return {
        "backlog_deliveries": backlog,
        "backlog_attempts": backlog,
        "backlog_events": events,
        "load_s": load_s,
        "producer_rate": RATE,
        "producers_pruning": pruning,
        "producers_paused": alone,
        "p99_ratio": ratio,
        "pruning_s": sum(b - a for a, b in periods),
        "statements": pruned.statements,
        "longest_statement_ms": stats([pruned.longest_seconds * 1000]),
        "deleted": {
            "deliveries": pruned.deliveries,
            "attempts": pruned.attempts,
            "events": pruned.events,
        },
        "finished_left": int(row[0]) if row else None,
        "repetitions": 1,
    }


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    longest = get(details, KEY, "longest_statement_ms")
    return {
        "retention_p99_ratio": get(details, KEY, "p99_ratio"),
        "retention_longest_statement_ms": longest["median"] if longest else None,
    }


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    r = details[KEY]
    return [
        (
            f"6 producers' commit p99 at {r['producer_rate']}/s while pruning"
            f" {r['backlog_deliveries']:,} deliveries, ms",
            num(r["producers_pruning"]["p99_ms"], 1),
            f"paused {num(r['producers_paused']['p99_ms'], 1)}",
            num(r["p99_ratio"], 2),
            "≤ 1.2",
            met(r["p99_ratio"], 1.2, False),
        ),
        (
            f"6 longest prune statement ({r['statements']} in {r['pruning_s']:.0f} s), ms",
            spread(r["longest_statement_ms"]),
            "",
            "",
            "≤ 1000",
            met(r["longest_statement_ms"]["median"], 1000, False),
        ),
    ]


if __name__ == "__main__":
    from bench import run

    raise SystemExit(run.main(["--only", NAME, "--no-profile", *sys.argv[1:]]))
