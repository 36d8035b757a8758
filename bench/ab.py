"""A/B: the throughput drain with `outbox run` from two source trees, interleaved.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python -m bench.ab /tmp/before . --reps 6

This machine's run-to-run noise is as large as most single changes (5-10%), so two
`make bench` runs cannot tell a change from the noise. This runs both trees in one
setting: the same private cluster, receiver and backlog, alternating A B B A
..., and prints each drain's rate, CPU per delivery (sidecar and Postgres) and WAL bytes
per delivery, and the medians. The sidecar of each tree is started in that tree
(`python -m` puts its working directory first on sys.path), so it imports that tree's
`outbox` package and reads that tree's sql/; each tree has its own template, migrated by
that tree's `outbox migrate`, so two trees whose schemas differ can be compared (a
sidecar refuses a schema newer than its own).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import PROCS, say
from bench.harness import Bench, Sizes
from bench.services import Cluster, Receiver, database


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("a", type=Path, help="source tree A (holds outbox/ and sql/)")
    parser.add_argument("b", type=Path, help="source tree B")
    parser.add_argument("--reps", type=int, default=4, help="drains per tree (default 4)")
    parser.add_argument("--deliveries", type=int, default=20_000)
    args = parser.parse_args()
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for tree in trees.values():
        if not (tree / "outbox" / "dispatcher.py").is_file():
            parser.error(f"{tree} holds no outbox/ package")
    n = args.deliveries
    workdir = Path(tempfile.mkdtemp(prefix="outbox-ab-"))
    cluster = Cluster(workdir / "pgdata")
    cluster.start()
    receiver = Receiver(workdir)
    templates = {name: f"ab_tpl_{name.lower()}" for name in trees}
    results: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
    try:
        bench = Bench(workdir, cluster, receiver, 1, Sizes())
        for name, tree in trees.items():
            bench.build_template(templates[name], tree)
        for rep in range(args.reps):
            for name in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                with database(cluster, f"ab_{rep}_{name}", templates[name]) as url:
                    bench.load_outbox(url, n)
                    r = bench.drain(url, n, tree=trees[name])
                row = (
                    r["rate"],
                    r["cpu_s"][0] / n * 1e6,
                    r["db_cpu_s"] / n * 1e6,
                    r["wal_bytes"] / n,
                )
                results[name].append(row)
                say(
                    f"{name}: {row[0]:7,.0f}/s, sidecar {row[1]:.0f} us, Postgres {row[2]:.0f} us,"
                    f" WAL {row[3]:,.0f} B per delivery"
                )
    finally:
        receiver.stop()
        cluster.stop()
        PROCS.cleanup()
        # The cluster and logs are 50-130 MB a run; bench.run removes its own too.
        shutil.rmtree(workdir, ignore_errors=True)
    for name, rows in results.items():
        rate, cpu, db_cpu, wal = (statistics.median(r[i] for r in rows) for i in range(4))
        say(
            f"{name} {trees[name]}: median {rate:,.0f}/s, sidecar {cpu:.0f} us"
            f" and Postgres {db_cpu:.0f} us of CPU and {wal:,.0f} B of WAL per delivery"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
