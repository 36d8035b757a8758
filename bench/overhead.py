"""Section 2, producer overhead: `producer_overhead_ratio` (b/a) and `naive_notify_ratio`
(c/a).

pgbench, 8 clients, 2 threads, `-M prepared`, each transaction one 2 KB domain row plus
one event, in four cases interleaved in rotating order: (a) the event into a plain
table; (b) into `outbox.events` with `outbox run` delivering; (c) into a plain table
with a per-row `pg_notify` trigger and a listener; (d) into `outbox.events` with no
sidecar (the schema's own cost); (e) as (d), in a database whose deliveries keep only
their primary key (no other index, no CHECK): the same trigger writing the least row it
could, so the ceiling of any fan-out in the producer's transaction that the claim,
the status view, the delivery log and retention could not use. Postgres and pgbench
are pinned to one CPU, the sidecar, receiver and listeners to the other. The figures
are transactions per second and their ratios to (a).
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import psycopg

from bench.common import APP_CPUS, DB_CPUS, PROCS, PY, peak_rss_mb, rotate, say, stats
from bench.harness import Bench
from bench.report import Row, get, median_of, met, spread
from bench.services import database

NAME = "overhead"
KEY = "producer_overhead"

# One domain row plus the event, in one transaction.
PGBENCH_SCRIPT = """\\set aid random(0, 99)
BEGIN;
INSERT INTO bench.domain (account_id, body) VALUES (:aid, :body);
INSERT INTO {table} (account_id, event, data) VALUES ('acct_' || :aid::text, 'lead.scored', :data);
END;
"""
PGBENCH_TABLES = {
    "a": "bench.events_plain",
    "b": "outbox.events",
    "c": "bench.events_naive",
    "d": "outbox.events",
    "e": "outbox.events",
}
PGBENCH_CASES = {
    "a": "plain INSERT of the event (reference)",
    "b": "outbox INSERT, fan-out to 1 webhook, `outbox run` delivering",
    "c": "naive per-row NOTIFY trigger",
    "d": "outbox INSERT, no sidecar attached (diagnostic: the schema's own cost)",
    "e": "outbox INSERT, deliveries with their primary key only (diagnostic: the ceiling)",
}

# Case (e): every index of outbox.deliveries but its primary key, and its CHECKs, gone.
BARE_DELIVERIES_SQL = """
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT indexrelid::regclass AS name FROM pg_index
             WHERE indrelid = 'outbox.deliveries'::regclass AND NOT indisprimary LOOP
        EXECUTE format('DROP INDEX %s', r.name);
    END LOOP;
    FOR r IN SELECT conname FROM pg_constraint
             WHERE conrelid = 'outbox.deliveries'::regclass AND contype = 'c' LOOP
        EXECUTE format('ALTER TABLE outbox.deliveries DROP CONSTRAINT %I', r.conname);
    END LOOP;
END
$$
"""


def pgbench_case(bench: Bench, case: str, rep: int) -> dict[str, Any]:
    script = bench.workdir / f"pgbench_{case}.sql"
    script.write_text(PGBENCH_SCRIPT.format(table=PGBENCH_TABLES[case]))
    name = f"po_{case}_{rep}"
    result: dict[str, Any] = {}
    with database(bench.cluster, name) as url:
        if case == "e":
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(BARE_DELIVERIES_SQL)
        sidecar = listener = None
        if case in ("b", "c"):
            # (c): the naive design's consumer. (b): counts the wake-ups producers send
            # (the sidecar listens on the same channel on its own connection).
            channel = "outbox_wake" if case == "b" else "bench_naive"
            listener = PROCS.start(
                [PY, "-m", "bench.naive_listener", "--dsn", url, "--channel", channel],
                cpus=APP_CPUS,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert listener.stdout is not None
            if listener.stdout.readline().strip() != "ready":
                raise RuntimeError("listener did not start")
        if case == "b":
            bench.receiver.reset()
            sidecar = bench.start_sidecar(url, cpus=APP_CPUS)
        bench.cluster.checkpoint()
        time.sleep(0.5)
        try:
            out = bench.pgbench(name, script, 8, bench.sizes.pgbench_seconds)
            match = re.search(r"tps = ([0-9.]+) \(without initial", out)
            if not match:
                raise RuntimeError(f"pgbench printed no tps: {out[-500:]}")
            result["tps"] = float(match.group(1))
            failed = re.search(r"number of failed transactions: (\d+)", out)
            result["failed"] = int(failed.group(1)) if failed else 0
            if sidecar is not None:
                result["delivered_during_run"] = bench.receiver.count()
                result["rss_mb"] = peak_rss_mb(sidecar.pid)
        finally:
            if sidecar is not None:
                bench.stop_sidecar(sidecar)
            if listener is not None:
                PROCS.stop(listener)
                assert listener.stdout is not None
                result["notifications_received"] = int(listener.stdout.read().strip() or 0)
        if case == "b":
            result["outbox"] = bench.check_outbox(url)
    return result


def measure(bench: Bench) -> dict[str, Any]:
    seconds = bench.sizes.pgbench_seconds
    say(
        f"2. producer overhead: pgbench 8 clients, 2 threads, {seconds} s, interleaved;"
        f" Postgres+pgbench on CPU {sorted(DB_CPUS)}, sidecar+receiver on {sorted(APP_CPUS)}"
    )
    tps: dict[str, list[float]] = {case: [] for case in PGBENCH_CASES}
    runs: list[dict[str, Any]] = []
    with bench.pinned():
        for rep in range(bench.reps):
            for case in rotate(list(PGBENCH_CASES), rep):
                r = pgbench_case(bench, case, rep)
                tps[case].append(r["tps"])
                runs.append({"case": case, "rep": rep + 1, **r})
                say(f"   rep {rep + 1}: ({case}) {r['tps']:,.0f} tps  {PGBENCH_CASES[case]}")
    return {
        "seconds": seconds,
        "pinning": {
            "postgres_and_pgbench": sorted(DB_CPUS),
            "sidecar_and_receiver": sorted(APP_CPUS),
        },
        "cases": PGBENCH_CASES,
        "tps_a_plain": stats(tps["a"]),
        "tps_b_outbox": stats(tps["b"]),
        "tps_c_naive_notify": stats(tps["c"]),
        "tps_d_outbox_no_sidecar": stats(tps["d"]),
        "tps_e_outbox_bare_deliveries": stats(tps["e"]),
        "producer_overhead_ratio": stats([b / a for b, a in zip(tps["b"], tps["a"], strict=True)]),
        "naive_notify_ratio": stats([c / a for c, a in zip(tps["c"], tps["a"], strict=True)]),
        "no_sidecar_ratio": stats([d / a for d, a in zip(tps["d"], tps["a"], strict=True)]),
        "bare_deliveries_ratio": stats([e / a for e, a in zip(tps["e"], tps["a"], strict=True)]),
        "runs": runs,
    }


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    return {
        "producer_overhead_ratio": median_of(get(details, KEY, "producer_overhead_ratio")),
        "naive_notify_ratio": median_of(get(details, KEY, "naive_notify_ratio")),
    }


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    po = details[KEY]
    plain = f"plain INSERT (a) {spread(po['tps_a_plain'])}"
    # Each case against (a): what it is, its tx/s and its ratio in the details, target, met.
    cases = (
        (
            "outbox INSERT + sidecar (b)",
            "tps_b_outbox",
            "producer_overhead_ratio",
            "≥ 0.6",
            met(summary["producer_overhead_ratio"], 0.6, True),
        ),
        (
            "naive NOTIFY trigger (c)",
            "tps_c_naive_notify",
            "naive_notify_ratio",
            "(what the doorbell avoids)",
            "",
        ),
        (
            "outbox INSERT, no sidecar (d)",
            "tps_d_outbox_no_sidecar",
            "no_sidecar_ratio",
            "≥ 0.75",
            met(median_of(po.get("no_sidecar_ratio")), 0.75, True),
        ),
        (
            "outbox INSERT, deliveries with their primary key only (e)",
            "tps_e_outbox_bare_deliveries",
            "bare_deliveries_ratio",
            "(the ceiling of (d))",
            "",
        ),
    )
    return [
        (f"2 producer tx/s, {label}", spread(po[tps]), plain, spread(po[ratio], 3), target, ok)
        for label, tps, ratio, target, ok in cases
        if tps in po
    ]
