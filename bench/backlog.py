"""Section 4, backlog scaling: `drain_ratio_1m_vs_10k` and `rss_peak_mb`.

Accounts with ten webhooks each, so every event fans out to ten deliveries. A backlog
of 10,000 pending deliveries is drained completely, `--reps` times; one of 1,000,000
(100,000 events in ten statements, fanned out by the real trigger, then VACUUM ANALYZE
and CHECKPOINT) is built once and its drain rate measured over the first 20 s. The
ratio is the large rate over the median small one. Peak RSS is the sidecar's VmHWM
just before it is stopped; `rss_peak_mb` is the larger of the two medians.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import psycopg

from bench.common import FAN_ACCOUNTS, FAN_OUT, say, stats
from bench.harness import Bench
from bench.report import Row, get, median_of, met, num, spread
from bench.services import database

NAME = "backlog"
KEY = "backlog"


def measure(bench: Bench) -> dict[str, Any]:
    small_n, large_n = bench.sizes.backlog_small, bench.sizes.backlog_large
    say(
        f"4. backlog scaling: drain rate at {large_n:,} pending vs {small_n:,};"
        f" {FAN_ACCOUNTS} accounts x {FAN_OUT} webhooks, each event fans out to {FAN_OUT}"
    )
    small: list[float] = []
    small_rss: list[float] = []
    for rep in range(bench.reps):
        with database(bench.cluster, f"bl_small_{rep}") as url:
            pending = bench.load_outbox(url, small_n // FAN_OUT, fan=True)
            r = bench.drain(url, pending)
        small.append(r["rate"])
        small_rss.extend(r["rss_mb"])
        say(f"   {small_n:,} rep {rep + 1}: {r['rate']:,.0f}/s, peak RSS {r['rss_mb'][0]:.1f} MB")
    with database(bench.cluster, "bl_large") as url:
        start = time.monotonic()
        pending = bench.load_outbox(url, large_n // FAN_OUT, fan=True, chunk=10_000)
        load_s = time.monotonic() - start
        say(f"   {pending:,} pending deliveries built in {load_s:.0f} s")
        r = bench.drain(url, pending, window=bench.sizes.backlog_window)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_total_relation_size('outbox.deliveries'),"
                " pg_total_relation_size('outbox.events')"
            ).fetchone()
    large = r["rate"]
    say(
        f"   {large_n:,} (first {bench.sizes.backlog_window:g} s): {large:,.0f}/s,"
        f" peak RSS {r['rss_mb'][0]:.1f} MB"
    )
    return {
        "small_pending": small_n,
        "large_pending": pending,
        "small_per_s": stats(small),
        "large_per_s": stats([large]),
        "large_window_s": bench.sizes.backlog_window,
        "large_build_s": load_s,
        "large_sizes_bytes": {"deliveries": row[0], "events": row[1]} if row else None,
        "drain_ratio": large / statistics.median(small),
        "rss_small_mb": stats(small_rss),
        "rss_large_mb": stats(r["rss_mb"]),
        "repetitions_large": 1,
    }


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    rss = [
        median_of(get(details, KEY, "rss_small_mb")),
        median_of(get(details, KEY, "rss_large_mb")),
    ]
    rss_known = [r for r in rss if r is not None]
    return {
        "drain_ratio_1m_vs_10k": get(details, KEY, "drain_ratio"),
        "rss_peak_mb": max(rss_known) if rss_known else None,
    }


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    bl = details[KEY]
    found: list[Row] = [
        (
            f"4 drain rate at {bl['large_pending']:,} pending, /s",
            spread(bl["large_per_s"]),
            f"at {bl['small_pending']:,} pending {spread(bl['small_per_s'])}",
            num(bl["drain_ratio"], 2),
            "≥ 0.9",
            met(bl["drain_ratio"], 0.9, True),
        )
    ]
    for label, key in (("10k", "rss_small_mb"), ("1M", "rss_large_mb")):
        found.append(
            (
                f"4 sidecar peak RSS, {label} backlog, MB",
                spread(bl[key], 1),
                "",
                "",
                "≤ 100",
                met(median_of(bl[key]), 100, False),
            )
        )
    return found
