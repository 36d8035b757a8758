"""The profile (`--only profile`; skipped by `--no-profile`): where `outbox run` spends its
CPU, not a figure.

An extra drain of the throughput backlog (loaded while the sidecar runs) under py-spy,
250 Hz, non-blocking: a flame graph (`profile-<stamp>.svg`) and collapsed stacks
(`profile-<stamp>.raw.txt`) in bench/profiles/, which git ignores, and in the JSON the
rate under the profiler and the functions with the largest self and inclusive shares of
the samples. It does not count in any figure, and its failure does not fail the run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import PROCS, PROFILES_DIR, PY, ROOT, rate_of, say
from bench.harness import Bench
from bench.services import database

NAME = "profile"
KEY = "profile"


def find_pyspy() -> str | None:
    local = Path(PY).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def measure(bench: Bench, stamp: str) -> dict[str, Any]:
    pyspy = find_pyspy()
    if pyspy is None:
        return {"skipped": "py-spy is not installed"}
    n = bench.sizes.throughput
    say(f"profile: py-spy on `outbox run` draining {n:,} (not counted in the figures)")
    PROFILES_DIR.mkdir(parents=True, exist_ok=True)
    raw = PROFILES_DIR / f"profile-{stamp}.raw.txt"
    svg = PROFILES_DIR / f"profile-{stamp}.svg"
    with database(bench.cluster, "profile") as url:
        bench.receiver.reset()
        sidecar = bench.start_sidecar(url)
        recorders = [
            PROCS.start(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(sidecar.pid),
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--nolineno",
                    "--format",
                    fmt,
                    "-o",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for fmt, out in (("raw", raw), ("flamegraph", svg))
        ]
        try:
            time.sleep(1.0)
            bench.load_outbox(url, n, settle=False)
            bench.receiver.wait_for(n, 120, alive=[sidecar.proc], quiet_for=15)
        finally:
            for rec in recorders:
                PROCS.stop(rec, signal.SIGINT, timeout=30)
            bench.stop_sidecar(sidecar)
        _, times = bench.receiver.records()
    top_self, top_total, samples = summarize_profile(raw)
    details = {
        "rate_under_profiler": rate_of(times),
        "samples": samples,
        "flamegraph": str(svg.relative_to(ROOT)),
        "collapsed": str(raw.relative_to(ROOT)),
        "top_self": top_self,
        "top_total": top_total,
    }
    say(f"   {samples} samples; top self time:")
    for name, share in top_self[:8]:
        say(f"     {share:5.1f}%  {name}")
    return details


def summarize_profile(raw: Path, top: int = 25) -> tuple[list[Any], list[Any], int]:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    if not raw.exists():
        return [], [], 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count

    def share(counter: Counter[str]) -> list[Any]:
        return [[name, round(100 * c / samples, 2)] for name, c in counter.most_common(top)]

    return share(self_counts), share(total_counts), samples
