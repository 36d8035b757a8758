"""Section 8, rate limits: `limits_claim_ratio`, `limits_throughput_ratio` and
`paced_claim_us_per_row`.

What the rate limits of the claim (outbox.claim_v3()) cost where they are set but do not
bind: one backlog (20,000 deliveries to 100 webhooks) with no webhook limited, and with
every webhook limited to 1,000,000 attempts a second, so that every claim reads and
moves the pace of each webhook it hands attempts to.

- The claim alone: the dispatcher's claim query, on one connection set up as the
  dispatcher's (plans kept, commits not waited for), 64 rows a claim with nothing in
  flight, until the whole backlog is leased. The CPU time of that connection's backend
  per claimed row (its own /proc entry: what other processes of a busy machine do
  counts in wall time, much less in this), and wall time beside it.
  `limits_claim_ratio` is no limits' CPU per row over limited's (the speed of the claim
  with limits, relative); target at least 0.8.
- A drain: `outbox run` drains the backlog. `limits_throughput_ratio` is the rate with
  limits over the rate without; target at least 0.8. On a shared machine its rates
  swing more than that: the CPU per delivery of the sidecar and of Postgres is beside
  them in the JSON.

Cases alternate (none first on even repetitions, limited first on odd ones).

`paced_claim_us_per_row` is what a limit that binds costs the others: the other 99
webhooks' 10,000 deliveries are claimed from behind a backlog of 10,000 of one webhook
limited to 1 a second, queued first, which the claim's scan steps over; time per row
claimed, with the same 10,000 claimed with no backlog in front as its reference (no
target: a figure to watch).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg

from bench.common import CONCURRENCY, WEBHOOKS, cpu_seconds, rotate, say, stats
from bench.harness import Bench
from bench.report import Row, get, median_of, met, num, spread
from bench.services import database
from outbox import db
from outbox.config import Settings

NAME = "limits"
KEY = "limits"
# Far above any rate this machine reaches: the limits are read and moved, never bind.
LOOSE_LIMIT = 1_000_000
CASES = ("none", "limited")


def _limit(url: str, rate_limit: int | None, webhooks: str = "") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"UPDATE outbox.webhooks SET rate_limit = %s {webhooks}",
            (rate_limit,),
        )


def claim_all(bench: Bench, url: str) -> dict[str, float]:
    """Claim the whole backlog as one dispatcher would with its slots all free: µs of
    the backend's CPU, and of wall time, per row claimed."""
    settings = Settings(concurrency=CONCURRENCY)
    claimed = claims = 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(db.query("dispatcher_session"))
        conn.execute(db.query("claim_session"))
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        backend = int(row[0])
        db_cpu = cpu_seconds(backend)
        started = time.perf_counter()
        while True:
            params = db.deliveries.claim_params(
                limit=CONCURRENCY,
                lease=str(uuid.uuid4()),
                lease_seconds=settings.lease_seconds,
                per_webhook=settings.per_webhook_limit,
                webhooks_in_flight={},
                per_account=settings.per_account_limit,
                accounts_in_flight={},
            )
            rows = conn.execute(db.query("claim"), params, prepare=True).fetchall()
            if not rows:
                break
            claimed += len(rows)
            claims += 1
        elapsed = time.perf_counter() - started
        db_cpu = cpu_seconds(backend) - db_cpu
    return {
        "rows": claimed,
        "claims": claims,
        "us_per_row": elapsed / claimed * 1e6,
        "db_cpu_us_per_row": db_cpu / claimed * 1e6,
    }


def paced_claims(bench: Bench, url: str, n: int, backlog: bool) -> dict[str, float]:
    """Claim `n` deliveries of 99 webhooks: with `backlog`, from behind as many of
    acct_0's webhook, queued first and limited to 1 a second."""
    with psycopg.connect(url, autocommit=True) as conn:
        if backlog:
            conn.execute(
                "INSERT INTO outbox.events (account_id, event, data)"
                " SELECT 'acct_0', 'lead.scored', bench.data(g) FROM generate_series(1, %s) g",
                (n,),
            )
        conn.execute(
            "INSERT INTO outbox.events (account_id, event, data)"
            f" SELECT 'acct_' || (1 + g %% {WEBHOOKS - 1}), 'lead.scored', bench.data(g)"
            " FROM generate_series(1, %s) g",
            (n,),
        )
        conn.execute("VACUUM ANALYZE outbox.deliveries")
    bench.cluster.checkpoint()
    if backlog:
        _limit(url, 1, "WHERE account_id = 'acct_0'")
    result = claim_all(bench, url)
    # The limited webhook's attempts (one a second) are not what is measured.
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox.deliveries d"
            " JOIN outbox.webhooks w ON w.id = d.webhook_id"
            " WHERE w.account_id <> 'acct_0' AND d.lease IS NOT NULL"
        ).fetchone()
    others = int(row[0]) if row else 0
    if others != n:
        raise RuntimeError(f"claimed {others} of the other webhooks' {n} deliveries")
    result["db_cpu_us_per_row"] *= result["rows"] / others
    result["us_per_row"] *= result["rows"] / others
    result["rows"] = others
    return result


def measure(bench: Bench) -> dict[str, Any]:
    n = bench.sizes.limits
    say(f"8. rate limits: {n:,} deliveries to {WEBHOOKS} webhooks, none limited or all at 1M/s")
    claim: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    drain: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    paced: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    for rep in range(bench.reps):
        for case in rotate(list(CASES), rep):
            limit = LOOSE_LIMIT if case == "limited" else None
            with database(bench.cluster, f"limits_claim_{case}_{rep}") as url:
                bench.load_outbox(url, n)
                _limit(url, limit)
                c = claim_all(bench, url)
            claim[case].append(c)
            with database(bench.cluster, f"limits_drain_{case}_{rep}") as url:
                bench.load_outbox(url, n)
                _limit(url, limit)
                r = bench.drain(url, n)
            drain[case].append(
                {
                    "rate": r["rate"],
                    "sidecar_cpu_us": r["cpu_s"][0] / n * 1e6,
                    "db_cpu_us": r["db_cpu_s"] / n * 1e6,
                }
            )
            with database(bench.cluster, f"limits_paced_{case}_{rep}") as url:
                p = paced_claims(bench, url, n // 2, backlog=case == "limited")
            paced[case].append(p)
            say(
                f"   rep {rep + 1} {case:>7}: claim {c['db_cpu_us_per_row']:.1f} us CPU/row"
                f" ({c['us_per_row']:.1f} wall), drain {r['rate']:,.0f}/s;"
                f" behind a paced backlog {p['db_cpu_us_per_row']:.1f} us CPU/row"
            )
    none_claim = [c["db_cpu_us_per_row"] for c in claim["none"]]
    limited_claim = [c["db_cpu_us_per_row"] for c in claim["limited"]]
    none_rate = [d["rate"] for d in drain["none"]]
    limited_rate = [d["rate"] for d in drain["limited"]]
    return {
        "deliveries": n,
        "loose_limit": LOOSE_LIMIT,
        "claim_us_per_row": {case: stats([c["us_per_row"] for c in claim[case]]) for case in CASES},
        "claim_db_cpu_us_per_row": {
            case: stats([c["db_cpu_us_per_row"] for c in claim[case]]) for case in CASES
        },
        "claims": {case: [c["claims"] for c in claim[case]] for case in CASES},
        "claim_ratio": stats([a / b for a, b in zip(none_claim, limited_claim, strict=True)]),
        "drain_per_s": {case: stats([d["rate"] for d in drain[case]]) for case in CASES},
        "drain_sidecar_cpu_us": {
            case: stats([d["sidecar_cpu_us"] for d in drain[case]]) for case in CASES
        },
        "drain_db_cpu_us": {case: stats([d["db_cpu_us"] for d in drain[case]]) for case in CASES},
        "throughput_ratio": stats([b / a for a, b in zip(none_rate, limited_rate, strict=True)]),
        "paced_us_per_row": {case: stats([p["us_per_row"] for p in paced[case]]) for case in CASES},
        "paced_db_cpu_us_per_row": {
            case: stats([p["db_cpu_us_per_row"] for p in paced[case]]) for case in CASES
        },
    }


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    return {
        "limits_claim_ratio": median_of(get(details, KEY, "claim_ratio")),
        "limits_throughput_ratio": median_of(get(details, KEY, "throughput_ratio")),
        "paced_claim_us_per_row": median_of(
            get(details, KEY, "paced_db_cpu_us_per_row", "limited")
        ),
    }


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    lim = details[KEY]
    claim = lim["claim_db_cpu_us_per_row"]
    paced = lim["paced_db_cpu_us_per_row"]
    return [
        (
            "8 claim with limits, backend CPU µs/row",
            spread(claim["limited"], 1),
            f"no limits {spread(claim['none'], 1)}",
            spread(lim["claim_ratio"], 2),
            "≥ 0.8",
            met(summary["limits_claim_ratio"], 0.8, True),
        ),
        (
            "8 drain with limits, deliveries/s",
            spread(lim["drain_per_s"]["limited"]),
            f"no limits {spread(lim['drain_per_s']['none'])}",
            spread(lim["throughput_ratio"], 2),
            "≥ 0.8",
            met(summary["limits_throughput_ratio"], 0.8, True),
        ),
        (
            "8 claim behind a paced backlog, backend CPU µs/row",
            spread(paced["limited"], 1),
            f"no backlog {spread(paced['none'], 1)}",
            num(
                (median_of(paced["none"]) or 0) / (median_of(paced["limited"]) or 1),
                2,
            ),
            "",
            "",
        ),
    ]
