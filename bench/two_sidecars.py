"""Section 5, several sidecars: `two_sidecars_per_s` and `duplicates`.

Two `outbox run` processes drain one backlog of 20,000 pending deliveries. The rate is
taken at the receiver; `duplicates` is the requests received minus the distinct
`X-Webhook-Id`s, summed over the repetitions. The details also show how the attempts
split between the two sidecars, and the database's view (every delivery `succeeded`,
none attempted twice, one attempt row each).
"""

from __future__ import annotations

from typing import Any

from bench.common import say, stats
from bench.harness import Bench
from bench.report import Row, get, median_of, num, spread
from bench.services import database

NAME = "two_sidecars"
KEY = "two_sidecars"


def measure(bench: Bench) -> dict[str, Any]:
    n = bench.sizes.two_sidecars
    say(f"5. two sidecars on one backlog of {n:,}")
    rates: list[float] = []
    duplicates = 0
    runs = []
    for rep in range(bench.reps):
        with database(bench.cluster, f"two_{rep}") as url:
            bench.load_outbox(url, n)
            r = bench.drain(url, n, sidecars=2)
            check = bench.check_outbox(url)
        dup = r["received"] - r["unique"]
        duplicates += dup
        rates.append(r["rate"])
        runs.append(
            {
                "rate": r["rate"],
                "received": r["received"],
                "unique_ids": r["unique"],
                "duplicates": dup,
                "attempts_per_sidecar": r["attempts_logged"],
                "rss_mb": r["rss_mb"],
                **check,
            }
        )
        say(
            f"   rep {rep + 1}: {r['rate']:,.0f}/s, {r['received']} received, {dup} duplicates,"
            f" split {r['attempts_logged']}, {check['attempted_twice']} attempted twice"
        )
    return {
        "deliveries": n,
        "per_s": stats(rates),
        "duplicates_total": duplicates,
        "runs": runs,
    }


def summary(details: dict[str, Any]) -> dict[str, float | int | None]:
    return {
        "two_sidecars_per_s": median_of(get(details, KEY, "per_s")),
        "duplicates": get(details, KEY, "duplicates_total"),
    }


def rows(details: dict[str, Any], summary: dict[str, Any]) -> list[Row]:
    two = details[KEY]
    # The reference is section 1's single sidecar, when it ran.
    single = median_of(get(details, "throughput", "outbox_per_s"))
    two_med = median_of(two["per_s"])
    received = sum(r["received"] for r in two["runs"])
    return [
        (
            "5 two sidecars, deliveries/s",
            spread(two["per_s"]),
            f"one sidecar {num(single)}" if single else "",
            f"{two_med / single:.2f}" if single and two_med else "",
            "",
            "",
        ),
        (
            "5 duplicate deliveries",
            str(two["duplicates_total"]),
            f"of {received:,} received",
            "",
            "0",
            "yes" if two["duplicates_total"] == 0 else "**no**",
        ),
    ]
