"""Section 7, cost: `postgres_cpu_us_per_event`, `wal_bytes_per_event` and
`rows_written_per_event`, beside pgqueuer's `pgqueuer_postgres_cpu_us_per_job`,
`pgqueuer_wal_bytes_per_job` and `pgqueuer_rows_written_per_job`.

What Postgres spends on one delivered event: the producer's INSERT and everything the
sidecar then does to it. Each contender, in a fresh database, in rotating order: phase
"produce", pgbench commits N events one per transaction (4 clients, `-M prepared`, the
~2 KB event, account random among the 100) with nothing consuming them (for pgqueuer:
N jobs, each with pgqueuer's own enqueue statement, its NOTIFY trigger and all); the
tables written to are ANALYZEd, as autoanalyze would; phase "deliver", one `outbox run`
(pgqueuer's worker, its batch the best of the throughput section's sweep) drains them
to the receiver. Each phase is measured as the difference of two readings taken when no
connection but the reader's is left on the database (a backend writes its table
counters out when it exits, so by then every count is in): CPU time of every Postgres
process, WAL position, and rows inserted, updated and deleted in the database's own
tables and their TOAST (not the catalogs: autoanalyze writes there at random). Figures
are per delivered event. The ANALYZE and a last phase, "vacuum" (of the tables written
to: the clean-up autovacuum would do later), are diagnostics, measured but not in the
figures. The details also give the index scans per index in each phase and the share
of HOT updates of outbox.deliveries.

The target halves what outbox cost before that work began. That is measured in the
same run, not taken from a file: a third contender, "baseline", is outbox as it was at
BASELINE_COMMIT (its outbox/ and sql/, from git, in a template of its own), produced
into and drained the same way. This machine's speed varies by a factor of three or
more from one session to the next, so only a figure from the same run compares. Where
git or the commit is missing (a source tarball), the figure recorded on 2026-11-29
stands in, and the table says so.

A fourth contender, "floor", is the least any transactional outbox can cost: the same
event INSERTed into a plain table of its own (no checks, no fan-out, only its primary
key), then consumed by deleting it, 100 rows a statement (`DELETE ... RETURNING`, no
HTTP, no attempt recorded, nothing left to show). It answers whether the target leaves
room for the work the contract asks for.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import payloads
from bench.common import ROOT, rotate, run_command, say, stats
from bench.harness import Bench
from bench.pgq_worker import enqueue_script
from bench.report import Row, get, median_of, met, num, spread
from bench.services import TEMPLATE, database
from bench.throughput import pgqueuer_drain

NAME = "cost"
KEY = "cost"

# outbox before the work to halve its cost: main on 2026-11-29, before migration 9.
BASELINE_COMMIT = "c03539f27ff5ec24a619fb2e935727604a628db9"
# Its figure when no checkout of it can be had: the median of `python -m bench.run
# --only cost --reps 3 --no-profile` at that commit, 2026-11-29 22:19, on a machine
# about three times as fast as some since (226-260 µs; produce 148 + deliver 88).
RECORDED_BASELINE_CPU_US = 233.0
TARGET_RATIO = 0.5
BASELINE_TEMPLATE = "cost_tpl_baseline"

CLIENTS = 4
PHASES = ("produce", "deliver")
DIAGNOSTIC = ("analyze", "vacuum")

# One event per transaction, as a producer commits it.
OUTBOX_SCRIPT = """\\set aid random(0, 99)
INSERT INTO outbox.events (account_id, event, data)
    VALUES ('acct_' || :aid::text, 'lead.scored', :data);
"""

# The floor: the event into a table of its own, then deleted as it is read.
FLOOR_SCRIPT = OUTBOX_SCRIPT.replace("outbox.events", "bench.events_plain")
FLOOR_BATCH = 100
FLOOR_DELETE = """
DELETE FROM bench.events_plain
WHERE id IN (SELECT id FROM bench.events_plain ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id, account_id, event, data::text, occurred_at
"""

# Each kind of contender's producer script and the prefix of its own indexes (the
# template holds every kind's tables). The baseline is of the outbox kind.
SCRIPTS = {
    "outbox": lambda: OUTBOX_SCRIPT,
    "floor": lambda: FLOOR_SCRIPT,
    "pgqueuer": enqueue_script,
}
OWN_INDEXES = {"outbox": "outbox.", "floor": "bench.events_plain", "pgqueuer": "pgqueuer"}

# The database's own tables and their TOAST tables, named after their owner.
TABLES_SQL = """
SELECT CASE WHEN o.oid IS NULL THEN s.relid::regclass::text
            ELSE o.oid::regclass::text || ' (TOAST)' END,
       s.n_tup_ins, s.n_tup_upd, s.n_tup_del, s.n_tup_hot_upd
FROM pg_stat_all_tables s
LEFT JOIN pg_class o ON o.reltoastrelid = s.relid
JOIN pg_class c ON c.oid = coalesce(o.oid, s.relid)
WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
"""
INDEXES_SQL = """
SELECT s.indexrelid::regclass::text, s.idx_scan
FROM pg_stat_all_indexes s JOIN pg_class c ON c.oid = s.relid
WHERE c.relnamespace NOT IN
    ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'pg_toast'::regnamespace)
"""
OTHERS_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


def reading(bench: Bench, url: str) -> dict[str, Any]:
    """The counters, once every other backend of the database is gone (and so has
    written its table counters out)."""
    deadline = time.monotonic() + 60
    with psycopg.connect(url, autocommit=True) as conn:
        while (row := conn.execute(OTHERS_SQL).fetchone()) and row[0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{row[0]} backends still on the database after 60 s")
            time.sleep(0.05)
        tables = {
            name: {"ins": ins, "upd": upd, "del": dele, "hot_upd": hot}
            for name, ins, upd, dele, hot in conn.execute(TABLES_SQL).fetchall()
        }
        indexes = dict(conn.execute(INDEXES_SQL).fetchall())
    return {
        "cpu_s": bench.cluster.cpu_seconds(),
        "wal": bench.cluster.wal_lsn(),
        "tables": tables,
        "indexes": indexes,
    }


def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One phase: CPU seconds, WAL bytes, rows written in all and per table (those
    written to), scans per index (every index, unused ones too)."""
    tables = {
        name: {k: v - before["tables"].get(name, {}).get(k, 0) for k, v in counts.items()}
        for name, counts in after["tables"].items()
    }
    tables = {name: t for name, t in tables.items() if any(t.values())}
    return {
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "wal_bytes": after["wal"] - before["wal"],
        "rows_written": sum(t["ins"] + t["upd"] + t["del"] for t in tables.values()),
        "tables": tables,
        "index_scans": {
            name: scans - before["indexes"].get(name, 0)
            for name, scans in sorted(after["indexes"].items())
        },
    }


def written(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The tables (owners of the TOAST tables) written to between two readings."""
    tables = difference(before, after)["tables"]
    return sorted({name.removesuffix(" (TOAST)") for name in tables})


def maintain(url: str, command: str, tables: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table in tables:
            conn.execute(f"{command} {table}")


def brief(phase: dict[str, Any]) -> dict[str, Any]:
    """A diagnostic phase: its CPU and WAL only."""
    return {"cpu_s": phase["cpu_s"], "wal_bytes": phase["wal_bytes"]}


def produce(bench: Bench, name: str, script_text: str, n: int) -> dict[str, Any]:
    """pgbench commits `n` transactions of the script; its rate."""
    script = bench.workdir / f"{name}.sql"
    script.write_text(script_text)
    job = ["-D", f"job={payloads.body(42).decode()}"]
    out = bench.pgbench(name, script, CLIENTS, 600, *job, transactions=n // CLIENTS)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    if not done or int(done.group(1)) != n:
        raise RuntimeError(f"pgbench did not commit {n} transactions: {out[-500:]}")
    tps = re.search(r"tps = ([0-9.]+) \(without initial", out)
    return {"tps": float(tps.group(1)) if tps else None}


def baseline_tree(bench: Bench) -> Path | None:
    """BASELINE_COMMIT's outbox/ and sql/ in the work directory, or None without git or
    that commit."""
    tree = bench.workdir / "baseline"
    archive = bench.workdir / "baseline.tar"
    try:
        run_command(["git", "archive", "-o", str(archive), BASELINE_COMMIT, "outbox", "sql"])
        tree.mkdir(exist_ok=True)
        run_command(["tar", "-xf", str(archive), "-C", str(tree)])
    except (OSError, RuntimeError) as exc:
        say(f"   no checkout of {BASELINE_COMMIT[:7]} ({exc}): the recorded baseline stands in")
        return None
    return tree


def case(
    bench: Bench, contender: str, rep: int, n: int, baseline: Path | None = None
) -> dict[str, Any]:
    """One contender's phases (produce, analyze, deliver, vacuum) in a fresh database."""
    name = f"cost_{contender}_{rep}"
    phases: dict[str, Any] = {}
    kind = "outbox" if contender == "baseline" else contender
    template = BASELINE_TEMPLATE if contender == "baseline" else TEMPLATE
    with database(bench.cluster, name, template) as url:
        bench.cluster.checkpoint()
        first = reading(bench, url)
        info = produce(bench, name, SCRIPTS[kind](), n)
        produced = reading(bench, url)
        # What autoanalyze does to a table that grew. Without it both contenders' queries
        # are planned for the template's empty tables: at 20,000 events pgqueuer's
        # delivery phase took six times the Postgres CPU, the outbox's 1.4 times. Not in
        # the figures (its cost is per table, not per event).
        maintain(url, "ANALYZE", written(first, produced))
        analyzed = reading(bench, url)
        if kind == "outbox":
            tree = baseline if contender == "baseline" else ROOT
            assert tree is not None
            r = bench.drain(url, n, tree=tree)
            info_deliver = {"rate": r["rate"], "client_cpu_s": r["cpu_s"][0]}
        elif kind == "floor":
            info_deliver = floor_drain(url)
        else:
            r = pgqueuer_drain(bench, url, n, bench.pgqueuer_batch, name)
            info_deliver = {"rate": r["rate"], "client_cpu_s": r["cpu_s"]}
        delivered = reading(bench, url)
        phases["produce"] = difference(first, produced) | info
        phases["analyze"] = brief(difference(produced, analyzed))
        phases["deliver"] = difference(analyzed, delivered) | info_deliver
        own = OWN_INDEXES[kind]
        for phase in PHASES:
            scans = phases[phase]["index_scans"]
            phases[phase]["index_scans"] = {k: v for k, v in scans.items() if k.startswith(own)}
        maintain(url, "VACUUM", written(first, delivered))
        phases["vacuum"] = brief(difference(delivered, reading(bench, url)))
        if kind == "outbox":
            checks = outbox_checks(url)
        elif kind == "floor":
            checks = floor_checks(url, phases["deliver"]["taken"])
        else:
            checks = pgqueuer_checks(url)
    if checks["delivered"] != n:
        raise RuntimeError(f"{contender}: {checks} after delivering {n}")
    deliveries = difference(first, delivered)["tables"].get("outbox.deliveries", {})
    return {
        "contender": contender,
        "rep": rep + 1,
        "phases": phases,
        "checks": checks,
        "deliveries_updates": deliveries.get("upd", 0),
        "deliveries_hot_updates": deliveries.get("hot_upd", 0),
    }


def floor_drain(url: str) -> dict[str, Any]:
    """The floor's consumer: delete the events in batches, reading each as it goes."""
    taken = 0
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        while rows := conn.execute(FLOOR_DELETE, (FLOOR_BATCH,), prepare=True).fetchall():
            taken += len(rows)
    return {"rate": taken / (time.monotonic() - started), "client_cpu_s": None, "taken": taken}


def floor_checks(url: str, taken: int) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM bench.events_plain").fetchone()
    assert row is not None
    return {"delivered": taken, "left_in_queue": row[0]}


def outbox_checks(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*),"
            " (SELECT count(*) FROM outbox.delivery_attempts) FROM outbox.deliveries"
        ).fetchone()
    assert row is not None
    return {"delivered": row[0], "deliveries": row[1], "attempt_rows": row[2]}


def pgqueuer_checks(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'),"
            " (SELECT count(*) FROM pgqueuer)"
        ).fetchone()
    assert row is not None
    return {"delivered": row[0], "left_in_queue": row[1]}


def per_event(runs: list[dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """Per delivered event, each phase's and their sum's CPU µs, WAL bytes and rows
    written, over the repetitions; the diagnostic phases are not in the sum."""

    def of(field: str, scale: float, phases: tuple[str, ...]) -> dict[str, Any]:
        out = {p: stats([r["phases"][p][field] / n * scale for r in runs]) for p in phases}
        total = [sum(r["phases"][p][field] for p in PHASES) / n * scale for r in runs]
        return out | {"total": stats(total)}

    return {
        "cpu_us": of("cpu_s", 1e6, (*PHASES, *DIAGNOSTIC)),
        "wal_bytes": of("wal_bytes", 1, (*PHASES, *DIAGNOSTIC)),
        "rows_written": of("rows_written", 1, PHASES),
    }


def measure(bench: Bench) -> dict[str, Any]:
    n = bench.sizes.cost_events // CLIENTS * CLIENTS
    batch = bench.pgqueuer_batch
    say(
        f"7. cost: Postgres CPU, WAL, rows per delivered event; {n} events, one per"
        f" transaction ({CLIENTS} pgbench clients), then drained; pgqueuer batch {batch}"
    )
    runs: dict[str, list[dict[str, Any]]] = {"outbox": [], "pgqueuer": [], "floor": []}
    baseline = baseline_tree(bench)
    if baseline is not None:
        bench.build_template(BASELINE_TEMPLATE, baseline)
        runs["baseline"] = []
    for rep in range(bench.reps):
        for contender in rotate(list(runs), rep):
            r = case(bench, contender, rep, n, baseline)
            runs[contender].append(r)
            cpu = [r["phases"][p]["cpu_s"] / n * 1e6 for p in PHASES]
            wal = sum(r["phases"][p]["wal_bytes"] for p in PHASES) / n
            say(
                f"   rep {rep + 1}: {contender:8} Postgres {cpu[0]:.0f} + {cpu[1]:.0f}"
                f" = {sum(cpu):.0f} us, WAL {wal:,.0f} B per delivered event"
            )
    outbox = per_event(runs["outbox"], n)
    pgq = per_event(runs["pgqueuer"], n)
    before = per_event(runs["baseline"], n) if baseline is not None else None
    floor = per_event(runs["floor"], n)

    def ratio(field: str, to: dict[str, Any] = pgq, of: dict[str, Any] = outbox) -> dict[str, Any]:
        mine = of[field]["total"]["values"]
        theirs = to[field]["total"]["values"]
        # Paired by repetition: the two ran minutes apart, in rotating order.
        return stats([m / t for m, t in zip(mine, theirs, strict=True)])

    hot = [
        r["deliveries_hot_updates"] / r["deliveries_updates"] if r["deliveries_updates"] else 0.0
        for r in runs["outbox"]
    ]

    def to_before(of: dict[str, Any]) -> dict[str, Any]:
        if before is not None:
            return ratio("cpu_us", before, of)
        return stats([v / RECORDED_BASELINE_CPU_US for v in of["cpu_us"]["total"]["values"]])

    return {
        "events": n,
        "pgbench_clients": CLIENTS,
        "pgqueuer_batch": batch,
        "baseline_commit": BASELINE_COMMIT,
        # None: the recorded figure stood in for a run of the baseline.
        "baseline_per_event": before,
        "recorded_baseline_postgres_cpu_us": RECORDED_BASELINE_CPU_US,
        "outbox_per_event": outbox,
        "pgqueuer_per_job": pgq,
        "cpu_ratio_to_baseline": to_before(outbox),
        "floor_per_event": floor,
        "floor_cpu_ratio_to_baseline": to_before(floor),
        "wal_ratio_to_baseline": ratio("wal_bytes", before) if before is not None else None,
        "rows_ratio_to_baseline": ratio("rows_written", before) if before is not None else None,
        "cpu_ratio_vs_pgqueuer": ratio("cpu_us"),
        "wal_ratio_vs_pgqueuer": ratio("wal_bytes"),
        "rows_ratio_vs_pgqueuer": ratio("rows_written"),
        "deliveries_hot_update_share": stats(hot),
        "runs": [r for contender_runs in runs.values() for r in contender_runs],
    }


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    def total(contender: str, field: str) -> float | None:
        return median_of(get(details, KEY, contender, field, "total"))

    return {
        "postgres_cpu_us_per_event": total("outbox_per_event", "cpu_us"),
        "baseline_postgres_cpu_us_per_event": total("baseline_per_event", "cpu_us"),
        "postgres_cpu_ratio_to_baseline": median_of(get(details, KEY, "cpu_ratio_to_baseline")),
        "pgqueuer_postgres_cpu_us_per_job": total("pgqueuer_per_job", "cpu_us"),
        "floor_postgres_cpu_us_per_event": total("floor_per_event", "cpu_us"),
        "wal_bytes_per_event": total("outbox_per_event", "wal_bytes"),
        "pgqueuer_wal_bytes_per_job": total("pgqueuer_per_job", "wal_bytes"),
        "rows_written_per_event": total("outbox_per_event", "rows_written"),
        "pgqueuer_rows_written_per_job": total("pgqueuer_per_job", "rows_written"),
    }


def split(figure: dict[str, Any], digits: int = 0) -> str:
    """`total [min-max] (n); produce x + deliver y` (medians) of a per-event figure."""
    phases = " + ".join(f"{p} {num(median_of(figure[p]), digits)}" for p in PHASES)
    return f"{spread(figure['total'], digits)}; {phases}"


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    cost = details[KEY]
    mine, theirs = cost["outbox_per_event"], cost["pgqueuer_per_job"]
    pgq = f"pgqueuer per job (enqueue + dequeue + complete), batch {cost['pgqueuer_batch']}"
    before = cost.get("baseline_per_event")
    commit = cost.get("baseline_commit", "")[:7]
    if before is not None:
        reference = f"outbox at {commit} (before), same run: {split(before['cpu_us'])}"
    else:
        recorded = cost.get("recorded_baseline_postgres_cpu_us")
        reference = (
            f"outbox at {commit} (before), recorded 2026-11-29, not this run: {num(recorded)}"
        )
    today = median_of(cost["cpu_ratio_to_baseline"])
    out: list[Row] = [
        (
            "7 Postgres CPU µs per delivered event (INSERT + delivery)",
            split(mine["cpu_us"]),
            reference,
            spread(cost["cpu_ratio_to_baseline"], 2),
            f"≤ {TARGET_RATIO:g}",
            met(today, TARGET_RATIO, False),
        )
    ]
    floor = cost.get("floor_per_event")
    if floor is not None:
        out.append(
            (
                "7 floor: Postgres CPU µs per event, plain INSERT + DELETE as a queue",
                split(floor["cpu_us"]),
                f"share of the outbox at {commit} (before), same run",
                spread(cost["floor_cpu_ratio_to_baseline"], 2),
                "(reported)",
                "",
            )
        )
    # The rest are reported, with no target: against the outbox of before (its CPU is
    # the row above) and against pgqueuer. The ratio keys are <prefix>_ratio_<suffix>.
    figures = (
        ("Postgres CPU µs", "cpu_us", "cpu", 0),
        ("WAL bytes", "wal_bytes", "wal", 0),
        ("rows written", "rows_written", "rows", 1),
    )
    contenders = (
        ("before", f"outbox at {commit}, same run", before, "to_baseline"),
        ("pgqueuer", pgq, theirs, "vs_pgqueuer"),
    )
    out += [
        (
            f"7 {label} per delivered event vs {vs}",
            split(mine[field], digits),
            f"{name}: {split(against[field], digits)}",
            spread(cost[f"{prefix}_ratio_{suffix}"], 2),
            "(reported)",
            "",
        )
        for vs, name, against, suffix in contenders
        if against is not None
        for label, field, prefix, digits in figures
        if (vs, field) != ("before", "cpu_us")
    ]
    return out
