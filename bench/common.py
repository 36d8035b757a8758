"""What every part of the benchmark shares: where things are, which CPU is whose, the
statistics of a repeated figure, and the processes it starts (each one's CPU time and
peak RSS read from /proc, and every one stopped on the way out).

Nothing here measures a figure; the section modules (bench/README.md) do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Committed: the table each full run appends to RESULTS.md.
RESULTS_MD = BENCH / "RESULTS.md"
# Ignored by git (.gitignore): every run's JSON (some 2,000 lines each; RESULTS.md keeps
# its figures), and profiles.
RUNS_DIR = BENCH / "runs"
PROFILES_DIR = BENCH / "profiles"
PY = sys.executable

CPUS = sorted(os.sched_getaffinity(0))
# Producer side (Postgres, pgbench, producers) and delivery side (sidecar, receiver).
DB_CPUS = {CPUS[0]}
APP_CPUS = {CPUS[1]} if len(CPUS) > 1 else {CPUS[0]}
ALL_CPUS = set(CPUS)

CONCURRENCY = 64
WEBHOOKS = 100  # acct_0 .. acct_99, one webhook each, at /hook/<n>
FAN_ACCOUNTS = 10  # fan_0 .. fan_9, ten webhooks each, at /hook/100 ..
FAN_OUT = 10


def say(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


# --- statistics ------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the raw values of a repeated measurement."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(p / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def rate_of(times: Sequence[float]) -> float:
    """Requests per second between the first and the last arrival."""
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (max(times) - min(times))


def rotate(items: Sequence[str], k: int) -> list[str]:
    """The cases of repetition `k`, so that no case is always first."""
    k %= len(items)
    return [*items[k:], *items[:k]]


# --- processes -------------------------------------------------------------------------


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (what `taskset -a -p` does)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpus)


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Every child we start, so that all of them can be stopped on the way out."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[Any]] = []

    def start(
        self, cmd: Sequence[str], *, cpus: set[int] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        if cpus is not None:
            # taskset execs the command: the pid we get is the command's own.
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        kwargs.setdefault("cwd", ROOT)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(cmd), **kwargs)
        self.live.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 60
    ) -> int:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ValueError):
            self.live.remove(proc)
        return proc.returncode

    def cleanup(self) -> None:
        for proc in list(self.live):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        self.live.clear()


PROCS = Processes()


def sidecar_env(url: str, ca_file: str, **settings: str) -> dict[str, str]:
    """`outbox run`'s environment: none of ours, the bench's database and receiver (a
    private address, its CA), no admin API; then ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        OUTBOX_DATABASE_URL=url,
        OUTBOX_CA_FILE=ca_file,
        OUTBOX_ALLOW_PRIVATE_TARGETS="true",
        OUTBOX_API_LISTEN="off",
    )
    env.update(settings)
    return env


def run_command(
    cmd: Sequence[str],
    *,
    cpus: set[int] | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> str:
    """Run a command to completion (in `cwd`); its stdout, or an error with its stderr."""
    proc = PROCS.start(
        cmd,
        cpus=cpus,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        PROCS.stop(proc, signal.SIGKILL)
        raise RuntimeError(f"{' '.join(cmd[:4])} ... timed out after {timeout:g} s") from None
    finally:
        with contextlib.suppress(ValueError):
            PROCS.live.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {err.strip()}")
    return str(out)
