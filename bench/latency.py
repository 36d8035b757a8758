"""Section 3, latency: `latency_p50_ms`, `latency_p99_ms` (at 200 events/s) and
`latency_2k_p99_ms` (at 2,000/s), commit to receipt.

pgbench `-R` commits single-INSERT transactions with Poisson arrivals for 20 s, each
client's events to its own webhook, onto an idle sidecar (asleep on its doorbell).
Commit times come from pgbench's per-transaction log (`-l`: when COMMIT returned),
arrival times from the receiver (the same machine clock); a client's k-th transaction
is its k-th event. Percentiles are nearest-rank over every event of a repetition, the
figure the median over repetitions. The reference is the HTTP part alone: one POST at a
time on a warm connection. Postgres and pgbench on one CPU, sidecar and receiver on the
other. A diagnostic (`p99_after_first_second`) leaves out the events of the first
second, when pgbench's new connections and the sidecar's first HTTPS connections start.
"""

from __future__ import annotations

import glob
import re
import time
from array import array
from pathlib import Path
from typing import Any

import psycopg

from bench.common import APP_CPUS, DB_CPUS, peak_rss_mb, percentile, say, stats
from bench.harness import Bench
from bench.report import Row, get, median_of, met, num, spread
from bench.services import database

NAME = "latency"
KEY = "latency"

# One event per transaction; the account (so the webhook) is the client's.
LATENCY_SCRIPT = """INSERT INTO outbox.events (account_id, event, data)
    VALUES ('acct_' || :client_id::text, 'lead.scored', :data);
"""


def pgbench_commit_times(prefix: Path) -> dict[int, list[float]]:
    """Per client, the commit times (s) of its transactions in order, from `pgbench -l`.

    Log lines: client_id transaction_no time script_no time_epoch time_us [schedule_lag];
    time_epoch.time_us is when the transaction completed.
    """
    found: dict[int, list[tuple[int, float]]] = {}
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as f:
            for line in f:
                fields = line.split()
                client, number = int(fields[0]), int(fields[1])
                found.setdefault(client, []).append((number, int(fields[4]) + int(fields[5]) / 1e6))
    return {client: [t for _, t in sorted(v)] for client, v in found.items()}


def http_floor(bench: Bench) -> dict[str, Any]:
    """One request at a time on a warm connection: send -> receipt, the HTTP part."""
    bench.receiver.reset()
    path = str(bench.workdir / "floor")
    bench.http_client("--count", "200", "--sequential", path, cpus=APP_CPUS)
    ids, times = bench.receiver.records()
    starts: array[float] = array("d")
    with open(path + ".t", "rb") as f:
        starts.frombytes(f.read())
    lat = sorted((t - starts[i - 1]) * 1000 for i, t in zip(ids, times, strict=True) if i >= 1)
    return {p: percentile(lat, q) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))} | {
        "max": lat[-1]
    }


def latency_once(bench: Bench, rate: int, rep: int) -> dict[str, Any]:
    """pgbench -R commits single-INSERT transactions; its per-transaction log has the
    commit times (taken when COMMIT returned), the receiver has the arrival times."""
    name = f"lat_{rate}_{rep}"
    # Enough clients that commit latency never throttles the schedule.
    clients = max(8, rate // 60)
    script = bench.workdir / "latency.sql"
    script.write_text(LATENCY_SCRIPT)
    prefix = bench.workdir / name
    with database(bench.cluster, name) as url:
        bench.cluster.checkpoint()
        bench.receiver.reset()
        sidecar = bench.start_sidecar(url, cpus=APP_CPUS)
        try:
            time.sleep(1.0)  # idle, so the first events find it asleep on the doorbell
            out = bench.pgbench(
                name,
                script,
                clients,
                bench.sizes.latency_seconds,
                "-R",
                str(rate),
                "-l",
                f"--log-prefix={prefix}",
            )
            commits = pgbench_commit_times(prefix)
            sent = sum(len(v) for v in commits.values())
            got = bench.receiver.wait_for(sent, 30, quiet_for=10)
            rss = peak_rss_mb(sidecar.pid)
        finally:
            bench.stop_sidecar(sidecar)
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT d.id, e.id, e.account_id FROM outbox.deliveries d"
                " JOIN outbox.events e ON e.id = d.event_id"
            ).fetchall()
    # A client's k-th transaction inserted its k-th event (ids rise within a client).
    events_of: dict[int, list[int]] = {}
    for _, event_id, account in rows:
        events_of.setdefault(int(account.removeprefix("acct_")), []).append(event_id)
    committed: dict[int, float] = {}
    for client, events in events_of.items():
        times = commits.get(client, [])
        if len(times) != len(events):
            raise RuntimeError(f"client {client}: {len(times)} commits, {len(events)} events")
        committed.update(zip(sorted(events), times, strict=True))
    event_of = {d: e for d, e, _ in rows}
    ids, arrivals = bench.receiver.records()
    seen: set[int] = set()
    lat = []
    # Diagnostic: the same, for events committed after the first second, when
    # pgbench's clients have connected and made their first INSERT (each new
    # connection's first outbox INSERT loads plpgsql and the catalogs, ~3 ms of the
    # one database core).
    start = min(committed.values())
    settled = []
    for delivery, t in zip(ids, arrivals, strict=True):
        if delivery not in seen:
            seen.add(delivery)
            at = committed[event_of[delivery]]
            lat.append((t - at) * 1000)
            if at >= start + 1.0:
                settled.append(lat[-1])
    lat.sort()
    settled.sort()
    lag = re.search(r"schedule lag: avg ([0-9.]+) \(max ([0-9.]+)\)", out)
    return {
        "rate": rate,
        "clients": clients,
        "sent": sent,
        "achieved_rate": sent / bench.sizes.latency_seconds,
        "schedule_lag_ms": [float(lag.group(1)), float(lag.group(2))] if lag else None,
        "received": got,
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "max": lat[-1],
        "p99_after_first_second": percentile(settled, 99),
        "rss_mb": rss,
    }


def measure(bench: Bench) -> dict[str, Any]:
    say(
        f"3. latency: commit -> receipt, {bench.sizes.latency_seconds:g} s per rate;"
        f" Postgres+producers on CPU {sorted(DB_CPUS)}, sidecar+receiver on {sorted(APP_CPUS)}"
    )
    with bench.pinned():
        floor = http_floor(bench)
        say(
            f"   HTTP floor (one request at a time): p50 {floor['p50']:.2f} ms,"
            f" p99 {floor['p99']:.2f} ms"
        )
        by_rate: dict[str, Any] = {"http_floor_ms": floor}
        for rate in bench.sizes.latency_rates:
            runs = []
            for rep in range(bench.reps):
                r = latency_once(bench, rate, rep)
                runs.append(r)
                say(
                    f"   {rate}/s rep {rep + 1}: p50 {r['p50']:.2f} p95 {r['p95']:.2f}"
                    f" p99 {r['p99']:.2f} max {r['max']:.2f} ms"
                    f" ({r['received']}/{r['sent']}, {r['achieved_rate']:.0f}/s sent;"
                    f" p99 after the first second {r['p99_after_first_second']:.2f} ms)"
                )
            keys = ("p50", "p95", "p99", "max", "p99_after_first_second")
            by_rate[str(rate)] = {key: stats([r[key] for r in runs]) for key in keys} | {
                "runs": runs
            }
    return by_rate


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    return {
        "latency_p50_ms": median_of(get(details, KEY, "200", "p50")),
        "latency_p99_ms": median_of(get(details, KEY, "200", "p99")),
        "latency_2k_p99_ms": median_of(get(details, KEY, "2000", "p99")),
    }


# The targets, by (rate, percentile).
TARGETS_MS = {("200", "p50"): 5.0, ("200", "p99"): 20.0, ("2000", "p99"): 100.0}


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    lat = details[KEY]
    floor = lat["http_floor_ms"]
    found: list[Row] = []
    for rate in ("200", "2000"):
        if rate not in lat:
            continue
        for p in ("p50", "p95", "p99", "max"):
            target = TARGETS_MS.get((rate, p))
            med = lat[rate][p]["median"]
            ref = floor.get(p)
            found.append(
                (
                    f"3 commit→receipt {p} at {rate}/s, ms",
                    spread(lat[rate][p], 2),
                    f"HTTP alone (one POST at a time) {num(ref, 2)}",
                    f"{med / ref:.1f}x" if ref else "n/a",
                    f"≤ {target:g}" if target else "",
                    met(med, target, False) if target else "",
                )
            )
        settled = lat[rate].get("p99_after_first_second")
        if settled:
            found.append(
                (
                    f"3 the same p99 at {rate}/s, events committed after the first second, ms",
                    spread(settled, 2),
                    f"HTTP alone {num(floor.get('p99'), 2)}",
                    "",
                    "(diagnostic: start-up left out)",
                    "",
                )
            )
    return found
