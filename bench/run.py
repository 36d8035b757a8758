"""`make bench`: the benchmark suite (see bench/README.md).

    python -m bench.run [--reps 3] [--only throughput,overhead,...] [--no-profile] [--quick]

Starts a private PostgreSQL 15 cluster (fsync on, default settings) in a temporary
directory, an HTTPS receiver in a process of its own, and then, section by section,
`outbox run` and its references. Writes bench/runs/<date>.json (ignored by git) and
appends a table to bench/RESULTS.md (a --quick or --only run:
bench/runs/<date>-quick|partial.json, no table); profiles go to bench/profiles/. Every
process it starts, and the cluster, is stopped on exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import (
    backlog,
    cost,
    latency,
    limits,
    overhead,
    profiling,
    render,
    retention,
    throughput,
    two_sidecars,
)
from bench.common import CONCURRENCY, CPUS, PROCS, ROOT, run_command, say
from bench.harness import QUICK, Bench, Sizes
from bench.report import (
    Section,
    append_markdown,
    context_line,
    strip_arrays,
    summarize,
    table,
    write_results,
)
from bench.services import Cluster, Receiver
from outbox import __version__ as outbox_version

# The figures, in the order they run and appear in the summary and the table; cost
# follows throughput, whose sweep picks the pgqueuer batch size it uses too.
FIGURES: tuple[Section, ...] = (
    throughput,
    cost,
    overhead,
    latency,
    backlog,
    two_sidecars,
    retention,
    render,
    limits,
)
SECTIONS = (*(section.NAME for section in FIGURES), profiling.NAME)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--quick", action="store_true", help="small sizes, for trying it out")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    sizes = QUICK if args.quick else Sizes()
    if len(CPUS) < 2:
        say("warning: one CPU only; the pinned sections cannot separate Postgres from the sidecar")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    loadavg_start = _loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    cluster = Cluster(workdir / "pgdata")
    receiver: Receiver | None = None
    try:
        say(f"work directory {workdir}; starting a private PostgreSQL cluster")
        cluster.start()
        receiver = Receiver(workdir)
        say(f"receiver (separate process) on {receiver.base}")
        bench = Bench(workdir, cluster, receiver, args.reps, sizes)
        bench.build_template()
        raw: dict[str, Any] = {}
        errors: dict[str, str] = {}
        timings: dict[str, float] = {}
        loads: dict[str, str] = {}
        for section in FIGURES:
            name = section.NAME
            if only and name not in only:
                continue
            t0 = time.monotonic()
            try:
                raw[section.KEY] = section.measure(bench)
            except Exception as exc:  # record it, and go on with the other sections
                errors[name] = traceback.format_exc()
                say(f"{name} FAILED: {exc}")
            timings[name] = round(time.monotonic() - t0, 1)
            loads[name] = _loadavg()
            say(f"   ({timings[name]:.0f} s; load average {loads[name]})")
        if (not args.no_profile and not only) or profiling.NAME in only:
            t0 = time.monotonic()
            try:
                raw[profiling.KEY] = profiling.measure(bench, stamp.replace(":", ""))
            except Exception as exc:  # a diagnostic: its failure does not fail the run
                raw[profiling.KEY] = {"error": traceback.format_exc()}
                say(f"profile failed (not counted): {exc}")
            timings[profiling.NAME] = round(time.monotonic() - t0, 1)
        meta = {
            "date": stamp,
            "outbox_version": outbox_version,
            "commit": _commit(),
            "postgres": cluster.setting("server_version"),
            "fsync": cluster.setting("fsync"),
            "shared_buffers": cluster.setting("shared_buffers"),
            "synchronous_commit": cluster.setting("synchronous_commit"),
            "pgqueuer_version": _version("pgqueuer"),
            "python": platform.python_version(),
            "cpus": len(CPUS),
            "loadavg_start": loadavg_start,
            "loadavg_end": _loadavg(),
            "reps": args.reps,
            "quick": args.quick,
            "sizes": sizes.__dict__,
            "section_seconds": timings,
            "loadavg_after_section": loads,
            "runtime_s": time.monotonic() - started,
            "sidecar": {
                "OUTBOX_CONCURRENCY": CONCURRENCY,
                "OUTBOX_LOG_FORMAT": "json, to a file",
                "OUTBOX_API_LISTEN": "off",
            },
        }
        details = strip_arrays(raw)
        summary = summarize(details, FIGURES)
        text = table(details, summary, FIGURES)
        suffix = ("-quick" if args.quick else "") + ("-partial" if only else "")
        json_path = write_results(stamp, meta, summary, details, errors, suffix)
        if not args.quick and not only:
            append_markdown(stamp, meta, text, errors, json_path)
        print()
        print(context_line(meta))
        print(text)
        print()
        print("summary:", json.dumps(summary))
        say(
            f"wrote {json_path.relative_to(ROOT)}"
            + ("" if args.quick or only else " and bench/RESULTS.md")
        )
        return 1 if errors else 0
    finally:
        if receiver is not None:
            receiver.stop()
        PROCS.cleanup()
        try:
            cluster.stop()
        except Exception as exc:
            say(f"could not stop the private cluster: {exc}")
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _commit() -> str | None:
    """The measured tree's commit, "+changes" when it differs from it; None without git."""
    try:
        head = run_command(["git", "rev-parse", "--short", "HEAD"], timeout=30).strip()
        changed = run_command(["git", "status", "--porcelain", "--untracked-files=no"], timeout=30)
    except (OSError, RuntimeError):
        return None
    return head + ("+changes" if changed.strip() else "")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
